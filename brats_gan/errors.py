"""The library's own exceptions. Each message says in one line what is wrong and, where there is one,
the fix; the command line (``brats_gan.commands``) prints it and turns it into an
exit status, and the library never imports the command line."""

from __future__ import annotations


class BratsGanError(Exception):
    """Anything brats_gan refuses or cannot do, said in one line."""


class UserError(BratsGanError):
    """Input or options a user can fix (a flag, a file, a store): printed as one line, exit status 2."""


def describe(err: BaseException, limit: int | None = None) -> str:
    """An exception as ``Type: message`` on one line (at most ``limit`` characters of the message)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:limit]}"


def one_line(err: BaseException) -> str:
    """An error no check foresaw, in one line, with the way to its traceback."""
    return f"{describe(err, 500)} (run with -v for the traceback)"
