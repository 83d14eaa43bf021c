"""How the package fails on ordinary mistakes: one line on stderr, no traceback.

`UserError` is the common root of the errors a user can fix (a bad config or data file, an
unusable checkpoint, a weights folder that cannot be converted); each layer subclasses it for its
own domain, so the commands recognise every one of them without importing the layers above.
`user_error(e)` turns those, an existing output, a missing input and a full or read-only disk into
that line, or returns None for a real bug, which keeps its traceback. Disk problems name the path
and say "no space left", "file size limit" or "not writable", also when Orbax / TensorStore
report them inside their own error text. `quiet_storage_failures` keeps Orbax's own reports of
such a failure (log records with tracebacks, "Event loop is closed" traces of its abandoned
writes) off the terminal, so the one line is all the user sees.
"""

from __future__ import annotations

import errno
import logging
import re
import sys

# Exit code of a refused command (bad input, existing output, unusable checkpoint, full disk).
EXIT_USER_ERROR = 2

_NO_SPACE = re.compile(r"no space left on device|ENOSPC|disk quota exceeded", re.IGNORECASE)
_TOO_LARGE = re.compile(r"file too large|EFBIG|os_error_code='27'|OS error 27\b", re.IGNORECASE)
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


class StorageError(UserError, OSError):
    """A write that failed on a full, size-limited or read-only disk; names the destination."""


def disk_error(e: BaseException, where: str | None = None, *, name_where: bool = False
               ) -> str | None:
    """The one line for a full or read-only destination, or None if `e` is not one. The path
    named is the file the error names, else `where`; with `name_where`, `where` (the output the
    user asked for, not the temporary file inside it that failed)."""
    code = getattr(e, "errno", None)
    path = where if name_where and where else getattr(e, "filename", None) or where
    text = str(e)
    if not path:
        m = _PATH_IN_TEXT.search(text)
        path = m.group(1) if m else "the destination"
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and _NO_SPACE.search(text)):
        return f"no space left on device writing {path}; free some space or choose another place"
    if code == errno.EFBIG or (code is None and _TOO_LARGE.search(text)):
        return (f"file too large writing {path}: the file size limit (ulimit -f) or the file "
                "system's largest file was reached; raise the limit or choose another place")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or (
            code is None and _NOT_WRITABLE.search(text)):
        return f"{path} is not writable ({_first_line(getattr(e, 'strerror', None) or text)})"
    if code == errno.ENOTDIR:
        return f"{path} is not writable (a part of the path is a file, not a folder)"
    return None


def _chain(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions it was raised from or during (Orbax wraps TensorStore's)."""
    out: list[BaseException] = []
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop(0)
        if x is not None and not any(x is y for y in out) and len(out) < 16:
            out.append(x)
            todo += [x.__cause__, x.__context__]
    return out


def chained_disk_error(e: BaseException, where: str | None = None, *, name_where: bool = False
                       ) -> str | None:
    """`disk_error` of `e` or of any exception in its chain."""
    for cause in _chain(e):
        if line := disk_error(cause, where, name_where=name_where):
            return line
    return None


def storage_error(e: BaseException, dest: object) -> StorageError | None:
    """A StorageError naming `dest` if `e` (or its chain) is a disk failure, else None (also
    for other user errors, whose message is theirs). A StorageError of a file inside `dest` is
    renamed to `dest`: the user named that, not the temporary file inside it."""
    if isinstance(e, UserError) and not isinstance(e, StorageError):
        return None
    line = chained_disk_error(e, str(dest), name_where=True)
    return None if line is None else StorageError(line)


_GCS_MISSING = re.compile(r"gcsfs|google[ .-]cloud[ .-]storage|Google Storage", re.IGNORECASE)
GCS_EXTRA = "pip install 'mini-internvl-jax[gcs]'"


def missing_extra(e: BaseException) -> str | None:
    """The line for a gs:// path used without the `gcs` extra installed (etils / Orbax raise an
    ImportError that names gcsfs or google-cloud-storage), or None."""
    for cause in _chain(e):
        if isinstance(cause, ImportError) and _GCS_MISSING.search(
                f"{cause} {getattr(cause, 'name', '') or ''}"):
            return (f"gs:// paths need the `gcs` extra, which is not installed "
                    f"({_first_line(str(cause), 120)}): {GCS_EXTRA}")
    return None


def user_error(e: BaseException) -> str | None:
    """The one-line message for a mistake the user can fix, or None for a bug."""
    if isinstance(e, UserError):  # its message is written for the user already
        return _first_line(str(e))
    if line := missing_extra(e):
        return line
    if line := chained_disk_error(e):
        return line
    if isinstance(e, UserError | FileExistsError | FileNotFoundError | NotADirectoryError
                  | IsADirectoryError | PermissionError):
        return _first_line(str(e))
    return None


def _closed_loop(v: object) -> bool:
    return isinstance(v, RuntimeError) and str(v) == "Event loop is closed"


def silence_abandoned_reads() -> None:
    """After a failed Orbax read or write, drops the "Event loop is closed" reports of its
    abandoned TensorStore operations (they finish after Orbax closed its event loop and are
    harmless; they arrive as unraisable exceptions or through `sys.excepthook` from
    TensorStore's callbacks); every other exception still reaches the previous hooks."""
    previous = sys.unraisablehook
    if not getattr(previous, "_drops_closed_loop", False):
        def hook(unraisable):
            if not _closed_loop(unraisable.exc_value):
                previous(unraisable)

        hook._drops_closed_loop = True  # type: ignore[attr-defined]
        sys.unraisablehook = hook
    previous_except = sys.excepthook
    if not getattr(previous_except, "_drops_closed_loop", False):
        def excepthook(kind, value, tb):
            if not _closed_loop(value):
                previous_except(kind, value, tb)

        excepthook._drops_closed_loop = True  # type: ignore[attr-defined]
        sys.excepthook = excepthook


class _DropDiskFailureRecords(logging.Filter):
    """Drops Orbax's log records (and their tracebacks) about a full or unwritable disk: the
    command reports that failure itself, in one line naming the path."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            if chained_disk_error(record.exc_info[1]) is not None:
                return False
            text += f" {record.exc_info[1]}"
        return not (_NO_SPACE.search(text) or _TOO_LARGE.search(text)
                    or _NOT_WRITABLE.search(text))


_DISK_FILTER = _DropDiskFailureRecords()


def quiet_storage_failures() -> None:
    """Before Orbax writes: its reports of a full, size-limited or read-only disk (absl log
    records with tracebacks from its writer threads, "Event loop is closed" traces) stay off
    the terminal; the failure itself still raises and is reported as one line. Other records
    and exceptions pass."""
    for name in ("absl", "asyncio"):  # Orbax's logs; its writer tasks nobody awaited
        logger = logging.getLogger(name)
        if _DISK_FILTER not in logger.filters:
            logger.addFilter(_DISK_FILTER)
    silence_abandoned_reads()
