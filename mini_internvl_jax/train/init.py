"""`init_from`: start a run from a converted/Hugging Face folder or an earlier run's checkpoint.

Each kind also supplies the model config (a converted or Hugging Face folder its vocabulary size
and RoPE lists, a checkpoint the config of its run), which wins over the `model` preset;
`model_overrides` and the training knobs still apply. The adapters of a LoRA run's checkpoint
are merged into its weights first, so the new run starts from the function the old one ended
with. This run's own LoRA adapters always start fresh.
"""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from mini_internvl_jax import configlib
from mini_internvl_jax.config import ModelConfig
from mini_internvl_jax.train.config import TrainConfig, build_model_config
from mini_internvl_jax.train.lora import LoRAParam


class InitError(ValueError):
    """`init_from` names something that cannot initialise this model; the message says why."""


def base_params_filter(path, value) -> bool:
    """Parameters a converted or earlier checkpoint provides: all but LoRA adapters."""
    return isinstance(value, nnx.Param) and not isinstance(value, LoRAParam)


def source_kind(path: str) -> str:
    from mini_internvl_jax.convert.orbax_io import is_converted_folder
    from mini_internvl_jax.train.checkpoint import is_training_checkpoint

    p = Path(path)
    if not p.exists():
        raise InitError(f"init_from {path} does not exist")
    if is_training_checkpoint(path):
        return "training"
    if is_converted_folder(p):
        return "converted"
    if (p / "config.json").is_file():
        return "huggingface"
    raise InitError(f"init_from {path} is neither a training checkpoint folder (step folders), "
                    "a converted folder (model_config.json + params/) nor a Hugging Face "
                    "folder (config.json + weights)")


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The run's model config: the init_from folder's own, or the preset."""
    kind = source_kind(cfg.init_from) if cfg.init_from else None
    if kind == "training":
        from mini_internvl_jax.train.checkpoint import read_meta

        meta = read_meta(cfg.init_from)[1]
        if "model_config" not in meta:
            raise InitError(f"init_from {cfg.init_from}: its metadata has no model_config")
        return build_model_config(cfg, meta["model_config"])
    if kind == "converted":
        from mini_internvl_jax.convert.orbax_io import read_converted

        return build_model_config(cfg, configlib.to_dict(read_converted(Path(cfg.init_from))[0]))
    if kind == "huggingface":
        from mini_internvl_jax.convert.importer import open_hf

        return build_model_config(cfg, configlib.to_dict(open_hf(cfg.init_from).info.config))
    return build_model_config(cfg)


def _check_same_layout(target, loaded, where: str) -> None:
    want = {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(target)}
    got = {tuple(p): tuple(v.shape) for p, v in nnx.to_flat_state(loaded)}
    if want != got:
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        shapes = [(p, got[p], want[p]) for p in want if p in got and got[p] != want[p]][:3]
        raise InitError(f"init_from {where}: its parameters differ from the model's (missing "
                        f"{missing}, unexpected {extra}, shape mismatches {shapes})")


def load_initial_params(model, cfg: TrainConfig, mesh) -> None:
    """Overwrites `model`'s base weights (not LoRA adapters) from `cfg.init_from`, in place."""
    target = nnx.state(model, base_params_filter)
    if source_kind(cfg.init_from) == "training":
        from mini_internvl_jax.train.export import load_checkpoint_model

        loaded = nnx.state(load_checkpoint_model(cfg.init_from, mesh=mesh)[0],
                           base_params_filter)
        _check_same_layout(target, loaded, cfg.init_from)
        loaded = jax.tree.map(lambda t, s: jax.device_put(s.astype(t.dtype), t.sharding),
                              target, loaded)
    else:
        from mini_internvl_jax.convert.load import load_pretrained

        mc = model.cfg
        source = load_pretrained(cfg.init_from, mc.param_dtype, mesh=mesh,
                                 scan_layers=mc.scan_layers, compute_dtype=mc.dtype)
        loaded = nnx.state(source, base_params_filter)
        _check_same_layout(target, loaded, cfg.init_from)
        loaded = jax.tree.map(lambda t, s: jax.device_put(s.astype(t.dtype), t.sharding),
                              target, loaded)
    nnx.update(model, loaded)
