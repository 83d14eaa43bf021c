"""The training step: one pure function, jitted once with explicit shardings and donated state.

A step takes a batch of `grad_accum` micro-batches (leading axis A), accumulates float32
gradients over them with `lax.scan`, and normalises by the loss weights of the whole step, so
A micro-batches give exactly the gradient of one big batch. A step whose loss or gradient norm
is not finite leaves parameters and optimizer state untouched and is counted instead.

With data parallelism (mesh axis `data` > 1, e.g. across the slices of a multislice job) and
several micro-batches, each `data` group accumulates the gradient of its own rows (a vmap over
the groups with `spmd_axis_name='data'`; FSDP and tensor sharding stay as they are inside) and
the groups are summed once per step. Left to itself XLA sums the gradient over `data` after
every micro-batch: A times the bytes, which across slices travel the slow data-centre network.
(A `shard_map` manual over `data` alone would say the same, but XLA's SPMD partitioner aborts
on its embedding gather once fsdp and tensor are both > 1.)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mini_internvl_jax import placement  # noqa: F401  (registers Batch as a pytree)
from mini_internvl_jax.batch import IGNORE_INDEX, Batch
from mini_internvl_jax.models import lora
from mini_internvl_jax.models.stack import SCOPE_CAST, SCOPE_HEAD, SCOPE_OPTIMIZER
from mini_internvl_jax.sharding import data_group_axis, vmapped_axes
from mini_internvl_jax.train.loss import cross_entropy_sums
from mini_internvl_jax.train.state import TrainState


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _name(path) -> str:
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    return str(keys[-2] if keys and keys[-1] == "value" and len(keys) > 1 else keys[-1])


def compute_copy(params, dtype):
    """`params` with every Dense kernel in the compute dtype, the rest as they are.

    The layers cast their kernels at use; inside the scanned layer loops (forward, recompute
    and backward, and again in every micro-batch) that re-reads the float32 master weights and
    converts them each time, and FSDP gathers them in float32. Casting once per step before
    the loops gives the same values and the same gradients (the cotangent of a bfloat16 kernel
    is bfloat16 either way and widens to float32 unchanged), at half the bytes. Embedding
    tables and the LM head keep their dtype: their gradients accumulate in float32.
    """
    if dtype is None:
        return params
    dtype = jnp.dtype(dtype)
    return jax.tree.map_with_path(
        lambda path, x: x.astype(dtype) if _name(path) == "kernel"
        and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x, params)


def data_groups(batch: Batch) -> int:
    """How many `data` groups accumulate their own gradients: the active mesh's `data` size
    when it divides a micro-batch's rows and tiles, else 1 (XLA's own placement)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    size = dict(mesh.shape).get(data_group_axis(), 1)
    divides = all(x.shape[1] % size == 0 for x in jax.tree.leaves(batch))
    return size if size > 1 and divides else 1


def _stacked_zeros(params, groups: int):
    """float32 gradient accumulators; with groups, one per `data` group, kept sharded over
    `data` so the scan carry never gathers them."""
    if groups == 1:
        return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return jax.tree.map(lambda p: jax.lax.with_sharding_constraint(
        jnp.zeros((groups, *p.shape), jnp.float32),
        P(data_group_axis(), *(P.UNCONSTRAINED,) * p.ndim)), params)


