"""How the command-line tools fail on ordinary mistakes: one line on stderr, no traceback.

`user_error(e)` turns the exceptions a user can cause (a bad config or data file, an existing
output, a full or read-only disk, a damaged checkpoint) into that line, or returns None for a
real bug, which keeps its traceback. Disk problems name the path and say "no space left" or
"not writable", also when Orbax / TensorStore report them inside their own error text.
"""

from __future__ import annotations

import errno
import re
import sys
from collections.abc import Callable

# Exit code of a refused command (bad input, existing output, unusable checkpoint, full disk).
EXIT_USER_ERROR = 2

_NO_SPACE = re.compile(r"no space left on device|ENOSPC|disk quota exceeded", re.IGNORECASE)
_NOT_WRITABLE = re.compile(r"read-only file system|permission denied|EROFS|EACCES",
                           re.IGNORECASE)
_PATH_IN_TEXT = re.compile(r"(?:local file|file|path|directory)\s+\"?'?(/[^\"' :,]+)")


def _first_line(text: str, limit: int = 400) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit] + " ..."


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
    from mini_internvl_jax.configlib import ConfigError

    for cause in (e, e.__cause__, e.__context__):
        if cause is not None and (line := disk_error(cause)):
            return line
    if isinstance(e, ConfigError | FileExistsError | FileNotFoundError | NotADirectoryError
                  | IsADirectoryError | PermissionError):
        return _first_line(str(e))
    for module, name in (("mini_internvl_jax.data.errors", "DataError"),
                         ("mini_internvl_jax.convert.errors", "ConversionError"),
                         ("mini_internvl_jax.train.checkpoint", "CheckpointError"),
                         ("mini_internvl_jax.train.init", "InitError"),
                         ("mini_internvl_jax.infer.evaluation", "EvalDataError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
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

    hook._drops_closed_loop = True
    sys.unraisablehook = hook


def run_cli(main: Callable[[], int | None]) -> int:
    """Calls `main`; a user error becomes `error: ...` on stderr and exit code 2, Ctrl-C 130."""
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs right here
        line = user_error(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
