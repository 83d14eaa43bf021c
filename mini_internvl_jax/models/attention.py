"""The one attention entry point used by InternViT and the LLM decoder.

Layout: q [B, S, H, D], k/v [B, T, KV, D] with H a multiple of KV (GQA, no repeated K/V).
Masking rules, shared by every implementation:
  * segment ids (0 = padding): a query attends only to keys of its own non-zero segment;
  * causal: query i (causal index q_offset + i) sees key j only if j <= q_offset + i;
  * a query row with no visible key returns zeros, never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mini_internvl_jax.config import ATTENTION_IMPLS as IMPLS


def attention_mask(batch: int, q_len: int, kv_len: int, *, causal: bool,
                   segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                   q_offset: jax.Array | int = 0) -> jax.Array | None:
    """Boolean [B, S, T] mask (True = visible), or None when everything is visible."""
    mask = None
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = (segment_ids[:, :, None] == kv_seg[:, None, :]) & (segment_ids[:, :, None] != 0)
    if causal:
        q_idx = jnp.asarray(q_offset).reshape(-1, 1, 1) + jnp.arange(q_len)[None, :, None]
        c = jnp.arange(kv_len)[None, None, :] <= q_idx
        c = jnp.broadcast_to(c, (batch, q_len, kv_len))
        mask = c if mask is None else mask & c
    return mask


def dot_product_attention(q, k, v, *, causal: bool, segment_ids=None, kv_segment_ids=None,
                          q_offset=0, scale: float | None = None) -> jax.Array:
    """Dense reference: float32 softmax, GQA by grouping query heads."""
    b, s, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"attention: {h} query heads are not a multiple of {kvh} kv heads")
    g = h // kvh
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, s, kvh, g, d)
    logits = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
    logits = logits * scale
    mask = attention_mask(b, s, t, causal=causal, segment_ids=segment_ids,
                          kv_segment_ids=kv_segment_ids, q_offset=q_offset)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgst,btkd->bskgd", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, d).astype(q.dtype)


def attention(q, k, v, *, causal: bool, segment_ids=None, kv_segment_ids=None, q_offset=0,
              impl: str = "xla", scale: float | None = None) -> jax.Array:
    """Attention with the masking rules above, computed by `impl`."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if impl == "xla":
        return dot_product_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                     kv_segment_ids=kv_segment_ids, q_offset=q_offset,
                                     scale=scale)
    from mini_internvl_jax.kernels import dispatch

    return dispatch.attention(q, k, v, causal=causal, segment_ids=segment_ids,
                              kv_segment_ids=kv_segment_ids, q_offset=q_offset, impl=impl,
                              scale=scale)
