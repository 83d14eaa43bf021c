"""NaN / Inf weights are reported by tensor name when a checkpoint is converted or loaded.

A damaged or badly saved checkpoint otherwise shows up only as garbage chat output or as the
first training steps all being skipped as non-finite.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from mini_internvl_jax.convert.errors import CheckpointReadError
from mini_internvl_jax.convert.params import path_str


class NonFiniteWeightsError(CheckpointReadError):
    """Some weights hold NaN or Inf; the message names the tensors and counts."""


def count_nonfinite(array) -> tuple[int, int]:
    """(NaN count, Inf count) of a host array; (0, 0) for integer or bool arrays."""
    a = np.asarray(array)
    if a.dtype.kind not in "fc" and "float" not in a.dtype.name:
        return 0, 0
    if np.isfinite(a).all():
        return 0, 0
    return int(np.isnan(a).sum()), int(np.isinf(a).sum())


def describe(bad: Iterable[tuple[str, int, int]], where: str, limit: int = 6) -> str:
    bad = list(bad)
    shown = ", ".join(f"{n!r} ({nan} NaN, {inf} Inf)" for n, nan, inf in bad[:limit])
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return (f"{where}: {len(bad)} tensor(s) hold NaN/Inf values: {shown}{more}; the weights are "
            "damaged (re-download or re-export them)")


@jax.jit
def _counts(arrays):
    return {k: (jnp.isnan(a).sum(), jnp.isinf(a).sum()) for k, a in arrays.items()}


def check_finite_arrays(arrays: dict, where: str) -> None:
    """Raises NonFiniteWeightsError naming every floating array (by dotted path) with NaN/Inf.

    One jitted reduction per array on its own devices; only two scalars per array come back.
    """
    floats = {path_str(p): a for p, a in arrays.items()
              if jnp.issubdtype(a.dtype, jnp.inexact)}
    counts = jax.device_get(_counts(floats))
    bad = [(k, int(n), int(i)) for k, (n, i) in sorted(counts.items()) if n or i]
    if bad:
        raise NonFiniteWeightsError(describe(bad, where))
