"""A run's checkpoint as a model (LoRA merged), or as a converted folder for convert/.

    python -m mini_internvl_jax.train.export RUN_DIR OUT_DIR [--step N] [--overwrite]

writes OUT_DIR in the converter's layout (model_config.json + params/ + tokenizer files), so
`load_pretrained(OUT_DIR)` serves chat and evaluation and the converter exports it to Hugging
Face format. Adapters are folded into their kernels: W + scale * A @ B.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from mini_internvl_jax.config import ModelConfig, model_config_from_dict
from mini_internvl_jax.failures import EXIT_USER_ERROR, user_error
from mini_internvl_jax.sharding import make_mesh, state_shardings
from mini_internvl_jax.train.checkpoint import Checkpointer, CheckpointError, read_meta
from mini_internvl_jax.train.config import TrainConfig, train_config_from_dict
from mini_internvl_jax.train.lora import merge_lora
from mini_internvl_jax.train.setup import model_factory
from mini_internvl_jax.train.state import abstract_like


def load_checkpoint_model(run_dir: str, step: int | None = None, *, mesh=None
                          ) -> tuple[nnx.Module, ModelConfig, TrainConfig]:
    """(model with LoRA merged, its model config, the run's train config) of a checkpoint."""
    step, meta = read_meta(run_dir, step)
    try:
        cfg = train_config_from_dict(meta["train_config"])
        model_cfg = model_config_from_dict(meta["model_config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{run_dir} step {step}: no usable run metadata ({e})") from e
    mesh = mesh or make_mesh(1, 1, 1, jax.devices()[:1])
    with nnx.use_eager_sharding(False):
        graphdef, params, rest = nnx.split(nnx.eval_shape(model_factory(model_cfg, cfg)),
                                           nnx.Param, ...)
    ckpt = Checkpointer(run_dir, keep=1, async_save=False)
    try:
        params = ckpt.restore(step, params=abstract_like(
            params, state_shardings(params, mesh)))["params"]
    finally:
        ckpt.close()
    rest = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), rest)
    model = nnx.merge(graphdef, params, rest)
    merge_lora(model)
    return model, model_cfg, cfg


def export_checkpoint(run_dir: str, out_dir: str, *, step: int | None = None,
                      overwrite: bool = False) -> Path:
    """Writes the converted folder `out_dir` (atomically) from a run's checkpoint."""
    from mini_internvl_jax.convert.orbax_io import (
        PARAMS_DIR,
        copy_side_files,
        save_params,
        write_model_config,
    )
    from mini_internvl_jax.fileio import atomic_folder

    model, model_cfg, cfg = load_checkpoint_model(run_dir, step)
    flat = {tuple(p): np.asarray(jax.device_get(v.get_value()))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        save_params(tmp / PARAMS_DIR, flat)
        write_model_config(tmp, model_cfg.replace(remat="none"))
        tok = Path(cfg.tokenizer) if cfg.tokenizer else None
        if tok is not None and tok.is_dir():
            copy_side_files(tok, tmp)
    return Path(out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mini_internvl_jax.train.export",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="checkpoint.dir of a training run")
    p.add_argument("out_dir")
    p.add_argument("--step", type=int, help="default: the latest step")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        if Path(a.out_dir).exists() and not a.overwrite:
            raise FileExistsError(f"{a.out_dir} already exists; choose a new path or pass "
                                  "--overwrite")
        out = export_checkpoint(a.run_dir, a.out_dir, step=a.step, overwrite=a.overwrite)
    except Exception as e:  # noqa: BLE001 - user errors become one line, bugs re-raise
        line = user_error(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
