"""The one exception type a user is meant to read.

Any layer raises :class:`UserError` for a problem the user can fix (a bad path, a bad
parameter, an input of the wrong shape). The CLI prints its message on one line and exits
with code 2; everything else is a bug or an environment failure and exits with code 1.
"""


import errno

#: Write errors the user fixes outside zseg: a full disk or quota, a read-only file system.
NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EROFS: "the file system is read-only"}


class UserError(Exception):
    """A problem with the user's input or parameters; the message says what to do."""

    exit_code = 2

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


def write_failure(e: BaseException) -> "UserError | None":
    """A :class:`UserError` for a write that failed for want of room or a writable disk (naming
    the file or object it was writing), or None for any other error."""
    if not isinstance(e, OSError) or e.errno not in NO_ROOM:
        return None
    what = f"cannot write {e.filename}" if e.filename else "cannot write"
    return UserError(f"{what}: {NO_ROOM[e.errno]} ({e.strerror}); make room (or make it writable) and run the same "
                     "command again: the work already done is kept and the rest is redone.")
