"""AdamW with global-norm clipping and warmup + cosine, over the trainable parameters only.

Frozen parameters are not part of the tree the optimizer sees (state.split_params), so they
carry no optimizer state and no gradient is ever computed for them; the no-decay mask picks
norms and biases (configurable regexes) among the trainable ones.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mini_internvl_jax.train.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return int(round(cfg.warmup_ratio * total_steps))


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear 0 -> lr over the warmup, then cosine to lr * min_lr_ratio at total_steps."""
    warm = warmup_steps(cfg, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warm,
        decay_steps=max(total_steps, warm + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def dotted(path) -> str:
    return ".".join(str(p) for p in path)


def decay_mask(params: nnx.State, patterns: tuple[str, ...]) -> nnx.State:
    """True where weight decay applies: no pattern matches the dotted path."""
    regexes = [re.compile(p) for p in patterns]
    return jax.tree.map_with_path(
        lambda path, _: not any(r.search(dotted(_keys(path))) for r in regexes), params)


def _keys(path) -> tuple:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
    # A Variable contributes a trailing `.value` node; it is not part of the parameter's name.
    return tuple(out[:-1]) if out and out[-1] == "value" else tuple(out)


def make_optimizer(cfg: OptimConfig, total_steps: int, params: nnx.State
                   ) -> optax.GradientTransformation:
    adamw = optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask(params, cfg.no_decay),
                        mu_dtype=None if cfg.mu_dtype == "params" else jnp.dtype(cfg.mu_dtype))
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
