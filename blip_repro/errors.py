"""The one exception users see: a single line naming the file, parameter or value and the fix."""


class UserError(Exception):
    """Bad input or a missing prerequisite. The message is one line; no traceback is needed to act on it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

    # IPython (and so papermill) prints this instead of a traceback, so a notebook that stops early
    # shows the one line that says what is missing.
    def _render_traceback_(self):
        return [f"UserError: {self}"]
