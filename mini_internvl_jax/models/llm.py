"""The LLM decoder: one implementation for Qwen2/2.5, Qwen3, InternLM2/2.5 (Llama math) and Phi-3.

Family differences are data, not code paths: q/k/v bias (Qwen2), per-head q/k RMSNorm before
RoPE and an explicit head_dim (Qwen3), RoPE scaling (InternLM2 dynamic NTK, Phi-3 LongRoPE), eps
and theta. Packed rows are handled by `positions` (restarting per
sample) and `segment_ids` (no attention across samples; 0 = padding).

An optional `KVCache` serves prefill and decode with the same code: new keys are written at
`index` and queries see cache slots up to their own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mini_internvl_jax.config import LLMConfig
from mini_internvl_jax.kernels import AttentionMask, attention
from mini_internvl_jax.models.layers import Dense, RMSNorm, make_param, normal
from mini_internvl_jax.models.rope import apply_rope, rope_cos_sin
from mini_internvl_jax.models.stack import LayerStack
from mini_internvl_jax.sharding import shard_activation


class KVCache(struct.PyTreeNode):
    """Every layer's keys and values, written in place at `index` (slots filled so far).

    `segment_ids` marks filled slots (0 = empty or padding), so queries never see unwritten or
    padded slots.
    """

    k: jax.Array  # [L, B, T, KV, hd]
    v: jax.Array  # [L, B, T, KV, hd]
    segment_ids: jax.Array  # [B, T] int32
    index: jax.Array  # int32 []


class ModelOutput(struct.PyTreeNode):
    """Final-normed hidden states [B, S, D] and the updated cache (None without one)."""

    hidden: jax.Array
    cache: KVCache | None = None


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, dtype, param_dtype, attention_impl: str,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention_impl = attention_impl
        d, h, kv, hd, i = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size,
                           cfg.intermediate_size)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps, ("norm",), param_dtype=param_dtype,
                                  rngs=rngs)
        self.post_attention_norm = RMSNorm(d, cfg.rms_norm_eps, ("norm",),
                                           param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense((d,), (h, hd), ("embed", "heads", "head_dim"),
                            use_bias=cfg.qkv_bias, **kw)
        self.k_proj = Dense((d,), (kv, hd), ("embed", "kv_heads", "head_dim"),
                            use_bias=cfg.qkv_bias, **kw)
        self.v_proj = Dense((d,), (kv, hd), ("embed", "kv_heads", "head_dim"),
                            use_bias=cfg.qkv_bias, **kw)
        self.o_proj = Dense((h, hd), (d,), ("heads", "head_dim", "embed"), use_bias=False, **kw)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = nnx.data(RMSNorm(hd, cfg.rms_norm_eps, ("head_dim",),
                                           param_dtype=param_dtype, rngs=rngs))
            self.k_norm = nnx.data(RMSNorm(hd, cfg.rms_norm_eps, ("head_dim",),
                                           param_dtype=param_dtype, rngs=rngs))
        self.gate_proj = Dense((d,), (i,), ("embed", "mlp"), use_bias=False, **kw)
        self.up_proj = Dense((d,), (i,), ("embed", "mlp"), use_bias=False, **kw)
        self.down_proj = Dense((i,), (d,), ("mlp", "embed"), use_bias=False, **kw)

    def __call__(self, state: tuple[jax.Array, KVCache | None], layer_index: jax.Array, *,
                 cos, sin, mask: AttentionMask):
        """state = (hidden [B, S, D], cache or None) -> (new state, None). With a cache, this
        layer writes its keys/values into its slice at `cache.index` and attends over them."""
        x, cache = state
        h_in = self.input_norm(x)
        q = self.q_proj(h_in)
        k = self.k_proj(h_in)
        v = self.v_proj(h_in)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        q = shard_activation(q, ("batch", "length", "act_heads", None))
        k = shard_activation(k, ("batch", "length", "act_kv_heads", None))
        if cache is None:
            out = attention(q, k, v, mask, impl=self.attention_impl)
        else:
            start = (layer_index, 0, cache.index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), start)
            v_all = jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), start)
            cache = cache.replace(k=k_all, v=v_all)
            ck, cv = k_all[layer_index], v_all[layer_index]
            out = attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask,
                            impl=self.attention_impl)
        x = x + self.o_proj(out)
        h = self.post_attention_norm(x)
        gate = self.gate_proj(h)
        up = self.up_proj(h)
        mlp = shard_activation(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        x = shard_activation(x + self.down_proj(mlp), ("batch", "length", "act_embed"))
        return (x, cache), None


class Decoder(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "xla", scan_layers: bool = False, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        d = cfg.hidden_size
        self.embed_tokens = make_param(rngs, normal(0.02), (cfg.vocab_size, d),
                                       ("vocab", "embed"), param_dtype)
        self.layers = LayerStack(
            lambda r: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype,
                                   attention_impl=attention_impl, rngs=r),
            cfg.num_layers, scan=scan_layers, rngs=rngs)
        self.norm = RMSNorm(d, cfg.rms_norm_eps, ("norm",), param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else make_param(
            rngs, normal(0.02), (d, cfg.vocab_size), ("embed", "vocab"), param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        table = self.embed_tokens[...]
        x = jnp.take(table, input_ids, axis=0).astype(self.dtype)
        return shard_activation(x, ("batch", "length", "act_embed"))

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, *,
                 cache: KVCache | None = None, remat: str = "none") -> ModelOutput:
        """x: input embeddings [B, S, D] -> final-normed hidden states and the updated cache."""
        cos, sin = rope_cos_sin(self.cfg, positions)
        layer_ids = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
        if cache is None:
            mask = AttentionMask(causal=True, segment_ids=segment_ids)
            (x, _), _ = self.layers((x, None), layer_ids, remat=remat, cos=cos, sin=sin,
                                    mask=mask)
            return ModelOutput(self.norm(x))
        index = cache.index
        b, s = x.shape[:2]
        q_seg = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids
        kv_seg = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, q_seg, index, axis=1)
        mask = AttentionMask(causal=True, segment_ids=q_seg, kv_segment_ids=kv_seg,
                             q_offset=index)
        # The whole cache rides along as loop state so each layer updates it in place.
        (x, cache), _ = self.layers((x, cache.replace(segment_ids=kv_seg)), layer_ids,
                                    remat=remat, cos=cos, sin=sin, mask=mask)
        return ModelOutput(self.norm(x), cache.replace(index=index + s))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits; the head runs in the compute dtype with float32 accumulation."""
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.einsum("bsd,dv->bsv", hidden.astype(self.dtype), w.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return shard_activation(logits, ("batch", "length", "act_vocab"))

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache of `max_len` slots (compute dtype unless `dtype` is given)."""
        cfg = self.cfg
        dtype = self.dtype if dtype is None else dtype
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_size)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                       index=jnp.zeros((), jnp.int32))
