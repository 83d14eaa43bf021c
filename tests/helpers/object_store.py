"""An in-memory `gs://` for tests: fsspec's MemoryFileSystem registered under the gs/gcs
protocols, so etils.epath's fsspec backend serves `gs://bucket/...` paths offline. Like an object
store (and unlike a local disk) it has no atomic folder rename."""

from __future__ import annotations

from pathlib import Path

import fsspec
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem


class MemoryGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        """`gs://bucket/key` -> `bucket/key`, as gcsfs names objects."""
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return path.rstrip("/")


def install() -> None:
    """Routes gs:// to a fresh, empty in-memory store."""
    for name in MemoryGCS.protocol:
        fsspec.register_implementation(name, MemoryGCS, clobber=True)
    MemoryGCS.store.clear()
    MemoryGCS.pseudo_dirs[:] = [""]


def upload(local: Path, remote: str) -> None:
    """Copies a local tree to the store."""
    for f in sorted(Path(local).rglob("*")):
        if f.is_file():
            dest = epath.Path(remote) / f.relative_to(local).as_posix()
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())


def download(remote: str, local: Path) -> list[str]:
    """Copies a tree from the store to `local`; returns the relative file names."""
    fs = fsspec.filesystem("gs")
    root = MemoryGCS._strip_protocol(remote)
    names = []
    for key in sorted(fs.find(root)):
        rel = key[len(root) + 1:]
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(fs.cat_file(key))
        names.append(rel)
    return names


def local_names(local: Path) -> list[str]:
    return sorted(f.relative_to(local).as_posix() for f in Path(local).rglob("*") if f.is_file())




def failing_at(upload, n: int):
    """`upload` whose `n`-th call fails as a dropped connection would: an upload cut off."""
    calls = []

    def flaky(src, dest):
        calls.append(dest)
        if len(calls) == n:
            raise OSError("connection reset")
        upload(src, dest)

    return flaky
