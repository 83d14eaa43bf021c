"""Conversion errors; each message names the file or tensor and what was expected."""

from __future__ import annotations

import os

from etils import epath

from mini_internvl_jax.errors import UserError


class ConversionError(UserError, ValueError):
    """Base class: a checkpoint or folder that cannot be converted as asked."""


class CheckpointMismatchError(ConversionError):
    """A checkpoint tensor is missing, unexpected or of the wrong shape."""


class CheckpointReadError(ConversionError):
    """A checkpoint or config file is missing, unreadable or corrupt."""


class UnknownArchitectureError(ConversionError):
    """config.json describes a model this project does not implement."""


def name_list(names, limit: int = 8) -> str:
    """`'a', 'b', ... and 3 more` for error messages about many tensors."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output(out: str | os.PathLike, overwrite: bool) -> None:
    """Fails early, before any work, if `out` (local or on a store) exists and may not be
    replaced."""
    path = epath.Path(out)
    if path.exists() and not overwrite:
        raise ConversionError(f"output folder {out} already exists; choose a new path or pass "
                              "--overwrite")
    if path.exists() and not path.is_dir():
        raise ConversionError(f"output path {out} exists and is not a folder")
