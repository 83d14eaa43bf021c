"""LoRA adapters on the model's Dense layers, and merging them back for export.

A model-layer transform (not a training detail): loading or exporting a LoRA run's weights
needs it without the trainer.

A targeted `Dense` is swapped for a `LoRADense` that keeps the very same `kernel`/`bias`
variables (so parameter paths, the converter's rules and the sharding names are unchanged) and
adds `lora_a` [in..., r] and `lora_b` [r, out...]: y = x W + b + scale * drop(x) A B. B starts at
zero, so a fresh adapter leaves the model's function unchanged. Scanned layer stacks get adapters
with the same leading layer axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from mini_internvl_jax.configlib import check
from mini_internvl_jax.models.layers import Dense


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on linear layers; rank 0 = off. Base weights under LoRA are frozen."""

    rank: int = 0
    alpha: float | None = None  # None = 2 * rank (InternVL's scripts)
    dropout: float = 0.0
    # Attribute names of our Dense layers (see models/llm.py and models/vision.py).
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj")
    vision: bool = False
    vision_targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")

    def __post_init__(self):
        check(self.rank >= 0, "lora.rank", "must be >= 0")
        check(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        check(self.alpha is None or self.alpha > 0, "lora.alpha", "must be positive")

    @property
    def scale(self) -> float:
        return (2.0 * self.rank if self.alpha is None else self.alpha) / max(self.rank, 1)


class LoRAParam(nnx.Param):
    """Adapter weights: trainable even when the layer they sit on is frozen."""


class LoRAKey(nnx.Variable):
    """Raw uint32 dropout key(s) of one adapter, refreshed every step by `with_dropout_keys`."""


def _contract(x, w, n):
    return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))),
                                      ((), ())))


def _key_shape() -> tuple[int, ...]:
    return jax.random.key_data(jax.random.key(0)).shape


class LoRADense(Dense):
    def __init__(self, base: Dense, *, rank: int, scale: float, dropout: float,
                 rngs: nnx.Rngs):
        self.in_shape, self.out_shape, self.dtype = base.in_shape, base.out_shape, base.dtype
        self.kernel, self.bias = base.kernel, base.bias
        self.scale, self.dropout = scale, dropout
        names = base.kernel.get_metadata().get("out_sharding")
        lead = base.kernel.ndim - len(self.in_shape) - len(self.out_shape)  # 1 when scanned
        shape = base.kernel.shape
        n_in = lead + len(self.in_shape)
        dtype = base.kernel.dtype
        fan_in = math.prod(self.in_shape)
        bound = 1.0 / math.sqrt(fan_in)  # PEFT's kaiming-uniform(a=sqrt(5)) bound
        a = jax.random.uniform(rngs.params(), shape[:n_in] + (rank,), dtype, -bound, bound)
        b = jnp.zeros(shape[:lead] + (rank,) + shape[n_in:], dtype)
        # Placed like the kernel: eagerly sharded only if the model's own weights were.
        eager = base.kernel.get_metadata().get("eager_sharding", nnx.using_eager_sharding())
        self.lora_a = LoRAParam(a, eager_sharding=eager, out_sharding=None if names is None
                                else tuple(names[:n_in]) + (None,))
        self.lora_b = LoRAParam(b, eager_sharding=eager, out_sharding=None if names is None
                                else tuple(names[:lead]) + (None,) + tuple(names[n_in:]))
        self.dropout_key = (LoRAKey(jnp.zeros(shape[:lead] + _key_shape(), jnp.uint32))
                            if dropout > 0 else None)

    def __call__(self, x: jax.Array, *, out_dtype=None) -> jax.Array:
        y = super().__call__(x, out_dtype=out_dtype)
        h = x.astype(self.dtype)
        if self.dropout_key is not None:
            key = jax.random.wrap_key_data(self.dropout_key[...])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0).astype(h.dtype)
        z = _contract(h, self.lora_a[...].astype(self.dtype), len(self.in_shape))
        delta = _contract(z, self.lora_b[...].astype(self.dtype), 1)
        return y + (self.scale * delta).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """W + scale * A B in the kernel's dtype (the product is taken in float32)."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        lead = self.kernel.ndim - len(self.in_shape) - len(self.out_shape)
        a2 = a.reshape(a.shape[:lead] + (-1, a.shape[-1]))
        b2 = b.reshape(b.shape[:lead + 1] + (-1,))
        delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(self.kernel.shape)
        return (self.kernel[...].astype(jnp.float32) + self.scale * delta).astype(
            self.kernel.dtype)


def _targets(model, cfg: LoRAConfig):
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, Dense) or isinstance(node, LoRADense) or not path:
            continue
        if path[0] == "llm" and path[-1] in cfg.targets:
            yield path, node
        elif path[0] == "vision" and cfg.vision and path[-1] in cfg.vision_targets:
            yield path, node


def _set(model, path, value) -> None:
    parent = model
    for k in path[:-1]:
        parent = parent[k] if isinstance(k, int) else getattr(parent, k)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def apply_lora(model, cfg: LoRAConfig, rngs: nnx.Rngs) -> int:
    """Swaps every targeted Dense for a LoRADense in place; returns how many were swapped."""
    if cfg.rank == 0:
        return 0
    found = list(_targets(model, cfg))
    if not found:
        raise ValueError(f"lora.targets {list(cfg.targets)} match no Dense layer of the model")
    for path, node in found:
        _set(model, path, LoRADense(node, rank=cfg.rank, scale=cfg.scale, dropout=cfg.dropout,
                                    rngs=rngs))
    return len(found)


def merge_lora(model) -> int:
    """Folds every adapter into its kernel and restores a plain Dense; returns how many."""
    found = [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, LoRADense)]
    for path, node in found:
        with nnx.use_eager_sharding(False):  # a shell: its kernel and bias are replaced below
            plain = nnx.eval_shape(lambda n=node: Dense(
                n.in_shape, n.out_shape, (None,) * (len(n.in_shape) + len(n.out_shape)),
                use_bias=n.bias is not None, rngs=nnx.Rngs(0), dtype=n.dtype,
                param_dtype=n.kernel.dtype))
        node.kernel[...] = node.merged_kernel()
        plain.kernel, plain.bias = node.kernel, node.bias
        _set(model, path, plain)
    return len(found)


def with_dropout_keys(rest: nnx.State, key: jax.Array) -> nnx.State:
    """Fresh per-adapter (and per-layer) dropout keys derived from `key`."""
    flat = nnx.to_flat_state(rest)
    out = []
    for i, (path, var) in enumerate(flat):
        if isinstance(var, LoRAKey):
            shape = var[...].shape
            k = jax.random.fold_in(key, i)
            if len(shape) > len(_key_shape()):  # one key per layer of a scanned stack
                k = jax.random.split(k, shape[0])
            var = var.replace(jax.random.key_data(k).astype(jnp.uint32))
        out.append((path, var))
    return nnx.from_flat_state(out)
