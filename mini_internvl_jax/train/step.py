"""The training step: one pure function, jitted once with explicit shardings and donated state.

A step takes a batch of `grad_accum` micro-batches (leading axis A), accumulates float32
gradients over them with `lax.scan`, and normalises by the loss weights of the whole step, so
A micro-batches give exactly the gradient of one big batch. A step whose loss or gradient norm
is not finite leaves parameters and optimizer state untouched and is counted instead.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mini_internvl_jax.batch import IGNORE_INDEX
from mini_internvl_jax.models import lora
from mini_internvl_jax.train.loss import cross_entropy_sums
from mini_internvl_jax.train.state import TrainState


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def make_step_fn(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                 loss_chunk: int, drop_path: bool, lora_dropout: bool,
                 packed: bool = True) -> Callable:
    """`step(state, frozen, rest, batch) -> (state, metrics)`, not yet jitted."""

    def loss_fn(params, frozen, rest, micro, total_w, key):
        model = nnx.merge(graphdef, params, frozen, rest)
        hidden = model.hidden_states(
            micro["input_ids"], micro["pixel_values"], micro["image_flags"],
            micro["positions"], micro["segment_ids"] if packed else None,
            dropout_key=key if drop_path else None).hidden
        ce, w, correct = cross_entropy_sums(hidden, micro["labels"], micro["loss_weights"],
                                            model.llm.logits, chunk=loss_chunk)
        return ce / total_w, (ce, w, correct)

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def micro_grads(params, frozen, rest, micro, total_w, key):
        if lora_dropout:
            rest = lora.with_dropout_keys(rest, jax.random.fold_in(key, 1))
        grads, aux = grad_fn(params, frozen, rest, micro, total_w, key)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), aux

    def step(state: TrainState, frozen, rest, batch):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        weights = jnp.where(batch["labels"] == IGNORE_INDEX, 0.0,
                            batch["loss_weights"].astype(jnp.float32))
        total_w = jnp.sum(weights)
        safe_w = jnp.where(total_w > 0, total_w, 1.0)
        n_micro = batch["input_ids"].shape[0]
        if n_micro == 1:
            micro = jax.tree.map(lambda x: x[0], batch)
            grads, aux = micro_grads(state.params, frozen, rest, micro, safe_w,
                                     jax.random.fold_in(step_key, 0))
        else:
            def body(carry, xs):
                i, micro = xs
                g, aux = micro_grads(state.params, frozen, rest, micro, safe_w,
                                     jax.random.fold_in(step_key, i))
                return (_add(carry[0], g), _add(carry[1], aux)), None

            zero_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zero = jnp.zeros((), jnp.float32)
            (grads, aux), _ = jax.lax.scan(body, (zero_g, (zero, zero, zero)),
                                           (jnp.arange(n_micro), batch))
        ce, w, correct = aux
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        loss = ce / safe_w
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        applied = state.step - state.skipped
        new_state = TrainState(
            params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
            step=state.step + 1, rng=state.rng,
            bad_steps=jnp.where(ok, 0, state.bad_steps + 1).astype(jnp.int32),
            skipped=(state.skipped + (~ok).astype(jnp.int32)).astype(jnp.int32))
        metrics = {
            "loss": loss, "grad_norm": grad_norm, "lr": schedule(applied),
            "accuracy": correct / jnp.where(w > 0, w, 1.0), "loss_weight": total_w,
            "supervised_tokens": jnp.sum(weights > 0).astype(jnp.int32),
            "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.int32),
            "finite": ok, "bad_steps": new_state.bad_steps, "skipped": new_state.skipped,
        }
        return new_state, metrics

    return step


def jit_step(step_fn, mesh, state_sh, frozen_sh, rest_sh, batch_sh):
    """jax.jit with explicit shardings; the TrainState (argument 0) is donated."""
    return jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, rest_sh, batch_sh),
                   out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))
