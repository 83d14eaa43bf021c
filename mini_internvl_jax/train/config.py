"""Training config: a training preset (`stage1`, `stage2`, `lora`, `demo`: package data under
configs/train/) or a YAML path, plus `key=value` overrides.

The model comes from a model preset name or YAML path plus `model_overrides` (a nested mapping
merged into it); how to run it (compute/param dtype, remat, attention, layer scan) is `compute`,
so one model preset serves every stage and nothing is patched into the model config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mini_internvl_jax import configlib
from mini_internvl_jax.config import ComputeConfig, ModelConfig, model_config_from_dict
from mini_internvl_jax.configlib import check
from mini_internvl_jax.data.config import DataConfig
from mini_internvl_jax.models.lora import LoRAConfig
from mini_internvl_jax.sharding import RULE_SETS, Rules, make_mesh
from mini_internvl_jax.train.preference import PreferenceConfig


@dataclass(frozen=True)
class DcnConfig:
    """How many slices each mesh axis spans (multislice over the data-centre network)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        check(self.data >= 1, "mesh.dcn.data", "must be >= 1 (number of slices; no -1)")
        check(self.fsdp >= 1, "mesh.dcn.fsdp", "must be >= 1 (number of slices; no -1)")
        check(self.tensor == 1, "mesh.dcn.tensor",
              "must be 1: tensor parallelism needs ICI bandwidth and stays inside a slice; "
              "spread slices over mesh.dcn.data (or mesh.dcn.fsdp)")

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @property
    def slices(self) -> int:
        return self.data * self.fsdp * self.tensor


@dataclass(frozen=True)
class MeshConfig:
    """Axis sizes within one slice (all devices when there is one slice); one may be -1 (= the
    rest). `dcn` multiplies `data`/`fsdp` across slices: mesh `{data: 1, fsdp: -1, dcn: {data:
    2}}` on two v5e-16 slices is data 2 (one per slice) x fsdp 16 (inside each slice)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn: DcnConfig = field(default_factory=DcnConfig)
    # The named logical-axis rule set (sharding.RULE_SETS) that places parameters on the mesh.
    rules: str = "default"

    def __post_init__(self):
        check(self.rules in RULE_SETS, "mesh.rules",
              f"{self.rules!r} is not one of {sorted(RULE_SETS)}")

    @property
    def rule_table(self) -> Rules:
        return RULE_SETS[self.rules]

    def build(self, devices=None):
        """The jax Mesh over `devices` (default: all devices of all hosts)."""
        return make_mesh(self.data, self.fsdp, self.tensor, devices, dcn=self.dcn.sizes)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 4e-5
    # Cosine decays from lr to lr * min_lr_ratio at total_steps.
    min_lr_ratio: float = 0.0
    # warmup_steps wins over warmup_ratio (fraction of total_steps) when set.
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    # dtype of Adam's first moment; "params" = the parameters' dtype. bfloat16 saves 2 bytes
    # per float32 trainable parameter (a quarter of the optimizer state) at a small loss of
    # precision in the update; opt-in. The second moment keeps the parameters' dtype.
    mu_dtype: Literal["params", "float32", "bfloat16"] = "params"
    # Micro-batches per optimizer step; batch_size is split into grad_accum equal parts.
    grad_accum: int = 1
    # Regexes searched in a parameter's dotted path (`llm.layers.layers.input_norm.weight`);
    # matches get no weight decay. The default is InternVL2's fine-tuning (transformers 4.37's
    # Trainer): only biases and the nn.LayerNorm weights of the ViT (layer_norm ViTs such as
    # InternViT-300M) and of the projector are exempt; the LLM's RMSNorm weights are decayed.
    # `[norm, bias$]` exempts every norm, as the current Trainer does (docs/training_parity.md).
    no_decay: tuple[str, ...] = (r"vision\.encoder\.layers\.norm[12]\.", r"projector\.norm\.",
                                 r"bias$")

    def __post_init__(self):
        check(self.lr > 0, "optim.lr", "must be positive")
        check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
        check(self.warmup_steps is None or self.warmup_steps >= 0, "optim.warmup_steps",
              "must be >= 0")
        check(0.0 <= self.warmup_ratio < 1.0, "optim.warmup_ratio", "must be in [0, 1)")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(self.clip_norm is None or self.clip_norm > 0, "optim.clip_norm",
              "must be positive or null (no clipping)")
        check(self.grad_accum >= 1, "optim.grad_accum", "must be >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # None = no checkpoints
    every: int = 500
    keep: int = 3
    async_save: bool = True
    resume: bool = True  # continue from the latest checkpoint in `dir` when there is one
    # After SIGTERM / Ctrl-C, seconds to reach a step boundary (and save) before the process
    # exits without saving: a stalled data pipeline must not keep a preempted job alive.
    stop_grace_s: float = 120.0

    def __post_init__(self):
        check(self.every >= 1, "checkpoint.every", "must be >= 1")
        check(self.keep >= 1, "checkpoint.keep", "must be >= 1")
        check(self.stop_grace_s > 0, "checkpoint.stop_grace_s", "must be positive")


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases run (needs the `wandb` package; `pip install .[wandb]`)."""

    project: str
    name: str | None = None  # None = a name wandb makes up
    entity: str | None = None  # None = the account's default
    # None = wandb's own choice (WANDB_MODE, else online); offline keeps the run under log.dir
    # for a later `wandb sync` (pod hosts often have no route out).
    mode: Literal["online", "offline", "disabled"] | None = None

    def __post_init__(self):
        check(bool(self.project), "log.wandb.project", "must name the wandb project")


