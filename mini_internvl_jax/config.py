"""Model configuration: what a checkpoint is (architecture) apart from how to run it (compute).

`ModelConfig` (InternViT, the LLM decoder and the InternVL glue) is everything the weights mean;
a converted folder stores it and nothing else. `ComputeConfig` (dtypes, attention kernel, layer
scan, rematerialisation, in-graph checks) is chosen by whoever runs the model: the trainer,
chat, evaluation or export. Values for the public checkpoints are the package's model presets
(`configs/models/mini-internvl-{1b,2b,4b}.yaml`); when a checkpoint is
converted, its own config.json wins (vocab size, rope factor lists).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeGuard, get_args

from mini_internvl_jax import configlib
from mini_internvl_jax.configlib import check, check_choices

# Each choice type is defined once; the tuples of its values are derived from it.
Dtype = Literal["float32", "bfloat16", "float16"]
Family = Literal["qwen2", "qwen3", "internlm2", "phi3", "llama"]
TemplateName = Literal["Hermes-2", "internlm2-chat", "phi3-chat", "internvl2_5"]
# From the least recomputation to the most (models/stack.py); auto: the trainer compiles the
# step and picks the least recomputation that fits the chip (train/aot.py), per part; a model is
# always given concrete policies.
RematPolicy = Literal["none", "save_dots", "save_attention", "full", "auto"]
AttentionImpl = Literal["xla", "cudnn", "pallas", "auto"]

DTYPES: tuple[str, ...] = get_args(Dtype)
FAMILIES: tuple[str, ...] = get_args(Family)
TEMPLATE_NAMES: tuple[str, ...] = get_args(TemplateName)
REMAT_POLICIES: tuple[str, ...] = get_args(RematPolicy)
ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)


def is_dtype(name: object) -> TypeGuard[Dtype]:
    """Whether `name` is one of DTYPES; narrows a checked string to `Dtype`."""
    return name in DTYPES


@dataclass(frozen=True)
class ComputeConfig:
    """How to run a model: none of it changes what the weights mean, so none of it is stored
    with them. The defaults suit inference and tests; training presets set their own."""

    dtype: Dtype = "float32"  # compute dtype
    param_dtype: Dtype = "float32"
    attention_impl: AttentionImpl = "xla"
    # One traced layer under a scan (fast compiles, stacked [L, ...] parameters) or a loop.
    scan_layers: bool = False
    remat: RematPolicy = "none"
    # Checked on the host when inputs are concrete and through a host callback under jit.
    check_image_tokens: bool = True
    # The vision tower's policy where it should differ from the LLM's (`remat`); None: the same.
    # Its activations are a fixed cost per tile, the LLM's grow with the sequence, so a chip
    # often has room to keep the ViT's but not the LLM's.
    remat_vision: RematPolicy | None = None

    def __post_init__(self):
        check_choices(self, "compute.")
        check(self.remat_vision != "auto" and not (self.remat == "auto" and self.remat_vision),
              "compute.remat_vision", "auto is set by compute.remat: auto, which picks both "
              f"parts' policies (got remat {self.remat!r}, remat_vision {self.remat_vision!r})")

    @property
    def vision_remat(self) -> str:
        """The vision tower's concrete policy."""
        return self.remat_vision or self.remat

    def replace(self, **kw) -> ComputeConfig:
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class VisionConfig:
    """InternViT. Defaults are InternViT-300M-448px."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False
    layer_scale_init: float = 1.0
    drop_path_rate: float = 0.0
    # Side of the stored position-embedding grid; None means image_size // patch_size.
    pos_grid_size: int | None = None

    def __post_init__(self):
        w = "vision"
        check_choices(self, "vision.")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size",
                     "patch_size", "num_channels"):
            check(getattr(self, name) > 0, f"{w}.{name}", "must be positive")
        check(self.hidden_size % self.num_heads == 0, f"{w}.num_heads",
              f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        check(self.image_size % self.patch_size == 0, f"{w}.image_size",
              f"{self.image_size} is not a multiple of patch_size {self.patch_size}")
        check(0.0 <= self.drop_path_rate < 1.0, f"{w}.drop_path_rate", "must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def stored_grid_size(self) -> int:
        return self.pos_grid_size or self.grid_size


@dataclass(frozen=True)
class RopeScaling:
    """`dynamic` = InternLM2 dynamic NTK; `longrope` = Phi-3 `su`/LongRoPE."""

    type: Literal["dynamic", "longrope"]
    factor: float = 1.0
    # LongRoPE lists of head_dim // 2 values; None means all ones until a checkpoint says otherwise.
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        check_choices(self, "llm.rope_scaling.")
        if self.type == "longrope":
            check(self.original_max_position_embeddings is not None,
                  "llm.rope_scaling.original_max_position_embeddings", "required for longrope")
        if self.type == "dynamic":
            check(self.factor >= 1.0, "llm.rope_scaling.factor", "must be >= 1 for dynamic NTK")


@dataclass(frozen=True)
class LLMConfig:
    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    qkv_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self):
        w = "llm"
        check_choices(self, "llm.")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings"):
            check(getattr(self, name) > 0, f"{w}.{name}", "must be positive")
        check(self.num_heads % self.num_kv_heads == 0, f"{w}.num_kv_heads",
              f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim is None:
            check(self.hidden_size % self.num_heads == 0, f"{w}.num_heads",
                  f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
                  " (set head_dim explicitly if that is intended)")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        check(self.head_size % 2 == 0, f"{w}.head_dim", "must be even for rotary embeddings")
        rs = self.rope_scaling
        if rs is not None and rs.type == "longrope":
            for name in ("short_factor", "long_factor"):
                lst = getattr(rs, name)
                check(lst is None or len(lst) == self.head_size // 2,
                      f"{w}.rope_scaling.{name}",
                      f"needs head_dim // 2 = {self.head_size // 2} values, got "
                      f"{None if lst is None else len(lst)}")

    @property
    def qk_norm(self) -> bool:
        """Qwen3: an RMSNorm over each head's query and key (weights [head_dim], shared by the
        heads) between the projection and RoPE."""
        return self.family == "qwen3"

    @property
    def head_size(self) -> int:
        """`head_dim` as an int: a config left without one gets hidden_size // num_heads when it
        is built, so model code never handles None."""
        assert self.head_dim is not None, "LLMConfig.__post_init__ fills in head_dim"
        return self.head_dim


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig
    llm: LLMConfig
    downsample_ratio: float = 0.5
    ps_version: Literal["v1", "v2"] = "v2"
    select_layer: int = -1
    image_token_id: int = 151648
    template: TemplateName = "Hermes-2"
    projector_norm_eps: float = 1e-5
    name: str = "custom"
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        check_choices(self, "")
        scale = 1.0 / self.downsample_ratio
        check(abs(scale - round(scale)) < 1e-6 and round(scale) >= 1, "downsample_ratio",
              f"1/{self.downsample_ratio} must be a whole number")
        check(self.vision.grid_size % round(scale) == 0, "downsample_ratio",
              f"vision grid {self.vision.grid_size} is not divisible by {round(scale)}")
        n = self.vision.num_layers
        check(-n <= self.select_layer <= n, "select_layer", f"must be in [-{n}, {n}]")
        check(0 <= self.image_token_id < self.llm.vocab_size, "image_token_id",
              f"{self.image_token_id} is outside the vocabulary of size {self.llm.vocab_size}")

    @property
    def shuffle_scale(self) -> int:
        return round(1.0 / self.downsample_ratio)

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per tile (256 for 448px tiles)."""
        return (self.vision.grid_size // self.shuffle_scale) ** 2

    @property
    def projector_in_dim(self) -> int:
        return self.vision.hidden_size * self.shuffle_scale**2

    @property
    def num_vision_layers_used(self) -> int:
        """`select_layer` -1 uses every layer; -k stops k-1 layers early; k>=0 after k layers."""
        n = self.vision.num_layers
        return n + 1 + self.select_layer if self.select_layer < 0 else self.select_layer

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


# Run-time keys that model configs (converted folders, run metadata) held before ComputeConfig.
LEGACY_COMPUTE_KEYS = tuple(f.name for f in dataclasses.fields(ComputeConfig))


def split_legacy_compute(data: dict, where: str) -> tuple[dict, dict]:
    """(architecture-only dict, the run-time keys it held) of an older model config; prints a
    one-line notice when there were any, since they are ignored from now on."""
    legacy = {k: data[k] for k in LEGACY_COMPUTE_KEYS if k in data}
    if legacy:
        print(f"note: {where} holds run-time settings {sorted(legacy)} from an older version; "
              "they are not part of the model config any more and are ignored")
        data = {k: v for k, v in data.items() if k not in legacy}
    return data, legacy


def model_config_from_dict(data: dict) -> ModelConfig:
    return configlib.from_dict(ModelConfig, data, "model")


def load_model_config(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                      ) -> ModelConfig:
    """Model preset name (`mini-internvl-1b`, `tiny-qwen2`, ...) or a YAML path, plus overrides."""
    data = configlib.read_preset("models", name_or_path)
    data = configlib.apply_overrides(data, list(overrides))
    return model_config_from_dict(data)
