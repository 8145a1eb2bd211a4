"""The base of every error that means "bad input": the CLI prints its message as one line
`error: ...` and exits with status 2. Each module raises its own subclass (PatternError,
FormatError, CheckpointError, TuningError, ConvertError, ...)."""


class SlideSparseError(ValueError):
    """Bad input (a file, a flag, a checkpoint); the message is one complete line for the user."""


def shown(value, limit: int = 60) -> str:
    """repr(value) as quoted in a message, cut short: a value from a hostile file may be huge, and
    a message stays one readable line."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."
