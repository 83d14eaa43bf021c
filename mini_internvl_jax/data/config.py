"""Typed data-pipeline config (`DataConfig`), read with the project's `configlib` helpers.

The geometry of a batch (sequence length, rows, tile buffer, image size, tokens per tile)
is not here: it belongs to the model and trainer configs and is passed to
`pipeline.build_train_iterator` directly, so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mini_internvl_jax import configlib
from mini_internvl_jax.config import TemplateName
from mini_internvl_jax.configlib import check

# The most frames one video may ask for (training, chat, evaluation): each frame is a tile of
# 256 image tokens, so 64 frames are 16k tokens and 64 decoded tiles, at the limit of the
# models' context and of host memory.
MAX_NUM_FRAMES = 64


@dataclass(frozen=True)
class DataConfig:
    # InternVL meta JSON: {name: {root, annotation, repeat_time, data_augment, ...}}.
    meta_path: str
    # Chat template; null = the model's (pass `template=` to `build_train_iterator`).
    template: TemplateName | None = None
    # Overrides the template's default system message when set.
    system_message: str | None = None

    # Dynamic tiling (InternVL `dynamic_preprocess`); a meta entry may override max.
    dynamic_image_size: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    use_thumbnail: bool = True
    # InternVL feeds a white tile with image_flags=0 for text-only samples; off by default
    # because it only spends ViT compute.
    text_only_dummy_tile: bool = False
    # Video rows (`video` in the JSONL): frames per sample drawn uniformly in [min, max]
    # (InternVL2's 8..32), one per interval, at random or at the interval middle; one tile
    # per frame (so a row needs that many tiles of the batch's tile buffer and 256 tokens
    # each). Draws are seeded by the run seed and the sample's position.
    min_num_frames: int = 8
    max_num_frames: int = 32
    frame_sampling: Literal["rand", "middle"] = "rand"
    # Train-time JPEG re-encode for datasets with `data_augment: true` (quality inclusive).
    jpeg_quality_min: int = 75
    jpeg_quality_max: int = 100

    # "4.37": tokenize as transformers 4.37's slow Qwen2Tokenizer, which InternVL2 was
    # fine-tuned with and which skipped every merges.txt line starting with "#" (quote it in
    # YAML). null: current transformers / fast tokenizers (all merges). Qwen2 BPE only.
    merges_compat: Literal["4.37"] | None = None

    # Loss weights per supervised token: 1, 1/n or 1/sqrt(n) with n tokens in the sample.
    loss_reduction: Literal["token", "sample", "square"] = "token"
    # Samples longer than the row: cut (never through an image) or leave out.
    overlong: Literal["truncate", "drop"] = "truncate"
    # Optional cap on tiles per packed row (InternVL's `num_images_expected`); None = only
    # the batch's tile buffer limits.
    max_tiles_per_row: int | None = None
    # 1 = no packing (one right-padded sample per row, for attention without segment ids);
    # None = as many as fit.
    max_samples_per_row: int | None = None
    # How many samples that did not fit may wait for a later batch while the current one
    # keeps filling; 0 = close the batch at the first sample that does not fit.
    pack_lookahead: int = 8

    shuffle: bool = True
    # None repeats forever (use with max_steps; needed for multi-host so hosts never run dry).
    num_epochs: int | None = None

    # Per-process parallelism: threads decode/tile/tokenize, workers are extra processes
    # that each pack whole batches (tiles travel as uint8; normalising happens after).
    num_threads: int = 2
    prefetch_buffer_size: int = 16
    num_workers: int = 0
    worker_buffer_size: int = 2
    # Finished batches made ahead in a background thread (0 = in the caller's thread).
    batch_prefetch: int = 2

    # Bad input (missing/corrupt image, malformed line, unknown role, placeholder mismatch)
    # is skipped and counted; the run stops once the bad share passes this limit, checked
    # after `bad_check_min_samples` records.
    max_bad_fraction: float = 0.01
    bad_check_min_samples: int = 200
    # Records rejected in a row (dropped or bad, no sample placed in between) after which the
    # run stops: nothing fits the batch geometry. A whole epoch of this shard also counts.
    max_consecutive_skips: int = 10000
    # Shards of a mivl-build-shards folder are checked against its manifest.json (size,
    # sha256) before any record is read: "refuse" stops the run naming every shard that
    # differs, "skip" trains without them (and says how many shards and records it left out),
    # "unchecked" reads them as they are (hashing costs one read of the data per host).
    bad_shards: Literal["refuse", "skip", "unchecked"] = "refuse"

    def __post_init__(self):
        check(bool(self.meta_path), "data.meta_path", "must name the meta JSON file")
        check(1 <= self.min_dynamic_patch <= self.max_dynamic_patch, "data.min_dynamic_patch",
              f"need 1 <= min_dynamic_patch ({self.min_dynamic_patch}) <= max_dynamic_patch "
              f"({self.max_dynamic_patch})")
        check(1 <= self.min_num_frames <= self.max_num_frames <= MAX_NUM_FRAMES,
              "data.min_num_frames", f"need 1 <= min_num_frames ({self.min_num_frames}) <= "
              f"max_num_frames ({self.max_num_frames}) <= {MAX_NUM_FRAMES}")
        check(1 <= self.jpeg_quality_min <= self.jpeg_quality_max <= 100, "data.jpeg_quality_min",
              "need 1 <= jpeg_quality_min <= jpeg_quality_max <= 100")
        check(self.max_tiles_per_row is None or self.max_tiles_per_row >= 1,
              "data.max_tiles_per_row", "must be >= 1 or null")
        check(self.max_samples_per_row is None or self.max_samples_per_row >= 1,
              "data.max_samples_per_row", "must be >= 1 or null")
        check(self.pack_lookahead >= 0, "data.pack_lookahead", "must be >= 0")
        check(self.num_epochs is None or self.num_epochs >= 1, "data.num_epochs",
              "must be >= 1 or null (repeat forever)")
        check(self.num_threads >= 0, "data.num_threads", "must be >= 0")
        check(self.prefetch_buffer_size >= 1, "data.prefetch_buffer_size", "must be >= 1")
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(self.worker_buffer_size >= 1, "data.worker_buffer_size", "must be >= 1")
        check(self.batch_prefetch >= 0, "data.batch_prefetch", "must be >= 0")
        check(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1]")
        check(self.bad_check_min_samples >= 1, "data.bad_check_min_samples", "must be >= 1")
        check(self.max_consecutive_skips >= 1, "data.max_consecutive_skips", "must be >= 1")


def data_config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> DataConfig:
    """`DataConfig` from a plain dict (a YAML `data:` section) plus `key=value` overrides."""
    data = configlib.apply_overrides(data, list(overrides))
    return configlib.from_dict(DataConfig, data, "data")
