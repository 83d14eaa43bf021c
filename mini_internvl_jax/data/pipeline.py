"""The Grain training pipeline: plan -> per-sample processing -> packing -> worker prefetch.

    plan (MapDataset: shuffled epochs, this process's shard of each epoch)
      .map(SampleProcessor)            decode, tile, tokenize; threads (ReadOptions)
      .to_iter_dataset(...)
    PackIterDataset                    first-fit packing into static batches (tiles uint8)
      .mp_prefetch(...)                optional worker processes, each packing whole batches
      .map(finalize_batch)             tiles -> normalised float32 tile buffer
    ThreadPrefetchIterDataset          batches made ahead in a background thread

Each batch is one micro-batch of the contract in `mini_internvl_jax.batch` (numpy, static
shapes, without the leading grad-accum axis: [B, S] token fields, [T, C, H, W] tiles, [T] flags),
plus host-side counters `stats_num_{samples,truncated,dropped,bad}` since the last batch.

Iterator state (`get_state`) is JSON; save it with the model via
`ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))` and restore with
`grain.checkpoint.CheckpointRestore(it)` into an iterator built with the same settings
(and the same `num_workers`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import grain

from mini_internvl_jax.config import TemplateName
from mini_internvl_jax.data.config import DataConfig
from mini_internvl_jax.data.errors import DataError
from mini_internvl_jax.data.packing import BatchGeometry, PackIterDataset, finalize_batch
from mini_internvl_jax.data.processing import SampleProcessor
from mini_internvl_jax.data.shards import check_shards_before_reading
from mini_internvl_jax.data.sources import Mixture, open_source, read_meta
from mini_internvl_jax.data.tokenizer import IMG_CONTEXT, Tokenizer, load_tokenizer


class EpochPlan(grain.MapDataset):
    """(plan index, mixture index) pairs for one shard.

    Epoch e is a fresh permutation of the mixture (seed + e); shard k of n takes positions
    k, k + n, k + 2n, ... of it, so the shards of one epoch together cover every entry once.
    """

    def __init__(self, total: int, *, seed: int, shuffle: bool, shard_index: int,
                 shard_count: int, num_epochs: int | None):
        super().__init__()
        if not 0 <= shard_index < shard_count:
            raise DataError(f"shard_index {shard_index} is not in [0, {shard_count})")
        self._total = total
        self._shard = shard_index
        self._count = shard_count
        self._per_epoch = (total - shard_index + shard_count - 1) // shard_count
        if self._per_epoch == 0:
            raise DataError(f"shard {shard_index} of {shard_count} gets no samples: the "
                            f"datasets hold only {total}")
        self._epochs = num_epochs
        self._perm = grain.MapDataset.range(total).shuffle(seed % 2**32) if shuffle else None

    @property
    def records_per_epoch(self) -> int:
        return self._per_epoch

    def __len__(self) -> int:
        return sys.maxsize if self._epochs is None else self._per_epoch * self._epochs

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, j = divmod(index, self._per_epoch)
        pos = self._shard + j * self._count
        if self._perm is None:
            return index, pos
        return index, self._perm[epoch * self._total + pos]

    def __str__(self) -> str:
        return f"EpochPlan(total={self._total}, shard={self._shard}/{self._count})"


def open_mixture(data_cfg: DataConfig) -> Mixture:
    """The datasets of `data.meta_path`, shards checked against their manifest first
    (`data.bad_shards`)."""
    specs = check_shards_before_reading(data_cfg.meta_path, read_meta(data_cfg.meta_path),
                                        data_cfg.bad_shards)
    return Mixture([open_source(s) for s in specs])


def processed_records(data_cfg: DataConfig, processor, num_records: int, *, seed: int,
                      shard_index: int, shard_count: int) -> tuple[EpochPlan, grain.IterDataset]:
    """(the epoch plan, this host's records in its order, each through `processor` on
    `data.num_threads` threads): the part of the pipeline before packing."""
    plan = EpochPlan(num_records, seed=seed, shuffle=data_cfg.shuffle,
                     shard_index=shard_index, shard_count=shard_count,
                     num_epochs=data_cfg.num_epochs)
    ds = plan.map(processor).to_iter_dataset(grain.ReadOptions(
        num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch_buffer_size))
    return plan, ds


def build_train_dataset(data_cfg: DataConfig, *, tokenizer: Tokenizer | str,
                        num_image_tokens: int, image_size: int, seq_len: int, batch_size: int,
                        max_tiles: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                        template: TemplateName | None = None) -> grain.IterDataset:
    """The batch-producing IterDataset; see `build_train_iterator`."""
    if data_cfg.template is None:
        if template is None:
            raise DataError("no chat template: set data.template or pass the model's template "
                            "(Hermes-2, internlm2-chat or phi3-chat)")
        data_cfg = dataclasses.replace(data_cfg, template=template)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer, merges_compat=data_cfg.merges_compat)
    elif tokenizer.merges_compat != data_cfg.merges_compat:
        raise DataError(f"data.merges_compat is {data_cfg.merges_compat!r} but the tokenizer "
                        f"given was loaded with merges_compat={tokenizer.merges_compat!r}; "
                        "pass the same value to load_tokenizer")
    for name, v in (("num_image_tokens", num_image_tokens), ("image_size", image_size),
                    ("seq_len", seq_len), ("batch_size", batch_size), ("max_tiles", max_tiles)):
        if v < 1:
            raise DataError(f"{name} must be >= 1, got {v}")
    mixture = open_mixture(data_cfg)
    processor = SampleProcessor(data_cfg, mixture, tokenizer, image_size=image_size,
                                num_image_tokens=num_image_tokens, seq_len=seq_len,
                                max_tiles=max_tiles, seed=seed)
    plan, ds = processed_records(data_cfg, processor, len(mixture), seed=seed,
                                 shard_index=shard_index, shard_count=shard_count)
    geom = BatchGeometry(batch_size=batch_size, seq_len=seq_len, max_tiles=max_tiles,
                         image_size=image_size, pad_id=tokenizer.pad_id,
                         image_token_id=tokenizer.token_id(IMG_CONTEXT),
                         num_image_tokens=num_image_tokens,
                         max_tiles_per_row=data_cfg.max_tiles_per_row,
                         max_samples_per_row=data_cfg.max_samples_per_row)
    ds = PackIterDataset(ds, geom, lookahead=data_cfg.pack_lookahead,
                         max_bad_fraction=data_cfg.max_bad_fraction,
                         bad_check_min_samples=data_cfg.bad_check_min_samples,
                         max_consecutive_skips=min(data_cfg.max_consecutive_skips,
                                                   plan.records_per_epoch))
    if data_cfg.num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_cfg.num_workers,
            per_worker_buffer_size=data_cfg.worker_buffer_size))
    ds = ds.map(functools.partial(finalize_batch, geom=geom))
    if data_cfg.batch_prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(
            ds, prefetch_buffer_size=data_cfg.batch_prefetch)
    return ds


def build_train_iterator(data_cfg: DataConfig, *, tokenizer: Tokenizer | str,
                         num_image_tokens: int, image_size: int, seq_len: int, batch_size: int,
                         max_tiles: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                         template: TemplateName | None = None) -> grain.DatasetIterator:
    """Iterator of packed batches (see the module docstring) for this process's shard.

    `batch_size` is rows per process; `max_tiles` the tile buffer per batch. This process
    reads shard `shard_index` of `shard_count` (the trainer passes its process index and
    count; the data layer never imports jax). `template` (the model config's) is
    used when `data_cfg.template` is unset. The iterator is checkpointable with Orbax
    (`grain.checkpoint.CheckpointSave/CheckpointRestore`) or `get/set_iterator_state`.
    """
    return iter(build_train_dataset(
        data_cfg, tokenizer=tokenizer, num_image_tokens=num_image_tokens,
        image_size=image_size, seq_len=seq_len, batch_size=batch_size, max_tiles=max_tiles,
        seed=seed, shard_index=shard_index, shard_count=shard_count, template=template))


def get_iterator_state(it: grain.DatasetIterator) -> str:
    """The iterator's position as a JSON string."""
    return json.dumps(it.get_state())


def set_iterator_state(it: grain.DatasetIterator, state: str | dict) -> None:
    """Moves an iterator built with the same settings to a saved position."""
    it.set_state(json.loads(state) if isinstance(state, str) else state)
