"""The MPO training step: per-pair log-probs of packed preference rows, the reference's, the
mixed preference loss (`train.preference`), one optimizer update.

Per micro-batch the policy runs once over rows that hold whole pairs (chosen and rejected as
two segments, the ViT once per pair: see `data.preference`); every answer token's log-prob is
summed into its pair slot. The reference log-probs come either from a forward of the frozen
reference parameters inside the step (no gradient; a copy of the *trainable* parameters at
initialisation, sharded like them: parts frozen in training are shared with the policy, and with
LoRA the copy is the freshly initialised adapters, i.e. the base model) or from the batch
(`ref_logps`, precomputed by `reference_pass`).

The loss of a step is the mean over its pairs; BCO's running reward shift is updated once per
micro-batch, in order, and carried in `TrainState.extra` (checkpointed with the step).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mini_internvl_jax.batch import IGNORE_INDEX
from mini_internvl_jax.models import lora
from mini_internvl_jax.train.preference import (
    PairLogps,
    PreferenceConfig,
    RunningMean,
    init_running,
    metric_sums,
    pair_losses,
)
from mini_internvl_jax.train.state import TrainState
from mini_internvl_jax.train.step import compute_copy, guarded_update


def _chunk_logps(h, head, labels, dtype):
    logits = jnp.einsum("bcd,dv->bcv", h.astype(dtype), head,
                        preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
    target = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.where(labels == IGNORE_INDEX, 0.0, target - lse)


def token_logps(hidden: jax.Array, head: jax.Array, labels: jax.Array, *, chunk: int,
                dtype=None) -> jax.Array:
    """log p(label[t]) for hidden [B, S, D], head [D, V], shifted labels [B, S]; 0 where
    IGNORE_INDEX. `chunk` positions at a time, each chunk's logits recomputed in the backward
    pass (never the whole [B, S, V] tensor)."""
    dtype = jnp.dtype(head.dtype if dtype is None else dtype)
    b, s, d = hidden.shape
    chunk = min(chunk, s)
    n = -(-s // chunk)
    pad = n * chunk - s
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    head = head.astype(dtype)
    body = jax.checkpoint(lambda h, lab: _chunk_logps(h, head, lab, dtype))
    hs = jnp.moveaxis(hidden.reshape(b, n, chunk, d), 1, 0)
    ls = jnp.moveaxis(labels.reshape(b, n, chunk), 1, 0)
    out = jax.lax.map(lambda xs: body(*xs), (hs, ls))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk)[:, :s]


def pair_sums(tok_lp: jax.Array, pair_slot: jax.Array, num_pairs: int
              ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(chosen, rejected) log-prob sums and token counts [P] from per-token log-probs."""
    slots = 2 * num_pairs + 1
    sums = jax.ops.segment_sum(tok_lp.reshape(-1), pair_slot.reshape(-1), num_segments=slots)
    counts = jax.ops.segment_sum(jnp.ones(pair_slot.size, jnp.float32), pair_slot.reshape(-1),
                                 num_segments=slots)
    return sums[1::2], sums[2::2], counts[1::2], counts[2::2]


def sequence_hidden(model, micro: dict, *, packed: bool, dropout_key=None) -> jax.Array:
    """Final hidden states of a preference micro-batch; image-context tokens take the vision
    token `vision_index` names, so a pair's two answers read one set of tiles."""
    x = model.llm.embed(micro["input_ids"])
    feats = model.image_features(micro["pixel_values"], dropout_key=dropout_key)
    flat = feats.reshape(-1, feats.shape[-1])
    idx = micro["vision_index"]
    gathered = jnp.take(flat, jnp.clip(idx, 0, flat.shape[0] - 1), axis=0).astype(x.dtype)
    x = jnp.where((idx >= 0)[..., None], gathered, x)
    seg = micro["segment_ids"] if packed else None
    return model.llm(x, micro["positions"], seg, remat=model.compute.remat).hidden


def sequence_logps(model, micro: dict, num_pairs: int, *, packed: bool, loss_chunk: int,
                   dropout_key=None):
    """(chosen, rejected, chosen tokens, rejected tokens) [P] for one micro-batch."""
    hidden = sequence_hidden(model, micro, packed=packed, dropout_key=dropout_key)
    llm = model.llm
    head = llm.embed_tokens[...].T if llm.lm_head is None else llm.lm_head[...]
    lp = token_logps(hidden, head, micro["labels"], chunk=loss_chunk, dtype=llm.dtype)
    return pair_sums(lp, micro["pair_slot"], num_pairs)


