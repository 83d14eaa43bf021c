"""Reading a training run's checkpoint folder without the trainer.

A run's `checkpoint.dir` holds Orbax step folders; each has a `params` item (every parameter,
LoRA adapters included) and a `meta` item (the run's configs as JSON). Chat, evaluation, export
and `init_from` need only these two, so they live here, below train/: the trainer imports this
module, never the other way round. Meta written before `ComputeConfig` existed (dtype, remat,
... at the top level of the train config and inside the model config) still reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mini_internvl_jax import configlib
from mini_internvl_jax.config import (
    LEGACY_COMPUTE_KEYS,
    ComputeConfig,
    ModelConfig,
    model_config_from_dict,
    split_legacy_compute,
)
from mini_internvl_jax.errors import UserError, first_line, silence_abandoned_reads
from mini_internvl_jax.fileio import absolute_path
from mini_internvl_jax.models import InternVLModel
from mini_internvl_jax.models.lora import LoRAConfig, apply_lora, merge_lora
from mini_internvl_jax.sharding import make_mesh, state_shardings


class CheckpointError(UserError, RuntimeError):
    """A checkpoint folder that cannot be used; the message names it."""


# Errors a damaged step folder raises while restoring (TensorStore reports corrupt or truncated
# files as ValueError; missing ones as FileNotFoundError / OSError).
RESTORE_ERRORS = (ValueError, KeyError, TypeError, OSError, RuntimeError)


def read_meta(directory: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta JSON) of a run's checkpoint (the latest when `step` is None)."""
    path = absolute_path(directory)
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{path} holds no training checkpoint (no step folders)")
        steps = sorted(mngr.all_steps())
        if step not in steps:
            raise CheckpointError(f"{path} has no checkpoint step {step}; its steps: "
                                  f"{', '.join(map(str, steps)) or 'none'}")
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except CheckpointError:
        raise
    except RESTORE_ERRORS as e:
        silence_abandoned_reads()
        raise CheckpointError(f"{path} step {step}: unreadable run metadata "
                              f"({first_line(e)})") from e
    finally:
        mngr.close()
    return step, meta


# What Orbax writes last into a step folder on a store that cannot rename (GCS); a step folder
# without it is a save that did not finish.
ORBAX_COMMIT_FILE = "commit_success.txt"


def finished_steps(directory: str) -> list[int]:
    """The steps of a run on a store whose save finished, listed with epath only: Orbax's own
    listing of a `gs://` folder needs the google-cloud-storage client."""
    return sorted(int(p.name) for p in epath.Path(directory).iterdir()
                  if p.name.isdigit() and (p / ORBAX_COMMIT_FILE).exists())


def is_training_checkpoint(directory: str) -> bool:
    path = epath.Path(directory)
    return path.is_dir() and any((p / "meta").exists() for p in path.iterdir()
                                 if p.name.isdigit())


# What a run writes before its first checkpoint step is finished.
RUN_FOLDER_SIGNS = ("metrics.jsonl", "compile_cache")


def is_unsaved_run(directory: str) -> bool:
    """A training run's folder without a finished step: logs, a compile cache or a step save
    still in progress (`STEP.orbax-checkpoint-tmp`), but no step folder with `meta`."""
    path = epath.Path(directory)
    return path.is_dir() and not is_training_checkpoint(directory) and any(
        p.name in RUN_FOLDER_SIGNS or ".orbax-checkpoint-tmp" in p.name or
        p.name.startswith("events.out.tfevents") for p in path.iterdir())


def upgrade_train_config_dict(data: dict) -> dict:
    """A stored train config with the run-time keys an older version kept at its top level
    moved into `compute`, so today's TrainConfig reads it."""
    legacy = {k: data[k] for k in LEGACY_COMPUTE_KEYS if k in data}
    if not legacy:
        return data
    rest = {k: v for k, v in data.items() if k not in legacy}
    return {**rest, "compute": {**legacy, **rest.get("compute", {})}}


@dataclass(frozen=True)
class RunFolder:
    """What a step of a training run records about itself."""

    path: str
    step: int
    model_config: ModelConfig
    compute: ComputeConfig   # the run's own (its parameters' dtype and layer layout)
    lora: LoRAConfig
    tokenizer: str | None
    train_config: dict       # the run's TrainConfig as plain data (compute keys upgraded)


def read_run(run_dir: str, step: int | None = None) -> RunFolder:
    """The run's configs at `step` (the latest when None)."""
    step, meta = read_meta(run_dir, step)
    where = f"{run_dir} step {step}"
    try:
        train = upgrade_train_config_dict(dict(meta["train_config"]))
        model_cfg = model_config_from_dict(
            split_legacy_compute(dict(meta["model_config"]), f"{where} metadata")[0])
        compute = configlib.from_dict(ComputeConfig, train.get("compute", {}), "compute")
        lora = configlib.from_dict(LoRAConfig, train.get("lora", {}), "lora")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: no usable run metadata ({e})") from e
    return RunFolder(str(run_dir), step, model_cfg, compute, lora, train.get("tokenizer"), train)


def restore_model(run: RunFolder, compute: ComputeConfig | None = None, *, mesh=None
                  ) -> InternVLModel:
    """The run's model with its LoRA adapters merged, parameters only (no optimizer state).

    `compute` None runs it as the run did (remat off). The parameters are read in the layer
    layout the run stored (`compute.scan_layers` must match it) and cast to
    `compute.param_dtype` afterwards.
    """
    want = compute or run.compute.replace(remat="none", check_image_tokens=True)
    if want.scan_layers != run.compute.scan_layers:
        raise CheckpointError(
            f"{run.path} step {run.step} stores its layers "
            f"{'stacked' if run.compute.scan_layers else 'one by one'}; load it with "
            f"scan_layers={str(run.compute.scan_layers).lower()}, or export it to a converted "
            "folder first (which loads either way)")
    stored = want.replace(param_dtype=run.compute.param_dtype)
    mesh = mesh or make_mesh(1, 1, 1, jax.devices()[:1])

    def make():
        model = InternVLModel(run.model_config, stored, rngs=nnx.Rngs(0))
        apply_lora(model, run.lora, nnx.Rngs(1))
        return model

    with nnx.use_eager_sharding(False):
        # flax types a split by 2+ filters as variadic; two filters give exactly three parts.
        graphdef, params, rest = nnx.split(  # type: ignore[misc]
            nnx.eval_shape(make), nnx.Param, ...)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          params, state_shardings(params, mesh))
    path = absolute_path(run.path)
    mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
    try:
        params = mngr.restore(run.step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))["params"]
    except RESTORE_ERRORS as e:
        silence_abandoned_reads()
        raise CheckpointError(f"{path / str(run.step)}: its parameters cannot be restored "
                              f"(damaged, or not matching its own metadata): {first_line(e)}"
                              ) from e
    finally:
        mngr.close()
    rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), rest)
    model = nnx.merge(graphdef, params, rest)
    merge_lora(model)
    if want.param_dtype != stored.param_dtype:
        dtype = jnp.dtype(want.param_dtype)
        nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(model, nnx.Param)))
    model.compute = want
    return model
