"""The training-batch contract: the one place that names a batch's fields, dtypes and axes.

The data pipeline produces micro-batches of these fields, the trainer stacks `grad_accum` of
them on a leading axis A and places them on the mesh, the loss reads `labels`/`loss_weights`,
and the model reads the rest. A new field is added to `FIELDS` (and produced by the pipeline);
shapes, dtypes and shardings follow from the table.

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

from dataclasses import dataclass
from typing import TypedDict

import jax
import numpy as np
from jax.sharding import NamedSharding
from jaxtyping import Float, Int

from mini_internvl_jax.sharding import logical_to_spec

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


FIELDS: dict[str, Field] = {
    "input_ids": Field(np.int32, ("batch", "length"), "token ids"),
    "labels": Field(np.int32, ("batch", "length"),
                    "shifted next-token targets, IGNORE_INDEX where untrained"),
    "loss_weights": Field(np.float32, ("batch", "length"), "per-token loss weight"),
    "positions": Field(np.int32, ("batch", "length"), "RoPE positions, restarting per sample"),
    "segment_ids": Field(np.int32, ("batch", "length"), "packed sample per token, 0 = padding"),
    "pixel_values": Field(np.float32, ("tiles", "channels", "height", "width"),
                          "normalised image tiles"),
    "image_flags": Field(np.int32, ("tiles",), "1 real tile, 0 padding"),
}
BATCH_KEYS: tuple[str, ...] = tuple(FIELDS)
BATCH_DTYPES: dict[str, type[np.generic]] = {k: f.dtype for k, f in FIELDS.items()}


class Batch(TypedDict):
    """One step's batch (A micro-batches), for readers and type checkers."""

    input_ids: Int[jax.Array, "A B S"]
    labels: Int[jax.Array, "A B S"]
    loss_weights: Float[jax.Array, "A B S"]
    positions: Int[jax.Array, "A B S"]
    segment_ids: Int[jax.Array, "A B S"]
    pixel_values: Float[jax.Array, "A T C H W"]
    image_flags: Int[jax.Array, "A T"]


def global_shapes(*, grad_accum: int, rows: int, seq_len: int, tiles: int, image_size: int,
                  channels: int) -> dict[str, tuple[int, ...]]:
    """Global shapes of one step's batch (all hosts, all micro-batches)."""
    size = {"batch": rows, "length": seq_len, "tiles": tiles, "channels": channels,
            "height": image_size, "width": image_size}
    return {k: (grad_accum, *(size[a] for a in f.axes)) for k, f in FIELDS.items()}


def batch_shardings(mesh, shapes: dict[str, tuple[int, ...]]) -> dict[str, NamedSharding]:
    """Rows and tiles over (data, fsdp) by the logical rules; the grad-accum axis unsharded."""
    return {k: NamedSharding(mesh, logical_to_spec((None, *FIELDS[k].axes), shape, mesh))
            for k, shape in shapes.items()}


def to_global(batch: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    """Per-host arrays -> global arrays (hosts' rows and tiles concatenated in process order)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}
