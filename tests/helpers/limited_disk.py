"""Real write failures for tests: a full disk (a small tmpfs), a file size limit (RLIMIT_FSIZE,
what `ulimit -f` sets) and a read-only folder (a tmpfs remounted read-only).

Mounting needs root with CAP_SYS_ADMIN (CI and the dev machines have it). Where mounting is not
permitted, a full disk falls back to the file size limit (EFBIG instead of ENOSPC) and a
read-only folder to a folder without write permission (a non-root user) or to a file where the
folder should be (root ignores permissions): the failure stays real, never a monkeypatch, and the
test never skips. `kind` says which one a test met, so it can expect the matching message.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

BIG = 256 << 20  # the tmpfs size outside `full()`: room for anything a test writes


def _mount(*args: str) -> bool:
    p = subprocess.run(["mount", *args], capture_output=True, text=True)
    return p.returncode == 0


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class LimitedDisk:
    """A folder whose writes can be made to fail: `full(headroom)` leaves `headroom` bytes.

    kind "tmpfs": the folder is a tmpfs, resized to what it holds + headroom (ENOSPC).
    kind "rlimit": no mount permitted; this process (and the children it starts) may write no
    file larger than headroom bytes while `full` is active (EFBIG), anywhere.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.kind = "tmpfs" if _mount("-t", "tmpfs", "-o", f"size={BIG}", "tmpfs",
                                      str(self.path)) else "rlimit"

    @property
    def message(self) -> str:
        """The start of the one-line error this disk's failure should produce."""
        return "no space left on device" if self.kind == "tmpfs" else "file too large"

    @contextlib.contextmanager
    def full(self, headroom: int) -> Iterator[None]:
        if self.kind == "tmpfs":
            size = _used(self.path) + headroom
            assert _mount("-o", f"remount,size={size}", str(self.path))
            try:
                yield
            finally:
                assert _mount("-o", f"remount,size={BIG}", str(self.path))
            return
        with file_size_limit(headroom):
            yield

    def close(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@contextlib.contextmanager
def limited_disk(path: Path) -> Iterator[LimitedDisk]:
    disk = LimitedDisk(path)
    try:
        yield disk
    finally:
        disk.close()


@contextlib.contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """An existing, empty folder nobody can write into; yields the path to write under (the
    folder itself, or with root and no mount, a file standing where the folder should be)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if _mount("-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(path)):
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        return
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    shutil.rmtree(path)
    path.write_text("a file, not a folder\n")
    yield path


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """`ulimit -f` for this process: a write past nbytes fails with EFBIG (Python ignores the
    SIGXFSZ signal that would otherwise end the process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
