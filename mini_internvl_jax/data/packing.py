"""Greedy first-fit packing of samples into static-shape batches, as a Grain IterDataset.

A batch has B rows of S tokens and one buffer of T tiles. Each sample goes whole into the
first row with room for its tokens (and its tiles, within the batch buffer and the optional
per-row cap); a sample is never split. Tiles are laid out in token order: row 0's samples
left to right, then row 1, ...; padding tiles (flag 0) fill the end. That is the order in
which the model hands vision tokens to `<IMG_CONTEXT>` positions.

Samples that fit nowhere wait (up to `lookahead` of them) while later samples keep filling
the batch; waiting samples go first into the next batch. The iterator state is the parent
state before the oldest waiting sample plus the offsets of the samples after it that were
already used, so a restore replays exactly the same batches.

A run of rejected records (dropped as too long, too many tiles, nothing supervised, or bad)
with no sample placed in between is bounded: once it covers a whole epoch of this shard (or
`max_consecutive_skips` records) no sample can ever fit, and the iterator raises a DataError
with the counts by reason instead of spinning forever.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import grain
import numpy as np

from mini_internvl_jax.batch import BATCH_DTYPES, IGNORE_INDEX, STATS_PREFIX
from mini_internvl_jax.data.errors import BAD_REASONS, DataError, Skipped
from mini_internvl_jax.data.processing import Sample
from mini_internvl_jax.data.tiling import normalize_tiles

log = logging.getLogger(__name__)

# Host-side per-batch counters; drop these keys before putting a batch on devices.
STATS_KEYS = tuple(f"{STATS_PREFIX}num_{k}" for k in ("samples", "truncated", "dropped", "bad"))


@dataclasses.dataclass(frozen=True)
class BatchGeometry:
    batch_size: int  # rows
    seq_len: int  # tokens per row
    max_tiles: int  # tile buffer per batch
    image_size: int
    pad_id: int
    image_token_id: int
    num_image_tokens: int
    max_tiles_per_row: int | None = None
    max_samples_per_row: int | None = None

    @property
    def row_tiles(self) -> int:
        return min(self.max_tiles, self.max_tiles_per_row or self.max_tiles)


class BatchBuilder:
    """First-fit placement into one batch, then `build()` for the arrays."""

    def __init__(self, geom: BatchGeometry):
        self.geom = geom
        self.rows: list[list[Sample]] = [[] for _ in range(geom.batch_size)]
        self._row_len = [0] * geom.batch_size
        self._row_tiles = [0] * geom.batch_size
        self._tiles = 0

    @property
    def num_samples(self) -> int:
        return sum(len(r) for r in self.rows)

    def add(self, s: Sample) -> bool:
        """Places `s` in the first row it fits; False if none has room."""
        n, t, g = len(s), len(s.tiles), self.geom
        if self._tiles + t > g.max_tiles:
            return False
        cap = g.max_samples_per_row or g.seq_len
        for b in range(g.batch_size):
            if (self._row_len[b] + n <= g.seq_len and self._row_tiles[b] + t <= g.row_tiles
                    and len(self.rows[b]) < cap):
                self.rows[b].append(s)
                self._row_len[b] += n
                self._row_tiles[b] += t
                self._tiles += t
                return True
        return False

    def build(self) -> dict[str, np.ndarray]:
        """Token arrays plus the batch's tiles still as uint8 (`tiles`, `tile_flags`);
        `finalize_batch` turns those into the contract's float buffer. Keeping tiles small
        until then makes handing batches between processes ~7x cheaper."""
        g = self.geom
        shape = (g.batch_size, g.seq_len)
        fill = {"input_ids": g.pad_id, "labels": IGNORE_INDEX}
        out = {k: np.full(shape, fill.get(k, 0), dtype=BATCH_DTYPES[k])
               for k in ("input_ids", "labels", "loss_weights", "positions", "segment_ids")}
        tiles, flags = [], []
        for b, row in enumerate(self.rows):
            off = 0
            for seg, s in enumerate(row, start=1):
                sl = slice(off, off + len(s))
                out["input_ids"][b, sl] = s.input_ids
                out["labels"][b, sl] = s.labels
                out["loss_weights"][b, sl] = s.loss_weights
                out["positions"][b, sl] = np.arange(len(s), dtype=np.int32)
                out["segment_ids"][b, sl] = seg
                if len(s.tiles):
                    tiles.append(s.tiles)
                    flags.append(s.tile_flags)
                off += len(s)
        size = g.image_size
        out["tiles"] = (np.concatenate(tiles) if tiles
                        else np.zeros((0, size, size, 3), dtype=np.uint8))
        out["tile_flags"] = (np.concatenate(flags) if flags else np.zeros(0, dtype=np.int32))
        n_ctx = int(np.count_nonzero(out["input_ids"] == g.image_token_id))
        n_real = int(out["tile_flags"].sum())
        if n_ctx != g.num_image_tokens * n_real:
            raise DataError(f"batch has {n_ctx} image-context tokens for {n_real} tiles x "
                                 f"{g.num_image_tokens}; the tokenizer's <IMG_CONTEXT> id or "
                                 "num_image_tokens does not match the samples")
        return out


def finalize_batch(batch: dict[str, np.ndarray], geom: BatchGeometry) -> dict[str, np.ndarray]:
    """Compact batch -> contract batch: tiles normalised into the [T, 3, H, W] float32
    buffer in order, padding tiles (zeros, flag 0) at the end. Arrays come out as plain
    numpy (batches from worker processes arrive in shared memory)."""
    tiles, flags = batch["tiles"], batch["tile_flags"]
    batch = {k: np.array(v) for k, v in batch.items() if k not in ("tiles", "tile_flags")}
    size = geom.image_size
    pixel_values = np.zeros((geom.max_tiles, 3, size, size), dtype=BATCH_DTYPES["pixel_values"])
    normalize_tiles(tiles, out=pixel_values[:len(tiles)])
    image_flags = np.zeros(geom.max_tiles, dtype=BATCH_DTYPES["image_flags"])
    image_flags[:len(flags)] = flags
    batch["pixel_values"] = pixel_values
    batch["image_flags"] = image_flags
    return batch


@dataclasses.dataclass
class _Waiting:
    seq: int
    parent_state: Any
    sample: Sample


class PackIterator(grain.DatasetIterator):
    """Iterator of `PackIterDataset`; state = parent state before the oldest waiting sample
    plus which later samples were already used (see the module docstring)."""

    builder_cls: type[BatchBuilder] = BatchBuilder  # preference pairs pack with their own

    def __init__(self, parent: grain.DatasetIterator, geom: BatchGeometry, *, lookahead: int,
                 max_bad_fraction: float, bad_check_min_samples: int,
                 max_consecutive_skips: int = 1000):
        super().__init__(parent)
        self._geom = geom
        self._max_run = max_consecutive_skips
        self._run: collections.Counter = collections.Counter()  # rejections since a sample
        self._lookahead = lookahead
        self._max_bad = max_bad_fraction
        self._bad_min = bad_check_min_samples
        self._waiting: list[_Waiting] = []
        self._used: set[int] = set()  # seqs consumed after the oldest waiting sample
        self._seq = 0  # sequence number of the next parent element
        self._exhausted = False
        self._counts: collections.Counter = collections.Counter()
        self._reported: collections.Counter = collections.Counter()

    def _skip(self, x: Skipped) -> None:
        kind = "bad" if x.is_bad else "dropped"
        self._counts[kind] += 1
        self._counts[f"{kind}/{x.reason}"] += 1
        level = logging.WARNING if kind == "bad" else logging.INFO
        log.log(level, "skipping %s sample %s:%d (%s): %s", kind, x.source, x.line, x.reason,
                x.detail)
        self._run[x.reason] += 1
        if self._run.total() >= self._max_run:
            g = self._geom
            rejected = ", ".join(f"{k}: {v}" for k, v in self._run.most_common())
            if all(r in BAD_REASONS for r in self._run):  # the data, not the geometry
                advice = ("the records themselves are unusable: check data.meta_path, the "
                          "image root and the files (mivl-validate-data lists every one)")
            else:
                advice = (f"raise seq_len ({g.seq_len}) or max_tiles ({g.max_tiles}), or lower "
                          "data.max_dynamic_patch")
            raise DataError(
                f"no record fits the batch: the last {self._run.total()} records in a row were "
                f"all rejected ({rejected}; last: {x.source}:{x.line} {x.detail}); {advice}")
        total = self._counts["samples"] + self._counts["dropped"] + self._counts["bad"]
        if total >= self._bad_min and self._counts["bad"] > self._max_bad * total:
            reasons = {k.split("/", 1)[1]: v for k, v in sorted(self._counts.items())
                       if k.startswith("bad/")}
            raise DataError(
                f"{self._counts['bad']} of {total} records were bad "
                f"({self._counts['bad'] / total:.1%} > max_bad_fraction {self._max_bad}); "
                f"by reason: {reasons}; last: {x.source}:{x.line} {x.reason}: {x.detail}")

    def __next__(self) -> dict[str, np.ndarray]:
        builder = self.builder_cls(self._geom)
        queue, self._waiting = self._waiting, []
        failed: list[_Waiting] = []
        i = 0
        while len(failed) <= self._lookahead:
            if i < len(queue):
                w = queue[i]
                i += 1
            else:
                if self._exhausted:
                    break
                state = self._parent.get_state()
                try:
                    x = next(self._parent)
                except StopIteration:
                    self._exhausted = True
                    break
                seq = self._seq
                self._seq += 1
                if seq in self._used:  # replaying after a restore: already in a batch
                    continue
                if isinstance(x, Skipped):
                    self._skip(x)
                    self._used.add(seq)
                    continue
                w = _Waiting(seq, state, x)
                self._run.clear()
            if builder.add(w.sample):
                self._used.add(w.seq)
            elif builder.num_samples == 0:
                s = w.sample
                raise DataError(f"sample {s.source}:{s.line} ({len(s)} tokens, {len(s.tiles)} "
                                f"tiles) cannot fit an empty batch {self._geom}")
            else:
                failed.append(w)
        self._waiting = sorted(failed + queue[i:], key=lambda w: w.seq)
        oldest = self._waiting[0].seq if self._waiting else self._seq
        self._used = {s for s in self._used if s > oldest}
        if builder.num_samples == 0:
            raise StopIteration
        batch = builder.build()
        self._counts["samples"] += builder.num_samples
        self._counts["truncated"] += sum(s.truncated for r in builder.rows for s in r)
        for key in ("samples", "truncated", "dropped", "bad"):
            batch[f"{STATS_PREFIX}num_{key}"] = np.asarray(
                self._counts[key] - self._reported[key], dtype=np.int32)
        self._reported = collections.Counter(self._counts)
        return batch

    def get_state(self) -> dict[str, Any]:
        if self._waiting:
            anchor, parent_state = self._waiting[0].seq, self._waiting[0].parent_state
        else:
            anchor, parent_state = self._seq, self._parent.get_state()
        return {
            "parent": parent_state,
            "used_after": sorted(s - anchor for s in self._used if s > anchor),
            "stats": dict(self._counts),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._waiting = []
        self._seq = 0
        self._used = set(state["used_after"])
        self._exhausted = False
        self._counts = collections.Counter(state["stats"])
        self._run.clear()
        self._reported = collections.Counter(state["stats"])


class PackIterDataset(grain.IterDataset):
    """Packs `Sample`s (skipping and counting `Skipped`s) into compact batches (see
    `BatchBuilder.build`; map them through `finalize_batch`)."""

    def __init__(self, parent: grain.IterDataset, geom: BatchGeometry, *, lookahead: int,
                 max_bad_fraction: float, bad_check_min_samples: int,
                 max_consecutive_skips: int = 1000):
        super().__init__(parent)
        self._geom = geom
        self._lookahead = lookahead
        self._max_bad_fraction = max_bad_fraction
        self._bad_check_min_samples = bad_check_min_samples
        self._max_consecutive_skips = max_consecutive_skips

    def __iter__(self) -> PackIterator:
        return PackIterator(self._parent.__iter__(), self._geom, lookahead=self._lookahead,
                            max_bad_fraction=self._max_bad_fraction,
                            bad_check_min_samples=self._bad_check_min_samples,
                            max_consecutive_skips=self._max_consecutive_skips)

    def __str__(self) -> str:
        return f"PackIterDataset({self._geom})"
