"""Weighted cross-entropy over the vocabulary without materialising the whole logits tensor.

For W1 (4 x 4096 tokens, 151,655 classes) full float32 logits would take 10 GB, and as much
again for their gradient. Here the sequence is cut into chunks, and each chunk's logits are
computed, reduced and dropped. The gradient is formed in the same pass (a custom VJP): with the
chunk's logits at hand, d(loss)/d(logits) = w * (softmax - onehot) is two more matmuls away from
the hidden-state and head gradients, so the backward pass only scales what the forward pass
stored (the hidden-state gradient, [B, S, D], and the head gradient, [D, V] float32) by the
incoming cotangent. Autodiff through a rematerialised chunk would compute the logits matmul a
second time, and its transposed matmuls would take float32 operands.

Labels arrive already shifted (label[t] is the target for the token at t) with IGNORE_INDEX;
the loss is sum(w * ce) / sum(w) with w the packed-sequence loss weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mini_internvl_jax.batch import IGNORE_INDEX
from mini_internvl_jax.sharding import logical_to_spec, shard_activation


def _chunk(h, head, labels, weights, dtype, with_grads: bool, head_grad=None):
    """Sums (and, with_grads, d(sum w*ce)/dh [B, c, D] and /dhead [D, V], or per batch shard
    [shards, D, V] from `head_grad`) of one chunk."""
    hc = h.astype(dtype)
    # Rounded to the compute dtype, then read in float32: the PyTorch models do the same
    # (`lm_head` in bf16, then `logits.float()` for the loss), and it halves the bytes of the
    # largest arrays of the step (W1: [4, 1024, 151655] per chunk), which every pass below reads.
    rounded = jnp.einsum("bcd,dv->bcv", hc, head, preferred_element_type=jnp.float32)
    rounded = shard_activation(rounded.astype(dtype), ("batch", "length", "act_vocab"))
    logits = rounded.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
    # Gathered and compared in the compute dtype (the same values): a gather from the float32
    # logits makes XLA write them all to memory to read one per row.
    target = jnp.take_along_axis(rounded, safe[..., None], axis=-1)[..., 0].astype(jnp.float32)
    w = jnp.where(labels == IGNORE_INDEX, 0.0, weights.astype(jnp.float32))
    correct = (jnp.argmax(rounded, axis=-1) == labels).astype(jnp.float32)
    sums = (jnp.sum(w * (lse - target)), jnp.sum(w), jnp.sum(jnp.where(w > 0, correct, 0.0)))
    if not with_grads:
        return sums, None, None
    onehot = jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.float32)
    dlogits = ((jnp.exp(logits - lse[..., None]) - onehot) * w[..., None]).astype(dtype)
    dh = jnp.einsum("bcv,dv->bcd", dlogits, head, preferred_element_type=jnp.float32)
    if head_grad is None:
        dhead = jnp.einsum("bcd,bcv->dv", hc, dlogits, preferred_element_type=jnp.float32)
    else:
        dhead = head_grad(hc, dlogits)
    return sums, dh.astype(h.dtype), dhead


def _shard_partials(hc, dlogits) -> tuple[Callable, NamedSharding, int] | None:
    """(per-shard head-gradient function, its output sharding, the number of batch shards)
    under a mesh whose batch axes split the tokens, else None.

    Each batch shard's tokens give a partial [D, V] head gradient; summed inside the chunk loop
    as one [D, V] array, XLA reduce-scatters every chunk's partial sum (W1: 4 x 0.54 GB per
    chip per step, float32). Kept apart per shard ([shards, D, V], one [D, V] per chip) they
    are summed once, after the loop.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    h_spec = logical_to_spec(("batch", "length", None), hc.shape, mesh)
    l_spec = logical_to_spec(("batch", "length", "act_vocab"), dlogits.shape, mesh)
    if h_spec[0] is None or h_spec[0] != l_spec[0]:
        return None
    out_spec = P(h_spec[0], None, l_spec[2])

    def local(h, d):
        return jnp.einsum("bcd,bcv->dv", h, d, preferred_element_type=jnp.float32)[None]

    axes = (h_spec[0],) if isinstance(h_spec[0], str) else tuple(h_spec[0])
    fn = jax.shard_map(local, mesh=mesh, in_specs=(h_spec, l_spec), out_specs=out_spec)
    return fn, NamedSharding(mesh, out_spec), math.prod(mesh.shape[a] for a in axes)


