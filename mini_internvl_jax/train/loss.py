"""Weighted cross-entropy over the vocabulary without materialising the whole logits tensor.

For W1 (4 x 4096 tokens, 151,655 classes) full float32 logits would take 10 GB, and as much
again for their gradient. Here the sequence is cut into chunks; each chunk's logits are computed,
reduced to per-token losses and dropped, and recomputed in the backward pass (`jax.checkpoint`).

Labels arrive already shifted (label[t] is the target for the token at t) with IGNORE_INDEX;
the loss is sum(w * ce) / sum(w) with w the packed-sequence loss weights.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mini_internvl_jax.batch import IGNORE_INDEX


def _chunk_sums(logits_fn, h, labels, weights):
    logits = logits_fn(h).astype(jnp.float32)  # [B, c, V]
    lse = jax.nn.logsumexp(logits, axis=-1)
    safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
    target = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    w = jnp.where(labels == IGNORE_INDEX, 0.0, weights.astype(jnp.float32))
    ce = lse - target
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(w * ce), jnp.sum(w), jnp.sum(jnp.where(w > 0, correct, 0.0))


def cross_entropy_sums(hidden: jax.Array, labels: jax.Array, weights: jax.Array,
                       logits_fn: Callable[[jax.Array], jax.Array], *, chunk: int
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum(w*ce), sum(w), #correct supervised tokens) for hidden [B, S, D], labels [B, S].

    `logits_fn` maps hidden [B, c, D] to logits [B, c, V]; `chunk` positions go through it at a
    time (the batch dimension stays whole, so its sharding is kept).
    """
    b, s, _ = hidden.shape
    if chunk >= s:
        return _chunk_sums(logits_fn, hidden, labels, weights)
    n = -(-s // chunk)
    pad = n * chunk - s
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
        weights = jnp.pad(weights, ((0, 0), (0, pad)))

    def split(x):  # [B, n*c, ...] -> [n, B, c, ...]
        return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(carry, xs):
        sums = _chunk_sums(logits_fn, *xs)
        return tuple(a + b for a, b in zip(carry, sums, strict=True)), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(body, (zero, zero, zero), (split(hidden), split(labels),
                                                      split(weights)))
    return sums
