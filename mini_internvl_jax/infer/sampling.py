"""Next-token choice: greedy, temperature, top-k and top-p (nucleus) sampling.

The filters follow transformers' logits warpers in the same order (temperature, then top-k,
then top-p), including their tie rules: top-k keeps every logit equal to the k-th largest, and
top-p keeps the smallest prefix of the sorted distribution whose mass reaches `top_p` (always at
least one token). The config is static, so each setting compiles once.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy (argmax); top_k / top_p are then irrelevant
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"sampling temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"sampling top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _top_p_threshold(sorted_desc: jax.Array, top_p: float) -> jax.Array:
    """Smallest logit kept by nucleus filtering, per row; `sorted_desc` [B, K] descending."""
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1), 1)
    return jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Temperature-scaled float32 logits [B, V] with the filtered-out entries at -inf."""
    x = logits.astype(jnp.float32) / cfg.temperature
    vocab = x.shape[-1]
    if 0 < cfg.top_k < vocab:
        top = jax.lax.top_k(x, cfg.top_k)[0]
        x = jnp.where(x < top[:, -1:], -jnp.inf, x)
        if cfg.top_p < 1.0:  # the nucleus lies inside the top k: sort only those
            x = jnp.where(x < _top_p_threshold(top, cfg.top_p), -jnp.inf, x)
    elif cfg.top_p < 1.0:
        sorted_desc = -jnp.sort(-x, axis=-1)
        x = jnp.where(x < _top_p_threshold(sorted_desc, cfg.top_p), -jnp.inf, x)
    return x


def sample_logits(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """logits [B, V] -> token ids [B] int32."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, cfg), axis=-1).astype(jnp.int32)
