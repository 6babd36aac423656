"""The one exception type for errors a user can cause and fix.

Anything raised as :class:`OprdError` reaches the terminal as a single line
(``error: <message>``) and a non-zero exit code; every other exception is a bug
and prints a traceback only with ``--debug``.
"""


class OprdError(Exception):
    """A user-fixable error: the message says what is wrong and how to fix it."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def from_os_error(e: OSError) -> OprdError:
    """A file-system error (a path that is a file, a missing folder, no permission, a full disk) as one line."""
    import errno

    what = e.strerror or type(e).__name__
    where = f": {e.filename}" if e.filename else ""
    hint = {errno.ENOSPC: "; free some space and run the command again (what it wrote so far is resumable or "
                          "left incomplete, never marked complete)",
            errno.EEXIST: "; a file is in the way of a folder", errno.ENOTDIR: "; a file is in the way of a folder",
            errno.EACCES: "; check the permissions"}.get(e.errno or 0, "")
    return OprdError(f"{what}{where}{hint}")
