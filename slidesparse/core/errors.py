"""The base of every error that means "bad input": the CLI prints its message as one line
`error: ...` and exits with status 2. Each module raises its own subclass (PatternError,
FormatError, CheckpointError, TuningError, ConvertError, ...)."""


class SlideSparseError(ValueError):
    """Bad input (a file, a flag, a checkpoint); the message is one complete line for the user."""
