"""All-or-nothing output folders: build in a hidden sibling, rename into place at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from mini_internvl_jax.convert.errors import ConversionError


def check_output(out: Path, overwrite: bool) -> None:
    """Fails early, before any work, if `out` exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"output folder {out} already exists; choose a new path or pass "
                              "--overwrite")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output path {out} exists and is not a folder")


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder that becomes `out` only if the block succeeds.

    On any error the temporary folder is removed and an existing `out` is left untouched; with
    `overwrite`, the old `out` is swapped out by rename and deleted only after the new one is in.
    """
    out = Path(out).absolute()
    check_output(out, overwrite)
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
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
