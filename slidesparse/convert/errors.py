"""The converter's bad-input error; the CLI prints it as one line."""

from ..core.errors import SlideSparseError


class ConvertError(SlideSparseError):
    """Bad input to the converter (missing file, corrupt safetensors, wrong shape, ...).

    The message is a complete, single-line explanation meant for the user.
    """