@dataclass(frozen=True)
class LogConfig:
    every: int = 10
    # metrics.jsonl and TensorBoard events; None = checkpoint.dir, or no files without one.
    dir: str | None = None
    tensorboard: bool = True
    # Also log the scalars and the run config to Weights & Biases (process 0 only).
    wandb: WandbConfig | None = None
    progress_bar: bool = True
    # jax.profiler trace of steps [profile_start, profile_start + profile_steps) into dir.
    profile_start: int | None = None
    profile_steps: int = 3
    # Per-chip peak TFLOP/s for MFU; None = look the device kind up (metrics.PEAK_TFLOPS).
    peak_tflops: float | None = None

    def __post_init__(self):
        check(self.every >= 1, "log.every", "must be >= 1")
        check(self.profile_steps >= 1, "log.profile_steps", "must be >= 1")


@dataclass(frozen=True)
class SyntheticConfig:
    """Random batches in the training-batch contract (benchmarks, AOT, tests)."""

    tiles_per_sample: int = 1
    samples_per_row: int = 1
    # Each sample fills between min_fill and all of its share of the row (1.0 = no padding).
    min_fill: float = 0.5

    def __post_init__(self):
        check(self.tiles_per_sample >= 0, "synthetic.tiles_per_sample", "must be >= 0")
        check(self.samples_per_row >= 1, "synthetic.samples_per_row", "must be >= 1")
        check(0.0 < self.min_fill <= 1.0, "synthetic.min_fill", "must be in (0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    # Preset name or YAML path; when init_from names a converted or Hugging Face folder, that
    # folder's own model config is used instead (its vocabulary size, RoPE lists, ...).
    model: str = "mini-internvl-1b"
    model_overrides: dict = field(default_factory=dict)
    # None = synthetic random data (see `synthetic`).
    data: DataConfig | None = None
    tokenizer: str | None = None  # tokenizer folder/file for `data`
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    stage: Literal[1, 2] = 2
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_llm: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # A converted model folder (see convert/) or a training checkpoint folder (params only).
    init_from: str | None = None
    # Set: preference optimization (MPO, the stage after SFT) on preference pairs.
    preference: PreferenceConfig | None = None

    batch_size: int = 8  # global rows per optimizer step (all micro-batches, all hosts)
    seq_len: int = 4096
    # Tile buffer per micro-batch, all hosts together (a multiple of the process count).
    max_tiles: int = 8
    total_steps: int = 1000
    seed: int = 0

    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # How the model runs. A partial mapping (`compute: {remat: none}`) keeps these training
    # defaults for the keys it does not name.
    compute: ComputeConfig = field(default_factory=lambda: ComputeConfig(
        dtype="bfloat16", param_dtype="float32", remat="full", attention_impl="xla",
        scan_layers=True))
    # False: one sample per row, right-padded; attention then needs no segment ids (which lets
    # cuDNN run it). Packed rows (several samples per row) need True.
    packed: bool = True
    # Sequence positions per cross-entropy chunk (logits are never built for the whole row).
    loss_chunk: int = 1024
    # Consecutive non-finite steps after which the run stops (last good checkpoint kept).
    max_bad_steps: int = 5
    # Initialise jax.distributed: auto = when a cluster environment is detected.
    distributed: Literal["auto", "on", "off"] = "auto"
    # JAX persistent compilation cache (a restart reuses the compiled step): "auto" = JAX's own
    # setting if any (JAX_COMPILATION_CACHE_DIR), else the run folder's compile_cache/
    # (checkpoint.dir, else log.dir); a path; null = off.
    compile_cache_dir: str | None = "auto"

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.batch_size % self.optim.grad_accum == 0, "batch_size",
              f"{self.batch_size} is not divisible by optim.grad_accum {self.optim.grad_accum}")
        check(self.seq_len >= 2, "seq_len", "must be >= 2")
        check(self.max_tiles >= 1, "max_tiles", "must be >= 1")
        check(self.total_steps >= 1, "total_steps", "must be >= 1")
        check(self.loss_chunk >= 1, "loss_chunk", "must be >= 1")
        check(self.max_bad_steps >= 1, "max_bad_steps", "must be >= 1")
        check(self.packed or self.data is not None or self.synthetic.samples_per_row == 1,
              "packed", "false needs one sample per row (synthetic.samples_per_row: 1)")
        check(self.log.profile_start is None or self.log.dir or self.checkpoint.dir,
              "log.profile_start", "needs log.dir (or checkpoint.dir) to write the trace to")
        if self.data is not None:
            check(self.tokenizer is not None, "tokenizer", "required when `data` is set")
        if self.preference is not None:
            check(self.data is not None, "data", "preference training needs preference data "
                  "(data.meta_path)")
            check(self.packed, "packed", "preference rows hold two answers: must be true")
            check(self.stage == 2, "stage", "preference training is stage 2 (full model)")
        if self.stage == 1:
            check(not self.freeze_projector, "freeze_projector",
                  "stage 1 trains only the projector; it cannot be frozen")
            check(self.lora.rank == 0, "lora.rank", "stage 1 trains only the projector")

    @property
    def model_compute(self) -> ComputeConfig:
        """`compute` as the trainer builds the model with it: the data pipeline checks the
        <IMG_CONTEXT> count against the tiles of every batch on the host, so the step skips
        the in-graph host callback that would sync the device every step."""
        return self.compute.replace(check_image_tokens=False)

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.optim.grad_accum

    @property
    def frozen_components(self) -> frozenset[str]:
        """Top-level model parts ('vision', 'projector', 'llm') whose base weights stay fixed."""
        if self.stage == 1:
            return frozenset({"vision", "llm"})
        frozen = {name for name, flag in (("vision", self.freeze_vision),
                                          ("projector", self.freeze_projector),
                                          ("llm", self.freeze_llm)) if flag}
        if self.lora.rank:
            frozen.add("llm")
            if self.lora.vision:
                frozen.add("vision")
        return frozenset(frozen)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_model_config(cfg: TrainConfig, base: ModelConfig | None = None) -> ModelConfig:
    """The `model` preset (or `base`, e.g. an init_from folder's own config) plus
    `model_overrides`."""
    data = (configlib.read_preset("models", cfg.model) if base is None
            else configlib.to_dict(base))
    return model_config_from_dict(_deep_merge(data, cfg.model_overrides))


def train_config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()
                           ) -> TrainConfig:
    data = configlib.apply_overrides(data, list(overrides))
    return configlib.from_dict(TrainConfig, data)


def load_train_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                      ) -> TrainConfig:
    """A training preset name (`stage1`, `stage2`, `lora`, `demo`) or YAML path, plus
    `key=value` overrides (`model=mini-internvl-2b`, ...); the model config is checked too."""
    cfg = train_config_from_dict(configlib.read_preset("train", name_or_path), overrides)
    build_model_config(cfg)
    return cfg
