"""The one exception type for problems a user can fix (a bad path, file, argument or checkpoint).

Scripts report it as one line on stderr and exit with status 2; anything else is an internal error (exit 1).
"""


class UserError(Exception):
    """A problem the user can fix: reported as one line naming the thing and what to do, exit status 2."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__