def make_grads_fn(graphdef, *, loss_chunk: int, drop_path: bool, lora_dropout: bool,
                  packed: bool) -> Callable:
    """`grads(params, frozen, rest, batch, total_w, step_key) -> (grads, (ce, w, correct))`:
    float32 gradients of the loss (normalised by `total_w`) summed over the batch's
    micro-batches, with the cross-entropy sum, weight sum and correct-token count."""

    def loss_fn(params, frozen, rest, micro: Batch, total_w, key):
        model = nnx.merge(graphdef, params, frozen, rest)
        hidden = model.batch_hidden_states(micro, packed=packed,
                                           dropout_key=key if drop_path else None).hidden
        llm = model.llm
        head = llm.embed_tokens[...].T if llm.lm_head is None else llm.lm_head[...]
        with jax.named_scope(SCOPE_HEAD):
            ce, w, correct = cross_entropy_sums(hidden, micro.labels, micro.loss_weights, head,
                                                chunk=loss_chunk, dtype=llm.dtype)
        return ce / total_w, (ce, w, correct)

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def micro_grads(params, frozen, rest, micro, total_w, key):
        if lora_dropout:
            rest = lora.with_dropout_keys(rest, jax.random.fold_in(key, 1))
        grads, aux = grad_fn(params, frozen, rest, micro, total_w, key)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), aux

    def grouped_micro_grads(groups, params, frozen, rest, micro, total_w, key):
        """Per-`data`-group gradient sums, stacked on a leading axis sharded over `data`."""
        micro = jax.tree.map(lambda x: x.reshape(groups, -1, *x.shape[1:]), micro)
        keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(jnp.arange(groups))
        axis = data_group_axis()
        with vmapped_axes(axis):
            return jax.vmap(micro_grads, in_axes=(None, None, None, 0, None, 0),
                            spmd_axis_name=axis)(params, frozen, rest, micro, total_w, keys)

    def grads(params, frozen, rest, batch: Batch, total_w, step_key):
        n_micro = batch.input_ids.shape[0]
        if n_micro == 1:
            micro = jax.tree.map(lambda x: x[0], batch)
            return micro_grads(params, frozen, rest, micro, total_w,
                               jax.random.fold_in(step_key, 0))
        groups = data_groups(batch)
        grads_of = micro_grads if groups == 1 else partial(grouped_micro_grads, groups)

        def body(carry, xs):
            i, micro = xs
            g, aux = grads_of(params, frozen, rest, micro, total_w,
                              jax.random.fold_in(step_key, i))
            return (_add(carry[0], g), _add(carry[1], aux)), None

        zero = jnp.zeros(() if groups == 1 else (groups,), jnp.float32)
        (g, aux), _ = jax.lax.scan(body, (_stacked_zeros(params, groups), (zero, zero, zero)),
                                   (jnp.arange(n_micro), batch))
        if groups > 1:  # the one sum over `data` of this step
            g, aux = jax.tree.map(lambda x: jnp.sum(x, axis=0), (g, aux))
        return g, aux

    return grads


def guarded_update(state: TrainState, grads, ok, tx: optax.GradientTransformation,
                   extra=None) -> TrainState:
    """The optimizer update, and the objective's own state `extra` (MPO), kept as they were
    when the step is not finite (`ok` false); the bad-step counters follow `ok`."""
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    def keep(new, old):
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    return TrainState(
        params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
        step=state.step + 1, rng=state.rng,
        bad_steps=jnp.where(ok, 0, state.bad_steps + 1).astype(jnp.int32),
        skipped=(state.skipped + (~ok).astype(jnp.int32)).astype(jnp.int32),
        frozen=state.frozen, rest=state.rest, extra=keep(extra, state.extra))


def make_step_fn(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                 loss_chunk: int, drop_path: bool, lora_dropout: bool,
                 packed: bool = True, compute_dtype=None) -> Callable:
    """`step(state, batch) -> (state, metrics)`, not yet jitted.
    `compute_dtype`: cast the Dense kernels to it once per step (see `compute_copy`)."""
    grads_fn = make_grads_fn(graphdef, loss_chunk=loss_chunk, drop_path=drop_path,
                             lora_dropout=lora_dropout, packed=packed)

    def step(state: TrainState, batch: Batch):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        weights = jnp.where(batch.labels == IGNORE_INDEX, 0.0,
                            batch.loss_weights.astype(jnp.float32))
        total_w = jnp.sum(weights)
        safe_w = jnp.where(total_w > 0, total_w, 1.0)
        with jax.named_scope(SCOPE_CAST):
            params = compute_copy(state.params, compute_dtype)
            frozen = compute_copy(state.frozen, compute_dtype)
        grads, (ce, w, correct) = grads_fn(params, frozen, state.rest, batch, safe_w, step_key)
        with jax.named_scope(SCOPE_OPTIMIZER):
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
            loss = ce / safe_w
            grad_norm = optax.tree.norm(grads)
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            new_state = guarded_update(state, grads, ok, tx)
        applied = state.step - state.skipped
        metrics = {
            "loss": loss, "grad_norm": grad_norm, "lr": schedule(applied),
            "accuracy": correct / jnp.where(w > 0, w, 1.0), "loss_weight": total_w,
            "supervised_tokens": jnp.sum(weights > 0).astype(jnp.int32),
            "tokens": jnp.sum(batch.segment_ids > 0).astype(jnp.int32),
            "finite": ok, "bad_steps": new_state.bad_steps, "skipped": new_state.skipped,
        }
        return new_state, metrics

    return step


def jit_step(step_fn, mesh, state_sh, batch_sh):
    """jax.jit with explicit shardings; the TrainState (argument 0) is donated (its frozen
    parameters come back unchanged, in the same buffers)."""
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))
