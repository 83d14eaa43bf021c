"""A run's checkpoint as a converted folder (LoRA merged), for chat, evaluation and convert/.

`export_checkpoint` (the `mivl-export RUN_DIR OUT_DIR` command) writes OUT_DIR in the
converter's layout (model_config.json + params/ + tokenizer files), so
`load_pretrained(OUT_DIR)` serves chat and evaluation and the converter exports it to Hugging
Face format. Adapters are folded into their kernels: W + scale * A @ B.
"""

from __future__ import annotations

import jax
import numpy as np
from etils import epath
from flax import nnx

from mini_internvl_jax.checkpoints.resolve import open_source
from mini_internvl_jax.checkpoints.run import CheckpointError
from mini_internvl_jax.convert.orbax_io import (
    PARAMS_DIR,
    copy_side_files,
    save_params,
    write_model_config,
)
from mini_internvl_jax.fileio import atomic_folder


def export_checkpoint(run_dir: str, out_dir: str, *, step: int | None = None,
                      overwrite: bool = False) -> epath.Path:
    """Writes the converted folder `out_dir` (atomically) from a run's checkpoint: its
    architecture-only model config and its parameters (LoRA merged) as the run stored them."""
    source = open_source(run_dir, step=step)
    if source.kind != "training_run":
        raise CheckpointError(f"{run_dir} is not a training run's checkpoint folder (it is a "
                              f"{source.kind} folder)")
    model = source.load()
    flat = {tuple(p): np.asarray(jax.device_get(v.get_value()))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        save_params(tmp / PARAMS_DIR, flat)
        write_model_config(tmp, source.model_config)
        if source.tokenizer_dir is not None:
            copy_side_files(source.tokenizer_dir, tmp)
    return epath.Path(out_dir)  # a gs:// folder keeps its scheme

