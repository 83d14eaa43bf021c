"""A training run's folder: its layout, its metadata record and its one reader.

A run's `checkpoint.dir` holds Orbax step folders of four items (the names below): `params`
(every parameter, frozen and LoRA included, so a step alone is a complete model), `train`
(optimizer state, step, RNG, bad-step counters), `data` (each host's iterator position) and
`meta` (a `RunMeta`, as JSON). `checkpointer.Checkpointer` is the one writer; chat, evaluation,
export and `init_from` read through `read_run`/`restore_model` here, below train/. Meta written
before `ComputeConfig` existed (dtype, remat, ... at the top level of the train config and inside
the model config) still reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

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

# The items of a step folder.
PARAMS = "params"
TRAIN = "train"
DATA = "data"
META = "meta"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint folder that cannot be used; the message names it."""


# Errors a damaged step folder raises while restoring (TensorStore reports corrupt or truncated
# files as ValueError; missing ones as FileNotFoundError / OSError).
RESTORE_ERRORS = (ValueError, KeyError, TypeError, OSError, RuntimeError)


@dataclass(frozen=True)
class RunMeta:
    """What a step folder records about its run (the `meta` item)."""

    train_config: dict[str, Any]   # the run's TrainConfig as plain data
    model_config: dict[str, Any]   # the resolved ModelConfig as plain data
    step: int
    process_count: int | None = None
    data_fingerprint: str | None = None  # sha256 of the data meta file (train.resume)
    # Guarded settings a resume was allowed to change (`key: old -> new`), if any.
    resumed_with_changes: tuple[str, ...] = ()

    @classmethod
    def of_run(cls, train_config: Any, model_config: ModelConfig, step: int, *,
               data_fingerprint: str | None = None) -> RunMeta:
        return cls(configlib.to_dict(train_config), configlib.to_dict(model_config), step,
                   jax.process_count(), data_fingerprint)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items()
               if k != "resumed_with_changes"}
        if self.resumed_with_changes:
            out["resumed_with_changes"] = list(self.resumed_with_changes)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> RunMeta:
        try:
            return cls(dict(data["train_config"]), dict(data["model_config"]),
                       int(data.get("step", 0)), data.get("process_count"),
                       data.get("data_fingerprint"),
                       tuple(data.get("resumed_with_changes", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: no usable run metadata ({e})") from e


@contextlib.contextmanager
def _reader(path: epath.Path) -> Iterator[ocp.CheckpointManager]:
    mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False))
    try:
        yield mngr
    finally:
        mngr.close()


def restore_items(manager: ocp.CheckpointManager, step: int, args: dict[str, Any],
                  failed: Callable[[str], str]) -> dict[str, Any]:
    """The one restore of step items (`args`: item name -> Orbax restore args); a failure is a
    CheckpointError saying `failed(first line of the cause)`."""
    try:
        out = manager.restore(step, args=ocp.args.Composite(**args))
    except RESTORE_ERRORS as e:
        silence_abandoned_reads()
        raise CheckpointError(failed(first_line(e))) from e
    return {k: out[k] for k in args}


def read_meta(directory: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta JSON) of a run's checkpoint (the latest when `step` is None)."""
    path = absolute_path(directory)
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    with _reader(path) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{path} holds no training checkpoint (no step folders)")
        steps = sorted(mngr.all_steps())
        if step not in steps:
            raise CheckpointError(f"{path} has no checkpoint step {step}; its steps: "
                                  f"{', '.join(map(str, steps)) or 'none'}")
        out = restore_items(mngr, step, {META: ocp.args.JsonRestore()},
                            lambda cause: f"{path} step {step}: unreadable run metadata ({cause})")
    return step, out[META]


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
    meta: RunMeta            # as stored, but the train config's compute keys upgraded


def read_run(run_dir: str, step: int | None = None) -> RunFolder:
    """The run's configs at `step` (the latest when None)."""
    step, data = read_meta(run_dir, step)
    where = f"{run_dir} step {step}"
    meta = RunMeta.from_json(data, where)
    train = upgrade_train_config_dict(meta.train_config)
    meta = dataclasses.replace(meta, train_config=train)
    try:
        model_cfg = model_config_from_dict(
            split_legacy_compute(dict(meta.model_config), f"{where} metadata")[0])
        compute = configlib.from_dict(ComputeConfig, train.get("compute", {}), "compute")
        lora = configlib.from_dict(LoRAConfig, train.get("lora", {}), "lora")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: no usable run metadata ({e})") from e
    return RunFolder(str(run_dir), step, model_cfg, compute, lora, train.get("tokenizer"), meta)


def restore_model(run: RunFolder, compute: ComputeConfig | None = None, *, mesh=None
                  ) -> InternVLModel:
    """The run's model with its LoRA adapters merged, parameters only (no optimizer state).

    `compute` None runs it as the run did (remat off). The parameters are read in the layer
    layout the run stored (`compute.scan_layers` must match it) and cast to
    `compute.param_dtype` afterwards.
    """
    want = compute or run.compute.replace(remat="none", remat_vision=None, check_image_tokens=True)
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
    with _reader(path) as mngr:
        params = restore_items(
            mngr, run.step, {PARAMS: ocp.args.StandardRestore(target)},
            lambda cause: f"{path / str(run.step)}: its parameters cannot be restored (damaged, "
                          f"or not matching its own metadata): {cause}")[PARAMS]
    rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), rest)
    model = nnx.merge(graphdef, params, rest)
    merge_lora(model)
    if want.param_dtype != stored.param_dtype:
        dtype = jnp.dtype(want.param_dtype)
        nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(model, nnx.Param)))
    model.compute = want
    return model
