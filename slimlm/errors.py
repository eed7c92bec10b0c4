"""The one exception type users see: its message is a complete one-line explanation."""


class SlimlmError(Exception):
    """A user-facing error: what was wrong and what to do. The CLI prints it without a traceback."""