def complete_pairs(batch) -> jax.Array:
    """How many pair slots of the step's micro-batches hold both a chosen and a rejected
    answer (float32): the denominator of the step's mean loss."""
    valid = jax.vmap(lambda m: pair_sums(jnp.zeros(m["pair_slot"].shape, jnp.float32),
                                         m["pair_slot"], m["ref_logps"].shape[0])[2:])(batch)
    return jnp.sum((valid[0] > 0) & (valid[1] > 0)).astype(jnp.float32)


def make_preference_step_fn(graphdef, tx: optax.GradientTransformation,
                            schedule: optax.Schedule, pref: PreferenceConfig, *,
                            loss_chunk: int, drop_path: bool, lora_dropout: bool,
                            packed: bool = True, compute_dtype=None) -> Callable:
    """`step(state, batch, ref_params) -> (state, metrics)`, not yet jitted;
    `ref_params` (the reference's trainable part) is None with precomputed log-probs."""

    def logps(params, frozen, rest, micro, key):
        model = nnx.merge(graphdef, params, frozen, rest)
        num_pairs = micro["ref_logps"].shape[0]
        return sequence_logps(model, micro, num_pairs, packed=packed, loss_chunk=loss_chunk,
                              dropout_key=key if drop_path else None)

    def loss_fn(params, frozen, rest, micro, ref_params, running, n_pairs, key):
        c, r, n_c, n_r = logps(params, frozen, rest, micro, key)
        if ref_params is None:
            ref_c, ref_r = micro["ref_logps"][:, 0], micro["ref_logps"][:, 1]
        else:  # no drop path; LoRA reference adapters are zero (B = 0), so their dropout is moot
            ref_c, ref_r, _, _ = jax.lax.stop_gradient(
                logps(ref_params, frozen, rest, micro, None))
        lp = PairLogps(c, r, ref_c, ref_r, n_c, n_r, (n_c > 0) & (n_r > 0))
        per_pair, terms, running = pair_losses(pref, lp, running)
        return jnp.sum(per_pair) / n_pairs, (metric_sums(terms, lp), running)

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch, ref_params):
        frozen, rest = state.frozen, state.rest
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        total_pairs = complete_pairs(batch)
        n_pairs = jnp.maximum(total_pairs, 1.0)
        params = compute_copy(state.params, compute_dtype)
        frozen_c = compute_copy(frozen, compute_dtype)
        ref_c = None if ref_params is None else compute_copy(ref_params, compute_dtype)
        running0 = RunningMean(*state.extra["bco_running"])

        def body(carry, xs):
            grads, sums, running = carry
            i, micro = xs
            key = jax.random.fold_in(step_key, i)
            rest_k = lora.with_dropout_keys(rest, jax.random.fold_in(key, 1)) \
                if lora_dropout else rest
            g, (m, running) = grad_fn(params, frozen_c, rest_k, micro, ref_c, running,
                                      n_pairs, key)
            g = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (g, jax.tree.map(jnp.add, sums, m), running), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        first = jax.tree.map(lambda x: x[0], batch)
        sums0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: loss_fn(params, frozen_c, rest, first, ref_c, running0, n_pairs,
                            step_key)[1][0]))
        n_micro = batch["input_ids"].shape[0]
        (grads, sums, running), _ = jax.lax.scan(body, (zeros, sums0, running0),
                                                 (jnp.arange(n_micro), batch))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        loss = sum(sums[f"loss_{t}"] * w for t, w in
                   zip(pref.loss_types, pref.loss_weights, strict=True)) / n_pairs
        if pref.rpo_alpha is not None:
            loss = loss + pref.rpo_alpha * sums["loss_nll"] / n_pairs
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        applied = state.step - state.skipped
        new_state = guarded_update(state, grads, ok, tx, {"bco_running": tuple(running)})
        means = {f"pref/{k}": v / n_pairs for k, v in sums.items() if k != "pairs"}
        metrics = {
            "loss": loss, "grad_norm": grad_norm, "lr": schedule(applied),
            "accuracy": means["pref/rewards_accuracy"], "pairs": total_pairs,
            "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.int32),
            "finite": ok, "bad_steps": new_state.bad_steps, "skipped": new_state.skipped,
            "pref/bco_delta": new_state.extra["bco_running"][0], **means,
        }
        return new_state, metrics

    return step


def initial_extra() -> dict:
    """What `TrainState.extra` holds for MPO at step 0."""
    return {"bco_running": tuple(init_running())}
