"""Rotary position embeddings (rotate-half convention) for Qwen2, InternLM2 and Phi-3.

The frequencies may depend on the longest position in the batch (InternLM2 dynamic NTK, Phi-3
LongRoPE switching between its short and long factor lists), exactly as the PyTorch references
compute them from `max(position_ids) + 1`; that keeps the decision inside jit, no recompiles.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mini_internvl_jax.config import LLMConfig


def _base_exponents(dim: int) -> jax.Array:
    return jnp.arange(0, dim, 2, dtype=jnp.float32) / dim


def inverse_frequencies(cfg: LLMConfig, seq_len: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(inv_freq [head_dim/2], cos/sin scale) for a batch whose longest position is seq_len-1."""
    dim = cfg.head_size
    theta = jnp.float32(cfg.rope_theta)
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0 / theta ** _base_exponents(dim), jnp.float32(1.0)
    if rs.type == "dynamic":
        max_pos = cfg.max_position_embeddings
        length = jnp.maximum(seq_len.astype(jnp.float32), max_pos)
        scaled = theta * ((rs.factor * length / max_pos) - (rs.factor - 1)) ** (dim / (dim - 2))
        base = jnp.where(seq_len > max_pos, scaled, theta)
        return 1.0 / base ** _base_exponents(dim), jnp.float32(1.0)
    if rs.type == "longrope":
        orig = rs.original_max_position_embeddings
        assert orig is not None, "RopeScaling requires it for longrope"
        ones = (1.0,) * (dim // 2)
        short = jnp.asarray(rs.short_factor or ones, jnp.float32)
        long = jnp.asarray(rs.long_factor or ones, jnp.float32)
        ext = jnp.where(seq_len > orig, long, short)
        factor = cfg.max_position_embeddings / orig
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        return 1.0 / (ext * theta ** _base_exponents(dim)), jnp.float32(scale)
    raise ValueError(f"unknown rope_scaling type {rs.type!r}")


def rope_cos_sin(cfg: LLMConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape positions.shape + (head_dim,), float32.

    Scaled variants key on max(positions)+1 over the batch, as the references do, in decode too.
    """
    inv_freq, scale = inverse_frequencies(cfg, jnp.max(positions) + 1)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, S, heads, head_dim]; cos/sin: [B, S, head_dim]. Computed in float32."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(dtype)
