"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class MumoeError(Exception):
    """A user-facing error: bad input, unsupported model, impossible budget."""
