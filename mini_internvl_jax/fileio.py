"""Temp-then-rename writes: an error or crash never leaves a partial file or folder in place.

Temporaries are hidden siblings of the target (`.NAME.tmp-*`), so the final rename stays on one
file system and is atomic.

Object stores (`gs://`, `s3://`, ... through etils.epath) have no atomic rename: there a folder is
staged in a local temporary folder (so every writer, orbax and safetensors included, writes
local files), uploaded, and then marked complete by a last, empty `COMMIT_MARKER` object; a
folder without it is an interrupted write (`is_committed`). One object's upload is atomic
already, so a single file is staged locally and uploaded in one piece.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from etils import epath

COMMIT_MARKER = ".mivl_committed"
_COPY_CHUNK = 1 << 24


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI (`gs://bucket/...`): a store where rename is not atomic."""
    return "://" in os.fspath(path)


def is_committed(folder: str | os.PathLike) -> bool:
    """Whether a folder written by `atomic_folder` is complete (remote: has its marker)."""
    if is_remote(folder):
        return (epath.Path(folder) / COMMIT_MARKER).exists()
    return Path(folder).is_dir()


def upload_file(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copies a local file to any epath destination (one object on a store), streaming."""
    with Path(src).open("rb") as fin, epath.Path(dest).open("wb") as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)


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
        for f in sorted(tmp.rglob("*")):
            dest = out / f.relative_to(tmp).as_posix()
            if f.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            else:
                upload_file(f, dest)
        (out / COMMIT_MARKER).write_bytes(b"")
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
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
    except BaseException:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
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
