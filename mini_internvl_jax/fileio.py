"""Temp-then-rename writes: an error or crash never leaves a partial file or folder in place.

Temporaries are hidden siblings of the target (`.NAME.tmp-HOST-PID-TAG`), so the final rename
stays on one file system and is atomic. A run killed mid-write (kill -9, OOM) leaves its
temporary folder behind; the next `atomic_folder` into the same destination removes those whose
process is gone (and says so on stderr), so repeated kills never fill the disk.

Object stores (`gs://`, `s3://`, ... through etils.epath) have no atomic rename: there a folder is
staged in a local temporary folder (so every writer, orbax and safetensors included, writes
local files), uploaded, and then marked complete by a last, empty `COMMIT_MARKER` object; a
folder without it is an interrupted write (`is_committed`). One object's upload is atomic
already, so a single file is staged locally and uploaded in one piece.

Reading a folder from a store (`local_copy`) copies it to a local temporary folder first:
safetensors and torch read local files, and one copy per process serves every later reader. A
folder whose upload began (`UPLOAD_MARKER`, the first object written) but never got its commit
marker is refused (`check_complete`); a folder copied up by another tool has neither marker and
is read as it is.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from etils import epath

from mini_internvl_jax.errors import UserError, storage_error

# Temporaries named before owners were recorded count as stale once untouched this long.
_UNOWNED_STALE_S = 600


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _is_stale(tmp: Path, prefix: str) -> bool:
    parts = tmp.name[len(prefix):].split("-")
    if len(parts) >= 3 and parts[-2].isdigit():
        host, pid = "-".join(parts[:-2]), int(parts[-2])
        return host == socket.gethostname() and not _alive(pid)
    try:
        return time.time() - tmp.stat().st_mtime > _UNOWNED_STALE_S
    except OSError:
        return False


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def remove_stale_temporaries(out: str | os.PathLike) -> list[Path]:
    """Removes `.OUT.tmp-*` folders next to `out` left by killed runs; returns them."""
    out = Path(out).absolute()
    prefix = f".{out.name}.tmp-"
    if not out.parent.is_dir():
        return []
    stale = [p for p in out.parent.iterdir()
             if p.name.startswith(prefix) and p.is_dir() and _is_stale(p, prefix)]
    if stale:
        size = sum(_size(p) for p in stale)
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        print(f"removed {len(stale)} stale temporary folder(s) ({size / 1e9:.2f} GB) left next "
              f"to {out} by interrupted runs: {', '.join(p.name for p in stale)}",
              file=sys.stderr, flush=True)
    return stale


def remove_settled(path: str | os.PathLike, settle_s: float = 0.2, limit_s: float = 10.0
                   ) -> None:
    """Removes a folder a failed writer may still be writing into: after a failed Orbax save,
    TensorStore's abandoned writes finish on their own threads and recreate their folders, so
    the removal is repeated until the folder stays gone for `settle_s`."""
    path = Path(path)
    deadline = time.monotonic() + limit_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(settle_s)
        if not path.exists() or time.monotonic() > deadline:
            return


COMMIT_MARKER = ".mivl_committed"
UPLOAD_MARKER = ".mivl_uploading"
_COPY_CHUNK = 1 << 24
_COPY_THREADS = 8


class IncompleteFolderError(UserError, OSError):
    """A folder on a store whose upload was cut off; the message names it."""


def absolute_path(directory: str) -> epath.Path:
    """Orbax needs absolute paths; relative local ones resolve against the working directory
    (`gs://...` and other URLs are absolute already)."""
    path = epath.Path(directory)
    return path if "://" in str(directory) else epath.Path(path.absolute())


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI (`gs://bucket/...`): a store where rename is not atomic."""
    return "://" in os.fspath(path)


def is_committed(folder: str | os.PathLike) -> bool:
    """Whether a folder written by `atomic_folder` is complete (remote: has its marker)."""
    if is_remote(folder):
        return (epath.Path(folder) / COMMIT_MARKER).exists()
    return Path(folder).is_dir()


def check_complete(folder: str | os.PathLike) -> None:
    """Raises IncompleteFolderError for a folder on a store that `atomic_folder` began to upload
    and never committed (local folders are complete by construction)."""
    if not is_remote(folder):
        return
    root = epath.Path(folder)
    if (root / UPLOAD_MARKER).exists() and not (root / COMMIT_MARKER).exists():
        raise IncompleteFolderError(
            f"{folder} is incomplete: its upload was cut off ({UPLOAD_MARKER} without "
            f"{COMMIT_MARKER}); write it again")


def upload_file(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copies a local file to any epath destination (one object on a store), streaming."""
    with Path(src).open("rb") as fin, epath.Path(dest).open("wb") as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)


def download_file(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copies any epath file (an object on a store) to a local file, streaming."""
    with epath.Path(src).open("rb") as fin, Path(dest).open("wb") as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)


