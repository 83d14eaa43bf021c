"""The attention mask the model hands to the kernels, and the dense reference attention.

Layout: q [B, S, H, D], k/v [B, T, KV, D] with H a multiple of KV (GQA, no repeated K/V).
Masking rules, shared by every implementation:
  * segment ids (0 = padding): a query attends only to keys of its own non-zero segment; keys
    carry `kv_segment_ids` (a KV cache's), else the query ids (self-attention); key ids are
    used only together with query ids;
  * causal: query i (causal index q_offset + i) sees key j only if j <= q_offset + i;
  * a query row with no visible key returns zeros, never NaN.
The flash kernels follow the same rules; `dot_product_attention` is the reference they are
tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


class AttentionMask(struct.PyTreeNode):
    """Which keys each query sees; a pytree (arrays are leaves, `causal` is static).

    `q_offset` is the causal index of the first query: 0 for training and prefill, the cache
    index when decoding (then a traced scalar or [B] array). A Python 0 marks prefill, where the
    flash kernels apply; anything else runs the dense path.
    """

    causal: bool = struct.field(pytree_node=False)
    segment_ids: jax.Array | None = None  # [B, S] int32, 0 = padding
    kv_segment_ids: jax.Array | None = None  # [B, T] int32; default: segment_ids
    q_offset: jax.Array | int = 0

    @property
    def key_segment_ids(self) -> jax.Array | None:
        """The keys' segment ids: None without query ids, else the kv ids or the query ids."""
        if self.segment_ids is None:
            return None
        return self.segment_ids if self.kv_segment_ids is None else self.kv_segment_ids

    def materialize(self, b: int, s: int, t: int) -> jax.Array | None:
        """Boolean [B, S, T] mask (True = visible), or None when every key is visible."""
        mask = None
        q_seg = self.segment_ids
        if q_seg is not None:
            kv_seg = q_seg if self.kv_segment_ids is None else self.kv_segment_ids
            mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
        if self.causal:
            q_idx = jnp.asarray(self.q_offset).reshape(-1, 1, 1) + jnp.arange(s)[None, :, None]
            c = jnp.broadcast_to(jnp.arange(t)[None, None, :] <= q_idx, (b, s, t))
            mask = c if mask is None else mask & c
        return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
                          scale: float | None = None) -> jax.Array:
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
    visible = mask.materialize(b, s, t)
    if visible is not None:
        logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgst,btkd->bskgd", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, s, h, d).astype(q.dtype)
