"""The one exception type a user is meant to read.

Any layer raises :class:`UserError` for a problem the user can fix (a bad path, a bad
parameter, an input of the wrong shape). The CLI prints its message on one line and exits
with code 2; everything else is a bug or an environment failure and exits with code 1.
"""


class UserError(Exception):
    """A problem with the user's input or parameters; the message says what to do."""

    exit_code = 2

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))