def _remote_files(root: epath.Path, under: str = "") -> Iterator[tuple[str, epath.Path]]:
    """(relative name, path) of every file below `root` (epath refuses `**` on stores)."""
    for child in sorted((root / under).iterdir() if under else root.iterdir(), key=str):
        rel = f"{under}/{child.name}" if under else child.name
        if child.is_dir():
            yield from _remote_files(root, rel)
        else:
            yield rel, child


_local_copies: dict[tuple, Path] = {}


def local_copy(folder: str | os.PathLike, only: tuple[str, ...] = ()) -> Path:
    """`folder` itself when local; for a store, a local copy of it (of its subfolders `only`,
    when given) in a temporary folder removed when the process exits. The copy keeps the
    folder's name (readers take the model name from it). Within a process a folder is copied
    once while its file names and sizes stay the same."""
    if not is_remote(folder):
        return Path(folder)
    uri = os.fspath(folder).rstrip("/")
    check_complete(uri)
    root = epath.Path(uri)
    if not root.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder on the store", uri)
    files = [(rel, p, p.stat().length) for part in (only or ("",))
             for rel, p in _remote_files(root, part) if rel not in (COMMIT_MARKER, UPLOAD_MARKER)]
    key = (uri, tuple((rel, size) for rel, _, size in files))
    if key in _local_copies:
        return _local_copies[key]
    parent = Path(tempfile.mkdtemp(prefix="mivl-copy-"))
    atexit.register(shutil.rmtree, parent, True)
    local = parent / root.name
    print(f"copying {uri} ({len(files)} files, {sum(f[2] for f in files) / 1e9:.2f} GB) to "
          f"{local}", file=sys.stderr, flush=True)
    for rel, _, _ in files:
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(_COPY_THREADS) as pool:
        list(pool.map(lambda f: download_file(f[1], local / f[0]), files))
    _local_copies[key] = local
    return local


@contextlib.contextmanager
def _staged_folder(out: epath.Path, overwrite: bool) -> Iterator[Path]:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.stage-"))
    try:
        yield tmp
        if out.exists():
            out.rmtree()
        out.mkdir(parents=True, exist_ok=True)
        (out / UPLOAD_MARKER).write_bytes(b"")
        for f in sorted(tmp.rglob("*")):
            dest = out / f.relative_to(tmp).as_posix()
            if f.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            else:
                upload_file(f, dest)
        (out / COMMIT_MARKER).write_bytes(b"")
        (out / UPLOAD_MARKER).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder that becomes `out` only if the block succeeds.

    On any error the temporary folder is removed and an existing `out` is left untouched. An
    existing `out` is replaced only with `overwrite` (else FileExistsError): it is moved aside
    by rename, moved back if the final rename fails, and deleted once the new folder is in.
    A remote `out` is staged locally, uploaded, then committed (see the module docstring).
    """
    if is_remote(out):
        with _staged_folder(epath.Path(out), overwrite) as staged:
            yield staged
        return
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        tag = uuid.uuid4().hex[:8]
        tmp = out.parent / f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}-{tag}"
        tmp.mkdir()
    except OSError as e:
        raise storage_error(e, out) or e from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
            raise
    except BaseException as e:
        err = storage_error(e, out)
        if err is not None:  # name `out`, not the temporary file that failed
            remove_settled(tmp)
            raise err from None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; it replaces `path` only if the block succeeds.
    For a remote `path` the temporary file is local and uploaded as one object."""
    if is_remote(path):
        fd, staged = tempfile.mkstemp(prefix="mivl-stage-")
        os.close(fd)
        try:
            yield Path(staged)
            dest = epath.Path(path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            upload_file(Path(staged), dest)
        finally:
            os.unlink(staged)
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise storage_error(e, path) or e from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if (err := storage_error(e, path)) is not None:
            raise err from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` (text as UTF-8) to `path` via a temporary file."""
    with atomic_file(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def check_creatable(folder: str | os.PathLike) -> None:
    """Raises NotADirectoryError / PermissionError naming `folder` when it cannot be created (or
    written) there, without creating anything: checked before minutes of model building that
    would end in the first write. URLs (`gs://...`) are left to their own library."""
    if "://" in str(folder):
        return
    path = Path(folder).absolute()
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file, not a folder",
                                     str(folder))
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            raise OSError(errno.EROFS, "Read-only file system", str(folder))
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        return


def check_writable_file(path: str | os.PathLike) -> None:
    """`check_creatable` for an output file: also refuses a folder standing at `path`. Checked
    before the work whose results the file would hold."""
    if is_remote(path):
        return
    if Path(path).is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; expected a file to write",
                                str(path))
    check_creatable(Path(path).absolute().parent)
