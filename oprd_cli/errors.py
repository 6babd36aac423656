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
