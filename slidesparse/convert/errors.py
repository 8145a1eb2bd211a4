"""The one exception type the converter raises for bad input; the CLI prints it as one line."""


class ConvertError(ValueError):
    """Bad input to the converter (missing file, corrupt safetensors, wrong shape, ...).

    The message is a complete, single-line explanation meant for the user.
    """
