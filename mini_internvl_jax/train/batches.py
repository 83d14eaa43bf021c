"""Where training batches come from: the Grain pipeline or synthetic rows, stacked per step.

`SyntheticBatches` draws random batches in the training-batch contract (benchmarks, AOT, tests).
Row k of the stream (counting rows of all hosts, batch after batch) is generated from
(seed, k) alone and owns a fixed run of tile slots, so any split over hosts or micro-batches
yields the same rows as one process drawing whole batches. Its state is the batch index, saved
and restored through Grain's Orbax handler like the real pipeline's.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np

from mini_internvl_jax.batch import BATCH_KEYS, IGNORE_INDEX, STATS_PREFIX, BatchSpec
from mini_internvl_jax.config import ModelConfig
from mini_internvl_jax.data.pipeline import build_train_iterator
from mini_internvl_jax.data.preference import PAIR_FIELDS
from mini_internvl_jax.train import preference_run
from mini_internvl_jax.train.config import TrainConfig


class SyntheticBatches:
    def __init__(self, *, vocab_size: int, image_token_id: int, num_image_tokens: int,
                 image_size: int, seq_len: int, batch_size: int, max_tiles: int,
                 tiles_per_sample: int, samples_per_row: int, seed: int, min_fill: float = 0.5,
                 shard_index: int = 0, shard_count: int = 1):
        if batch_size < 1 or max_tiles < batch_size or max_tiles % batch_size:
            raise ValueError(f"synthetic data: the tile buffer ({max_tiles}) must be a positive "
                             f"multiple of the rows per host ({batch_size})")
        self.slots = max_tiles // batch_size
        tiles_per_row = tiles_per_sample * samples_per_row
        if tiles_per_row > self.slots:
            raise ValueError(f"synthetic data: {samples_per_row} samples x {tiles_per_sample} "
                             f"tiles per row do not fit {self.slots} tile slots per row "
                             f"(max_tiles {max_tiles} / {batch_size} rows)")
        per_sample = seq_len // samples_per_row
        if per_sample < tiles_per_sample * num_image_tokens + 2:
            raise ValueError(f"synthetic data: a sample of {per_sample} tokens cannot hold "
                             f"{tiles_per_sample} tiles x {num_image_tokens} image tokens + text")
        self.vocab_size, self.image_token_id = vocab_size, image_token_id
        self.num_image_tokens, self.image_size = num_image_tokens, image_size
        self.seq_len, self.batch_size = seq_len, batch_size
        self.tiles_per_sample, self.samples_per_row = tiles_per_sample, samples_per_row
        self.seed, self.shard_index, self.shard_count = seed, shard_index, shard_count
        self.min_fill = min_fill
        self.index = 0

    def __iter__(self):
        return self

    def _row(self, row: int):
        rng = np.random.default_rng([self.seed, row])
        s, n_img = self.seq_len, self.num_image_tokens
        ids = np.zeros(s, np.int32)
        labels = np.full(s, IGNORE_INDEX, np.int32)
        seg = np.zeros(s, np.int32)
        pos = np.zeros(s, np.int32)
        per_sample = s // self.samples_per_row
        for k in range(self.samples_per_row):
            lo = k * per_sample
            n = self.tiles_per_sample * n_img
            shortest = max(int(self.min_fill * per_sample), n + 2)
            length = int(rng.integers(shortest, per_sample + 1))
            text = rng.integers(0, self.vocab_size - 1, length, dtype=np.int32)
            text[text >= self.image_token_id] += 1  # never the image token by accident
            text[1:1 + n] = self.image_token_id
            ids[lo:lo + length] = text
            seg[lo:lo + length] = k + 1
            pos[lo:lo + length] = np.arange(length)
            target = np.where(text[1:] == self.image_token_id, IGNORE_INDEX, text[1:])
            labels[lo:lo + length - 1] = target
        pixels = np.zeros((self.slots, 3, self.image_size, self.image_size), np.float32)
        flags = np.zeros(self.slots, np.int32)
        real = self.tiles_per_sample * self.samples_per_row
        pixels[:real] = rng.standard_normal((real, 3, self.image_size, self.image_size),
                                            np.float32)
        flags[:real] = 1
        return ids, labels, pos, seg, pixels, flags

    def __next__(self) -> dict[str, np.ndarray]:
        first = (self.index * self.shard_count + self.shard_index) * self.batch_size
        rows = [self._row(first + r) for r in range(self.batch_size)]
        self.index += 1
        ids, labels, pos, seg, pixels, flags = (np.stack(x) for x in zip(*rows, strict=True))
        return {"input_ids": ids, "labels": labels,
                "loss_weights": (labels != IGNORE_INDEX).astype(np.float32), "positions": pos,
                "segment_ids": seg, "pixel_values": pixels.reshape((-1,) + pixels.shape[2:]),
                "image_flags": flags.reshape(-1)}

    # The protocol of Grain's checkpoint handler (JSON bytes).
    def get_state(self) -> bytes:
        return json.dumps({"index": self.index}).encode()

    def set_state(self, state: bytes) -> None:
        self.index = int(json.loads(state)["index"])

    def start_prefetch(self) -> None:
        pass


def batch_spec(cfg: TrainConfig, model_cfg: ModelConfig) -> BatchSpec:
    """This run's batch geometry (all hosts)."""
    return BatchSpec(rows=cfg.micro_batch_size, seq_len=cfg.seq_len, tiles=cfg.max_tiles,
                     image_size=model_cfg.vision.image_size,
                     channels=model_cfg.vision.num_channels, grad_accum=cfg.optim.grad_accum,
                     num_image_tokens=model_cfg.num_image_tokens)


def make_iterator(cfg: TrainConfig, model_cfg: ModelConfig):
    """This host's micro-batch iterator: the Grain pipeline, or synthetic data."""
    local = batch_spec(cfg, model_cfg).per_host(jax.process_count())
    common = dict(num_image_tokens=local.num_image_tokens, image_size=local.image_size,
                  seq_len=local.seq_len, batch_size=local.rows, max_tiles=local.tiles,
                  seed=cfg.seed,
                  shard_index=jax.process_index(), shard_count=jax.process_count())
    if cfg.data is None:
        return SyntheticBatches(vocab_size=model_cfg.llm.vocab_size,
                                image_token_id=model_cfg.image_token_id,
                                tiles_per_sample=cfg.synthetic.tiles_per_sample,
                                samples_per_row=cfg.synthetic.samples_per_row,
                                min_fill=cfg.synthetic.min_fill, **common)
    assert cfg.tokenizer is not None, "TrainConfig requires a tokenizer when data is set"
    if cfg.preference is not None:
        return preference_run.make_iterator(cfg, model_cfg, rows=local.rows, tiles=local.tiles,
                                            ref_table=preference_run.stored_ref_table(cfg))
    data_cfg = cfg.data if cfg.packed else dataclasses.replace(cfg.data, max_samples_per_row=1)
    return build_train_iterator(data_cfg, tokenizer=cfg.tokenizer,
                                template=model_cfg.template, **common)


def next_step_batch(iterator, grad_accum: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """`grad_accum` micro-batches stacked on a new leading axis (contract keys only), and the
    pipeline's `stats_*` counters summed over them."""
    micro = [next(iterator) for _ in range(grad_accum)]
    stats = {k: int(sum(np.asarray(m[k]).sum() for m in micro))
             for k in micro[0] if k.startswith(STATS_PREFIX)}
    keys = [k for k in micro[0] if k in BATCH_KEYS or k in PAIR_FIELDS]
    return {k: np.stack([np.asarray(m[k]) for m in micro]) for k in keys}, stats

