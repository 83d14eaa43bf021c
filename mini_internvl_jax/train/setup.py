"""Everything a run needs before its first step: mesh, model, split parameters, optimizer,
jitted step and shardings. `build` makes real arrays; `build_abstract` only shapes (AOT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from mini_internvl_jax.batch import Batch, BatchSpec
from mini_internvl_jax.config import ModelConfig
from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.models import InternVLModel
from mini_internvl_jax.models.lora import apply_lora
from mini_internvl_jax.placement import batch_abstract, batch_shardings, to_global
from mini_internvl_jax.sharding import batch_shards, create_sharded_model
from mini_internvl_jax.train import preference_run
from mini_internvl_jax.train.batches import batch_spec
from mini_internvl_jax.train.config import TrainConfig, build_model_config
from mini_internvl_jax.train.optim import make_optimizer, make_schedule
from mini_internvl_jax.train.state import (
    TrainState,
    abstract_like,
    abstract_train_state,
    init_train_state,
    split_params,
    train_state_shardings,
)
from mini_internvl_jax.train.step import jit_step, make_step_fn


@dataclass
class Setup:
    """The state (concrete, or abstract: ShapeDtypeStructs with shardings), where it lives, and
    the jitted `step(state, batch)`; the rest is kept for callers that build their own step."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    mesh: Mesh
    state: TrainState
    state_sh: TrainState
    batch: BatchSpec
    batch_sh: Batch | dict     # MPO: a dict with the pair fields too
    step_fn: Any               # jitted
    graphdef: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule

    def batch_abstract(self) -> Batch | dict:
        if isinstance(self.batch_sh, dict):  # MPO: the batch fields plus the pair fields
            return preference_run.batch_abstract(self.cfg, self.model_cfg, self.batch_sh)
        return batch_abstract(self.batch, self.batch_sh)

    def place(self, host: dict) -> Batch | dict:
        """One step's host arrays as global arrays on the mesh."""
        if isinstance(self.batch_sh, dict):  # MPO
            return preference_run.to_global(host, self.batch_sh)
        return to_global(host, self.batch_sh)


def model_factory(model_cfg: ModelConfig, cfg: TrainConfig):
    def make():
        model = InternVLModel(model_cfg, cfg.model_compute, rngs=nnx.Rngs(cfg.seed))
        apply_lora(model, cfg.lora, nnx.Rngs(cfg.seed + 1))
        return model

    return make


def check_batch_fits_mesh(cfg: TrainConfig, mesh: Mesh) -> None:
    """Every batch shard (data x fsdp by the rules) must get whole rows and tiles, or work would
    be replicated."""
    shards = batch_shards(mesh)
    for name, n in (("rows per micro-batch (batch_size / optim.grad_accum)",
                     cfg.micro_batch_size), ("max_tiles", cfg.max_tiles)):
        if n % shards:
            raise ConfigError(f"{name} = {n} is not a multiple of mesh data x fsdp = {shards}; "
                              "every batch shard needs its own rows and tiles")


def _finish(cfg, model_cfg, mesh, graphdef, trainable, frozen, rest, *, abstract: bool):
    check_batch_fits_mesh(cfg, mesh)
    if not jax.tree.leaves(trainable):
        raise ValueError(f"nothing to train: stage {cfg.stage} with frozen parts "
                         f"{sorted(cfg.frozen_components)} leaves no trainable parameter")
    tx = make_optimizer(cfg.optim, cfg.total_steps, trainable)
    schedule = make_schedule(cfg.optim, cfg.total_steps)
    abs_state = abstract_train_state(trainable, frozen, rest, tx, cfg.seed)
    if cfg.preference is not None:
        abs_state.extra = preference_run.abstract_state_extra()
    rules = cfg.mesh.rule_table
    state_sh = train_state_shardings(abs_state, mesh, rules)
    spec = batch_spec(cfg, model_cfg)
    batch_sh: Batch | dict
    if cfg.preference is not None:
        batch_sh = preference_run.batch_shardings(
            mesh, preference_run.global_shapes(cfg, model_cfg))
        step_fn = preference_run.build_step(cfg, model_cfg, mesh, graphdef, tx, schedule,
                                            trainable, state_sh, batch_sh, abstract=abstract)
    else:
        batch_sh = batch_shardings(mesh, spec)
        step_fn = jit_step(
            make_step_fn(graphdef, tx, schedule, loss_chunk=cfg.loss_chunk,
                         drop_path=model_cfg.vision.drop_path_rate > 0,
                         lora_dropout=cfg.lora.rank > 0 and cfg.lora.dropout > 0,
                         packed=cfg.packed, compute_dtype=cfg.model_compute.dtype),
            mesh, state_sh, batch_sh)
    if abstract:
        state = abstract_like(abs_state, state_sh)
    else:
        state = init_train_state(trainable, frozen, rest, tx, mesh, cfg.seed, rules)
        if cfg.preference is not None:
            state.extra = preference_run.initial_state_extra(mesh)
    return Setup(cfg, model_cfg, mesh, state, state_sh, spec, batch_sh, step_fn, graphdef, tx,
                 schedule)


def build(cfg: TrainConfig, mesh: Mesh, model_cfg: ModelConfig | None = None,
          init_params=None) -> Setup:
    """Real arrays, placed on `mesh`. `init_params(model)` may overwrite the fresh weights."""
    model_cfg = model_cfg or build_model_config(cfg)
    model = create_sharded_model(model_factory(model_cfg, cfg), mesh, cfg.mesh.rule_table)
    if init_params is not None:
        init_params(model)
    graphdef, trainable, frozen, rest = split_params(model, cfg.frozen_components)
    return _finish(cfg, model_cfg, mesh, graphdef, trainable, frozen, rest, abstract=False)


def build_abstract(cfg: TrainConfig, mesh: Mesh, model_cfg: ModelConfig | None = None) -> Setup:
    """Shapes and shardings only: nothing is allocated (AOT compilation, restore targets)."""
    model_cfg = model_cfg or build_model_config(cfg)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(model_factory(model_cfg, cfg))
    graphdef, trainable, frozen, rest = split_params(model, cfg.frozen_components)
    return _finish(cfg, model_cfg, mesh, graphdef, trainable, frozen, rest, abstract=True)
