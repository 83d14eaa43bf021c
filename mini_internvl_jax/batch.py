"""The training-batch contract: the one place that names a batch's fields, dtypes and axes.

The data pipeline produces micro-batches of these fields, the trainer stacks `grad_accum` of
them on a leading axis A and places them on the mesh, the loss reads `labels`/`loss_weights`,
and the model reads the rest. A new field is added to `Batch` (and produced by the pipeline);
`FIELDS`, shapes, dtypes and shardings follow from it. `BatchSpec` is a run's batch geometry.
This module is numpy-only (the data pipeline imports it); placing a batch on a mesh is
`placement.py`'s.

Per-step shapes (B = rows per micro-batch, S = seq_len, T = tile slots, C/H/W = tile pixels):

  input_ids     int32   [A, B, S]        pad = tokenizer pad id (or 0)
  labels        int32   [A, B, S]        already shifted: labels[t] = id of token t+1 of the same
                                         sample if it is trained, else IGNORE_INDEX (a sample's
                                         last token is always IGNORE_INDEX)
  loss_weights  float32 [A, B, S]        0 where labels == IGNORE_INDEX, else 1, 1/n or 1/sqrt(n)
  positions     int32   [A, B, S]        0.. per packed sample, 0 on padding
  segment_ids   int32   [A, B, S]        1, 2, ... per packed sample in a row, 0 = padding
  pixel_values  float32 [A, T, C, H, W]  ImageNet-normalised tiles: row 0's samples in order
                                         (each image's tiles, thumbnail last), then row 1, ...;
                                         padding last
  image_flags   int32   [A, T]           1 real tile, 0 padding (or InternVL's text-only tile)

A host's pipeline also emits `stats_*` counters (int32 scalars) beside the fields; they are
summed on the host and never enter the step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
from jaxtyping import Float, Int

if TYPE_CHECKING:
    import jax

# Target of a token that is not trained (Hugging Face's CrossEntropyLoss ignore_index).
IGNORE_INDEX = -100
# Host-side counters in a pipeline batch start with this; they are not batch fields.
STATS_PREFIX = "stats_"


@dataclass(frozen=True)
class Field:
    """dtype, logical axes per dim after the leading grad-accum axis, and meaning."""

    dtype: type[np.generic]  # the numpy scalar type (np.int32, np.float32)
    axes: tuple[str, ...]  # logical names; those without a sharding rule stay replicated
    doc: str


def _field(dtype: type[np.generic], axes: tuple[str, ...], doc: str) -> Any:
    return dataclasses.field(metadata={"field": Field(dtype, axes, doc)})


# What a Batch's fields hold: host arrays, global jax.Arrays, their ShapeDtypeStructs or their
# NamedShardings -- one structure for all.
Leaf = TypeVar("Leaf")


@dataclass(frozen=True)
class Batch(Generic[Leaf]):
    """One step's batch (A micro-batches); the one source of the field table `FIELDS`.
    `placement.py` registers it as a pytree, so the jitted step takes it whole."""

    input_ids: Int[jax.Array, "A B S"] = _field(np.int32, ("batch", "length"), "token ids")
    labels: Int[jax.Array, "A B S"] = _field(
        np.int32, ("batch", "length"), "shifted next-token targets, IGNORE_INDEX where untrained")
    loss_weights: Float[jax.Array, "A B S"] = _field(
        np.float32, ("batch", "length"), "per-token loss weight")
    positions: Int[jax.Array, "A B S"] = _field(
        np.int32, ("batch", "length"), "RoPE positions, restarting per sample")
    segment_ids: Int[jax.Array, "A B S"] = _field(
        np.int32, ("batch", "length"), "packed sample per token, 0 = padding")
    pixel_values: Float[jax.Array, "A T C H W"] = _field(
        np.float32, ("tiles", "channels", "height", "width"), "normalised image tiles")
    image_flags: Int[jax.Array, "A T"] = _field(np.int32, ("tiles",), "1 real tile, 0 padding")

    @classmethod
    def of(cls, arrays: dict[str, Any]) -> Batch:
        """The contract's fields of a dict (a pipeline batch's `stats_*` counters left out)."""
        return cls(**{k: arrays[k] for k in BATCH_KEYS})

    def items(self):
        return ((k, getattr(self, k)) for k in BATCH_KEYS)


FIELDS: dict[str, Field] = {f.name: f.metadata["field"] for f in dataclasses.fields(Batch)}
BATCH_KEYS: tuple[str, ...] = tuple(FIELDS)
BATCH_DTYPES: dict[str, type[np.generic]] = {k: f.dtype for k, f in FIELDS.items()}


@dataclass(frozen=True)
class BatchSpec:
    """A run's batch geometry: rows per micro-batch, tokens per row, tile slots per
    micro-batch, tile size and channels, micro-batches per step, image tokens per tile."""

    rows: int
    seq_len: int
    tiles: int
    image_size: int
    channels: int
    grad_accum: int
    num_image_tokens: int

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        """Global shapes of one step's batch (all hosts, all micro-batches)."""
        size = {"batch": self.rows, "length": self.seq_len, "tiles": self.tiles,
                "channels": self.channels, "height": self.image_size,
                "width": self.image_size}
        return {k: (self.grad_accum, *(size[a] for a in f.axes)) for k, f in FIELDS.items()}

    def per_host(self, n: int) -> BatchSpec:
        """One of `n` hosts' part: its rows and tile slots (every host gets whole ones)."""
        if self.rows % n or self.tiles % n:
            raise ValueError(f"micro-batch of {self.rows} rows (batch_size / grad_accum) and "
                             f"max_tiles {self.tiles} must both be multiples of the {n} "
                             "processes")
        return dataclasses.replace(self, rows=self.rows // n, tiles=self.tiles // n)
