"""The one exception type users see for bad input: its message names the file, field or value at fault."""


class ShortenedError(ValueError):
    """Bad input or an unsupported model, raised before anything is written."""
