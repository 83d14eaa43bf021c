"""The training state and where every piece of it lives on the mesh.

The model's parameters are split three ways: trainable (the optimizer's tree), frozen (read,
never differentiated, no optimizer state) and the rest (non-parameter variables such as LoRA
dropout keys). All three ride in the TrainState, so the step is `step(state, batch)`; frozen and
rest come out of it unchanged. Shardings come from the logical names every parameter carries,
so the optimizer moments are sharded exactly like their parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mini_internvl_jax.models.lora import LoRAParam
from mini_internvl_jax.sharding import state_shardings

# What a TrainState's scalar leaves hold: arrays (the state itself), ShapeDtypeStructs (its
# abstract form) or NamedShardings (where each leaf lives) -- one tree structure for all three.
Leaf = TypeVar("Leaf", jax.Array, jax.ShapeDtypeStruct, NamedSharding)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState(Generic[Leaf]):
    params: nnx.State      # trainable parameters (master precision)
    opt_state: Any
    step: Leaf             # int32: steps taken, skipped ones included
    rng: Leaf              # uint32 key data; step keys are fold_in(rng, step)
    bad_steps: Leaf        # int32: consecutive non-finite steps
    skipped: Leaf          # int32: non-finite steps in total
    frozen: nnx.State      # parameters read, never differentiated (no optimizer state)
    rest: nnx.State        # non-parameter variables (LoRA dropout keys)
    extra: Any = None      # a training objective's own state (MPO: BCO's running reward mean)

    def all_params(self) -> nnx.State:
        """Every parameter, trainable and frozen: a checkpoint's `params` item."""
        return nnx.merge_state(self.params, self.frozen)

    def train_item(self) -> dict:
        """Everything but the parameters: a checkpoint's `train` item."""
        return {"opt_state": self.opt_state, "step": self.step, "rng": self.rng,
                "bad_steps": self.bad_steps, "skipped": self.skipped,
                **({} if self.extra is None else {"extra": self.extra})}


def trainable_filter(frozen_components: frozenset[str]):
    """nnx filter: parameters outside the frozen top-level parts, and every LoRA adapter."""

    def keep(path, value) -> bool:
        if isinstance(value, LoRAParam):
            return True
        return isinstance(value, nnx.Param) and path[0] not in frozen_components

    return keep


def split_params(model_or_state, frozen_components: frozenset[str]):
    """(graphdef, trainable, frozen, rest) for a model, or (trainable, frozen, rest) for a state."""
    filters = (trainable_filter(frozen_components), nnx.Param, ...)
    if isinstance(model_or_state, nnx.State):
        return nnx.split_state(model_or_state, *filters)
    return nnx.split(model_or_state, *filters)


def train_state_shardings(state: TrainState, mesh: Mesh, rules=None) -> TrainState[NamedSharding]:
    """Where every leaf of `state` (concrete or abstract) lives; the scalars are replicated."""
    rep = NamedSharding(mesh, P())
    return TrainState(params=state_shardings(state.params, mesh, rules),
                      opt_state=state_shardings(state.opt_state, mesh, rules), step=rep,
                      rng=rep, bad_steps=rep, skipped=rep,
                      frozen=state_shardings(state.frozen, mesh, rules),
                      rest=state_shardings(state.rest, mesh, rules),
                      extra=jax.tree.map(lambda _: rep, state.extra))


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (restore and AOT targets)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def init_train_state(params: nnx.State, frozen: nnx.State, rest: nnx.State, tx, mesh: Mesh,
                     seed: int, rules=None) -> TrainState[jax.Array]:
    """Fresh optimizer state, created directly in its sharded place."""
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_sh = state_shardings(abstract_opt, mesh, rules)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    rep = NamedSharding(mesh, P())
    key = jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)
    return TrainState(params=params, opt_state=opt_state,
                      step=jax.device_put(jnp.zeros((), jnp.int32), rep),
                      rng=jax.device_put(key, rep),
                      bad_steps=jax.device_put(jnp.zeros((), jnp.int32), rep),
                      skipped=jax.device_put(jnp.zeros((), jnp.int32), rep),
                      frozen=frozen, rest=rest)


def abstract_train_state(params, frozen, rest, tx, seed: int = 0
                         ) -> TrainState[jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a TrainState for abstract (or concrete) parameters."""
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    return TrainState(params=params, opt_state=jax.eval_shape(tx.init, params), step=scalar,
                      rng=key, bad_steps=scalar, skipped=scalar, frozen=frozen, rest=rest)
