"""How the package fails on ordinary mistakes: one line on stderr, no traceback.

`UserError` is the common root of the errors a user can fix (a bad config or data file, an
unusable checkpoint, a weights folder that cannot be converted); each layer subclasses it for its
own domain, so the commands recognise every one of them without importing the layers above.
`user_error(e)` turns those, an existing output, a missing input and a full or read-only disk into
that line, or returns None for a real bug, which keeps its traceback. Disk problems name the path
and say "no space left" or "not writable", also when Orbax / TensorStore report them inside their
own error text.
"""

from __future__ import annotations

import errno
import re
import sys

# Exit code of a refused command (bad input, existing output, unusable checkpoint, full disk).
EXIT_USER_ERROR = 2

_NO_SPACE = re.compile(r"no space left on device|ENOSPC|disk quota exceeded", re.IGNORECASE)
_NOT_WRITABLE = re.compile(r"read-only file system|permission denied|EROFS|EACCES",
                           re.IGNORECASE)
_PATH_IN_TEXT = re.compile(r"(?:local file|file|path|directory)\s+\"?'?(/[^\"' :,]+)")


class UserError(Exception):
    """A mistake the user can fix; the message names the file or field and what was expected."""


class MissingDependencyError(UserError, ModuleNotFoundError):
    """An optional package a feature needs is not installed; the message says what to install."""


def _first_line(text: str, limit: int = 400) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit] + " ..."


def first_line(e: BaseException | None, limit: int = 300) -> str:
    """TensorStore errors carry a multi-kilobyte spec; the first part says what went wrong."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def disk_error(e: BaseException, where: str | None = None) -> str | None:
    """The one line for a full or read-only destination, or None if `e` is not one."""
    code = getattr(e, "errno", None)
    path = getattr(e, "filename", None) or where
    text = str(e)
    if not path:
        m = _PATH_IN_TEXT.search(text)
        path = m.group(1) if m else "the destination"
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and _NO_SPACE.search(text)):
        return f"no space left on device writing {path}; free some space or choose another place"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or (
            code is None and _NOT_WRITABLE.search(text)):
        return f"{path} is not writable ({_first_line(getattr(e, 'strerror', None) or text)})"
    if code == errno.ENOTDIR:
        return f"{path} is not writable (a part of the path is a file, not a folder)"
    return None


def user_error(e: BaseException) -> str | None:
    """The one-line message for a mistake the user can fix, or None for a bug."""
    for cause in (e, e.__cause__, e.__context__):
        if cause is not None and (line := disk_error(cause)):
            return line
    if isinstance(e, UserError | FileExistsError | FileNotFoundError | NotADirectoryError
                  | IsADirectoryError | PermissionError):
        return _first_line(str(e))
    return None


def silence_abandoned_reads() -> None:
    """After a failed Orbax read, drops the "Event loop is closed" reports of its abandoned
    TensorStore reads (they finish after Orbax closed its event loop and are harmless); every
    other unraisable exception still reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return

    def hook(unraisable):
        v = unraisable.exc_value
        if isinstance(v, RuntimeError) and str(v) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
