"""Preference pairs (InternVL's MPO data: `{image, question, chosen, rejected}` JSONL rows)
through the stage-2 pipeline: same meta JSON, sources, tiling and chat templates.

A pair is processed into two `Sample`s, question + chosen and question + rejected, whose image
tiles are cut once and shared. Packing places a pair whole (chosen then rejected, two segments
of one row) so both answers are in the same micro-batch, and its tiles enter the tile buffer
once: the rejected answer's image-context tokens read the same vision tokens as the chosen
one's (`vision_index`), so the ViT runs once per pair where InternVL's trainer runs it twice.

Besides the training-batch fields a preference micro-batch carries (P = pairs per micro-batch,
`max_samples_per_row` pairs per row):

  pair_slot     int32   [B, S]  2p+1 on the trained answer tokens of pair p's chosen answer,
                                2p+2 on its rejected answer's, 0 elsewhere (labels are shifted,
                                so a slot marks the position whose *target* is the answer token)
  vision_index  int32   [B, S]  index into the micro-batch's flat vision tokens [T * N] for
                                each image-context token, -1 elsewhere
  ref_logps     float32 [P, 2]  the reference model's (chosen, rejected) log-probs when they
                                were precomputed (`ref_logps` on the pair), else 0

and, host-side only, `pair_meta` (source, line) of each placed pair (the reference pass keys
the stored log-probs by it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, cast

import grain
import numpy as np

from mini_internvl_jax.batch import IGNORE_INDEX
from mini_internvl_jax.data.config import DataConfig
from mini_internvl_jax.data.errors import DataError, Skipped, SkipSample
from mini_internvl_jax.data.packing import (
    BatchBuilder,
    BatchGeometry,
    PackIterator,
    PackIterDataset,
    finalize_batch,
)
from mini_internvl_jax.data.pipeline import open_mixture, processed_records
from mini_internvl_jax.data.processing import Sample, SampleProcessor
from mini_internvl_jax.data.sources import Record
from mini_internvl_jax.data.tokenizer import IMG_CONTEXT, Tokenizer, load_tokenizer

PAIR_FIELDS: dict[str, tuple[type[np.generic], tuple[str, ...]]] = {
    "pair_slot": (np.int32, ("batch", "length")),
    "vision_index": (np.int32, ("batch", "length")),
    "ref_logps": (np.float32, ("pairs", "pair_side")),
}
# Pairs per row when data.max_samples_per_row is unset.
DEFAULT_PAIRS_PER_ROW = 4


@dataclasses.dataclass
class PairSample:
    """Two answers to one prompt, sharing `chosen.tiles`; `ref_logps` when precomputed."""

    chosen: Sample
    rejected: Sample
    ref_logps: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def tiles(self) -> np.ndarray:
        return self.chosen.tiles

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    @property
    def source(self) -> str:
        return self.chosen.source

    @property
    def line(self) -> int:
        return self.chosen.line


def pairs_per_micro_batch(rows: int, data_cfg: DataConfig) -> int:
    return rows * (data_cfg.max_samples_per_row or DEFAULT_PAIRS_PER_ROW)


def rejected_record(rec: Record) -> Record:
    """The same record with the rejected answer in place of the chosen one."""
    assert rec.rejected is not None
    conv = [rec.conversations[0], {"from": "gpt", "value": rec.rejected}]
    return dataclasses.replace(rec, conversations=conv, rejected=None)


def process_pair(processor: SampleProcessor, rec: Record, spec, plan_index: int) -> PairSample:
    """Both answers through the stage-2 processor; tiles are cut once (for the chosen one)."""
    if rec.rejected is None:
        raise SkipSample("not_a_pair", "preference data needs 'question', 'chosen' and "
                                       "'rejected' fields (found 'conversations')")
    chosen = processor.process(rec, spec, plan_index)
    rejected = processor.process(rejected_record(rec), spec, plan_index,
                                 reuse_tiles=(chosen.tiles, chosen.tile_flags))
    return PairSample(chosen, rejected)


class PairProcessor(SampleProcessor):
    """`SampleProcessor` for preference rows: (plan index, mixture index) -> PairSample."""

    ref_table: dict[tuple[str, int], tuple[float, float]] | None = None

    def __call__(self, item: tuple[int, int]) -> PairSample | Skipped:  # type: ignore[override]
        plan_index, mix_index = item
        d, i = self.mixture.locate(mix_index)
        src = self.mixture.sources[d]
        try:
            pair = process_pair(self, src.read(i), src.spec, plan_index)
        except SkipSample as e:
            return Skipped(e.reason, e.detail, src.name, src.line_of(i))
        if self.ref_table is not None:
            key = (pair.source, pair.line)
            if key not in self.ref_table:
                raise DataError(f"precomputed reference log-probs have no entry for "
                                f"{pair.source}:{pair.line}; recompute them for this data")
            pair.ref_logps = self.ref_table[key]
        return pair


class PairBatchBuilder(BatchBuilder):
    """First-fit of whole pairs (at most `max_samples_per_row` per row); `build()` adds the
    preference fields."""

    def __init__(self, geom: BatchGeometry):
        if geom.max_samples_per_row is None:
            geom = dataclasses.replace(geom, max_samples_per_row=DEFAULT_PAIRS_PER_ROW)
        super().__init__(geom)

    def build(self) -> dict[str, np.ndarray]:
        g = self.geom
        assert g.max_samples_per_row is not None
        pairs = cast(list[list[PairSample]], self.rows)
        # The base class lays out the segments: each answer is one.
        self.rows = [[s for p in row for s in (p.chosen, p.rejected)] for row in pairs]
        try:
            out = _build_segments(self, pairs)
        finally:
            self.rows = cast(list[list[Sample]], pairs)
        return out


def _build_segments(b: PairBatchBuilder, pairs: list[list[Any]]) -> dict[str, np.ndarray]:
    g = b.geom
    out = _base_build_without_tile_check(b)
    shape = (g.batch_size, g.seq_len)
    slot = np.zeros(shape, np.int32)
    vidx = np.full(shape, -1, np.int32)
    n_pairs = g.batch_size * (g.max_samples_per_row or DEFAULT_PAIRS_PER_ROW)
    ref = np.zeros((n_pairs, 2), np.float32)
    tiles, flags = [], []
    p, tile_base = 0, 0
    for r, row in enumerate(pairs):
        off = 0
        for pair in row:
            n_tiles = len(pair.tiles)
            if n_tiles:
                tiles.append(pair.tiles)
                flags.append(pair.chosen.tile_flags)
            for side, s in enumerate((pair.chosen, pair.rejected)):
                sl = slice(off, off + len(s))
                slot[r, sl] = np.where(s.labels != IGNORE_INDEX, 2 * p + 1 + side, 0)
                ctx = s.input_ids == g.image_token_id
                vidx[r, sl][ctx] = tile_base * g.num_image_tokens + np.arange(int(ctx.sum()))
                off += len(s)
            if pair.ref_logps is not None:
                ref[p] = pair.ref_logps
            tile_base += n_tiles
            p += 1
    size = g.image_size
    out["tiles"] = np.concatenate(tiles) if tiles else np.zeros((0, size, size, 3), np.uint8)
    out["tile_flags"] = np.concatenate(flags) if flags else np.zeros(0, np.int32)
    n_ctx = int(np.count_nonzero(vidx >= 0))
    n_shared = int(np.count_nonzero(out["input_ids"] == g.image_token_id))
    if n_ctx != n_shared or (n_ctx and vidx.max() >= g.num_image_tokens * int(
            out["tile_flags"].sum())):
        raise DataError("preference batch: image-context tokens do not match the pairs' tiles")
    meta = [(pair.source, pair.line) for row in pairs for pair in row]
    out.update(pair_slot=slot, vision_index=vidx, ref_logps=ref,
               pair_meta=np.array(meta, dtype=object).reshape(len(meta), 2))
    return out


def _base_build_without_tile_check(b: BatchBuilder) -> dict[str, np.ndarray]:
    """The base class's token layout; the tile buffer (each pair's tiles once, where the base
    class would take each answer's) and its check are redone per pair."""
    saved = b.geom
    b.geom = dataclasses.replace(saved, image_token_id=-1, num_image_tokens=0)  # check: 0 == 0
    try:
        out = BatchBuilder.build(b)
    finally:
        b.geom = saved
    return out


