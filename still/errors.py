"""The one exception type for user mistakes.

Anything the user can fix (a recipe key, a data row, a path, an incompatible pair of models)
raises `StillError`. The CLI prints it as one line plus an optional hint and exits 2; every
other exception is a bug and keeps its traceback.
"""


class StillError(Exception):
    """A user-fixable problem: `message` says what is wrong, `hint` how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        # one line whatever a value in it holds (an override or a row with a newline in it)
        return text.translate(_LINE_BREAKS)


# every character str.splitlines() breaks at, shown escaped
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}