def _scan_chunks(hidden, head, labels, weights, chunk: int, dtype, with_grads: bool):
    b, s, d = hidden.shape
    head_c = head.astype(dtype)
    n = -(-s // chunk)
    pad = n * chunk - s
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
        weights = jnp.pad(weights, ((0, 0), (0, pad)))

    def split(x):  # [B, n*c, ...] -> [n, B, c, ...]
        return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

    head_grad, dhead0 = None, None
    if with_grads:
        dhead0 = jnp.zeros(head.shape, jnp.float32)
        partials = _shard_partials(jax.ShapeDtypeStruct((b, chunk, d), dtype),
                                   jax.ShapeDtypeStruct((b, chunk, head.shape[-1]), dtype))
        if partials is not None:
            head_grad, sharding, shards = partials
            dhead0 = jax.lax.with_sharding_constraint(
                jnp.zeros((shards,) + head.shape, jnp.float32), sharding)

    def body(carry, xs):
        sums, dhead = carry
        part, dh, dhead_c = _chunk(*xs[:1], head_c, *xs[1:], dtype, with_grads, head_grad)
        sums = tuple(a + c for a, c in zip(sums, part, strict=True))
        if with_grads:
            dhead = dhead + dhead_c
        return (sums, dhead), dh

    zero = jnp.zeros((), jnp.float32)
    (sums, dhead), dh = jax.lax.scan(body, ((zero, zero, zero), dhead0),
                                     (split(hidden), split(labels), split(weights)))
    if with_grads:
        dh = jnp.moveaxis(dh, 0, 1).reshape(b, n * chunk, d)[:, :s]
    if head_grad is not None and dhead is not None:
        dhead = jnp.sum(dhead, axis=0)  # the one reduction over the batch shards
    return sums, dh, dhead


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ce(hidden, head, labels, weights, chunk, dtype):
    return _scan_chunks(hidden, head, labels, weights, chunk, dtype, False)[0]


def _ce_fwd(hidden, head, labels, weights, chunk, dtype):
    sums, dh, dhead = _scan_chunks(hidden, head, labels, weights, chunk, dtype, True)
    return sums, (dh, dhead, jnp.zeros((0,), head.dtype))


def _ce_bwd(chunk, dtype, res, g):
    del chunk, dtype
    dh, dhead, head_dtype = res
    g_ce = g[0]  # the weight sum and the accuracy count have no gradient
    return ((g_ce * dh.astype(jnp.float32)).astype(dh.dtype),
            (g_ce * dhead).astype(head_dtype.dtype), None, None)


_ce.defvjp(_ce_fwd, _ce_bwd)


def cross_entropy_sums(hidden: jax.Array, labels: jax.Array, weights: jax.Array,
                       head: jax.Array, *, chunk: int, dtype=None
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum(w*ce), sum(w), #correct supervised tokens) for hidden [B, S, D], labels [B, S].

    Logits are hidden @ head (head [D, V]) with `dtype` operands (default: head's dtype),
    float32 accumulation and a `dtype` result (as in the PyTorch models); `chunk` positions at
    a time (the batch dimension stays whole, so its sharding is kept). Differentiable in hidden
    and head.
    """
    dtype = jnp.dtype(head.dtype if dtype is None else dtype)
    return _ce(hidden, head, labels, weights, min(chunk, hidden.shape[1]), dtype)