class PairPackIterator(PackIterator):
    builder_cls = PairBatchBuilder


class PairPackIterDataset(PackIterDataset):
    def __iter__(self) -> PairPackIterator:
        return PairPackIterator(self._parent.__iter__(), self._geom, lookahead=self._lookahead,
                                max_bad_fraction=self._max_bad_fraction,
                                bad_check_min_samples=self._bad_check_min_samples,
                                max_consecutive_skips=self._max_consecutive_skips)


def finalize_pair_batch(batch: dict[str, np.ndarray], geom: BatchGeometry
                        ) -> dict[str, np.ndarray]:
    return finalize_batch(batch, geom)


def build_preference_dataset(data_cfg: DataConfig, *, tokenizer: Tokenizer | str,
                             num_image_tokens: int, image_size: int, seq_len: int,
                             batch_size: int, max_tiles: int, seed: int,
                             shard_index: int = 0, shard_count: int = 1,
                             template=None,
                             ref_table: dict[tuple[str, int], tuple[float, float]] | None = None
                             ) -> grain.IterDataset:
    """Like `pipeline.build_train_dataset`, for preference pairs (in-process workers)."""
    if data_cfg.template is None:
        if template is None:
            raise DataError("no chat template: set data.template or pass the model's template")
        data_cfg = dataclasses.replace(data_cfg, template=template)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer, merges_compat=data_cfg.merges_compat)
    mixture = open_mixture(data_cfg)  # shards checked against their manifest, as stage 2
    processor = PairProcessor(data_cfg, mixture, tokenizer, image_size=image_size,
                              num_image_tokens=num_image_tokens, seq_len=seq_len,
                              max_tiles=max_tiles, seed=seed)
    processor.ref_table = ref_table
    plan, ds = processed_records(data_cfg, processor, len(mixture), seed=seed,
                                 shard_index=shard_index, shard_count=shard_count)
    geom = BatchGeometry(batch_size=batch_size, seq_len=seq_len, max_tiles=max_tiles,
                         image_size=image_size, pad_id=tokenizer.pad_id,
                         image_token_id=tokenizer.token_id(IMG_CONTEXT),
                         num_image_tokens=num_image_tokens,
                         max_tiles_per_row=data_cfg.max_tiles_per_row,
                         max_samples_per_row=data_cfg.max_samples_per_row
                         or DEFAULT_PAIRS_PER_ROW)
    ds = PairPackIterDataset(ds, geom, lookahead=data_cfg.pack_lookahead,
                             max_bad_fraction=data_cfg.max_bad_fraction,
                             bad_check_min_samples=data_cfg.bad_check_min_samples,
                             max_consecutive_skips=min(data_cfg.max_consecutive_skips,
                                                       plan.records_per_epoch))
    return ds.map(functools.partial(finalize_pair_batch, geom=geom))
