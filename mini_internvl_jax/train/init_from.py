"""`init_from`: start a run from a converted/Hugging Face folder or an earlier run's checkpoint.

The folder is opened with checkpoints/resolve.py, the one resolver chat, evaluation and export use
too. Its own model config (a converted or Hugging Face folder's vocabulary size and RoPE lists,
a checkpoint's the config of its run) wins over the `model` preset; `model_overrides` and
`compute` still apply. The adapters of a LoRA run's checkpoint are merged into its weights
first, so the new run starts from the function the old one ended with. This run's own LoRA
adapters always start fresh.
"""

from __future__ import annotations

import jax
from flax import nnx

from mini_internvl_jax.checkpoints.resolve import Source, open_source
from mini_internvl_jax.checkpoints.run import CheckpointError
from mini_internvl_jax.config import ModelConfig
from mini_internvl_jax.convert.errors import CheckpointReadError
from mini_internvl_jax.errors import UserError
from mini_internvl_jax.models.lora import LoRAParam
from mini_internvl_jax.train.config import TrainConfig, build_model_config


class InitError(UserError, ValueError):
    """`init_from` names something that cannot initialise this model; the message says why."""


def base_params_filter(path, value) -> bool:
    """Parameters a converted or earlier checkpoint provides: all but LoRA adapters."""
    return isinstance(value, nnx.Param) and not isinstance(value, LoRAParam)


def open_init_source(path: str) -> Source:
    """The init_from folder, opened; an unusable one is an InitError naming it."""
    try:
        return open_source(path)
    except (CheckpointReadError, CheckpointError) as e:
        raise InitError(f"init_from {path}: {e}") from e


def model_config(cfg: TrainConfig, source: Source | None = None) -> ModelConfig:
    """The run's model config: the init_from folder's own (`source`, opened here if None), or
    the preset."""
    if cfg.init_from and source is None:
        source = open_init_source(cfg.init_from)
    return build_model_config(cfg, source.model_config if source else None)


def _check_same_layout(target, loaded, where: str) -> None:
    want = {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(target)}
    got = {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(loaded)}
    if want != got:
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        shapes = [(p, got[p], want[p]) for p in want if p in got and got[p] != want[p]][:3]
        raise InitError(f"init_from {where}: its parameters differ from the model's (missing "
                        f"{missing}, unexpected {extra}, shape mismatches {shapes})")


def load_initial_params(model, cfg: TrainConfig, mesh, source: Source | None = None) -> None:
    """Overwrites `model`'s base weights (not LoRA adapters) from `cfg.init_from` (`source`,
    opened here if None), in place."""
    assert cfg.init_from is not None
    target = nnx.state(model, base_params_filter)
    source = source or open_init_source(cfg.init_from)
    try:
        source_model = source.load(cfg.model_compute, mesh=mesh)
    except CheckpointError as e:
        raise InitError(f"init_from {cfg.init_from}: {e}") from e
    loaded = nnx.state(source_model, base_params_filter)
    _check_same_layout(target, loaded, cfg.init_from)
    loaded = jax.tree.map(lambda t, s: jax.device_put(s.astype(t.dtype), t.sharding),
                          target, loaded)
    nnx.update(model, loaded)
