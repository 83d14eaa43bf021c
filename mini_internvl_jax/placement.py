"""Placing a training batch on the mesh: its shardings and host arrays -> global arrays.

The contract (`batch.py`) stays numpy-only so the data pipeline never imports jax; this module
is its jax side. Importing it registers `Batch` as a pytree (its fields are the leaves), so the
jitted step, `jax.tree.map` and `lax.scan` take a Batch whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding

from mini_internvl_jax.batch import BATCH_KEYS, FIELDS, Batch, BatchSpec
from mini_internvl_jax.sharding import logical_to_spec

jax.tree_util.register_dataclass(Batch, data_fields=list(BATCH_KEYS), meta_fields=[])


def batch_shardings(mesh, spec: BatchSpec) -> Batch[NamedSharding]:
    """Rows and tiles over (data, fsdp) by the logical rules; the grad-accum axis unsharded."""
    return Batch.of({k: NamedSharding(mesh, logical_to_spec((None, *FIELDS[k].axes), shape, mesh))
                     for k, shape in spec.global_shapes().items()})


def batch_abstract(spec: BatchSpec, shardings: Batch[NamedSharding]
                   ) -> Batch[jax.ShapeDtypeStruct]:
    """Shapes, dtypes and shardings of one step's batch (AOT compilation)."""
    return Batch.of({k: jax.ShapeDtypeStruct(shape, FIELDS[k].dtype,
                                             sharding=getattr(shardings, k))
                     for k, shape in spec.global_shapes().items()})


def to_global(host: Mapping[str, np.ndarray] | Batch, shardings: Batch[NamedSharding]
              ) -> Batch[jax.Array]:
    """Per-host arrays -> global arrays (hosts' rows and tiles concatenated in process order)."""
    arrays = dict(host.items())
    return Batch.of({k: jax.make_array_from_process_local_data(getattr(shardings, k), arrays[k])
                     for k in BATCH_KEYS})
