"""Small building blocks with logical axis names on every parameter.

Parameters are stored in `param_dtype` and cast to the compute `dtype` at use; norms and
softmax statistics run in float32, as the PyTorch references do.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Names = tuple[str | None, ...]


def make_param(rngs: nnx.Rngs | None, init, shape: Sequence[int], names: Names,
               param_dtype) -> nnx.Param:
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match parameter shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), param_dtype), out_sharding=tuple(names))


def normal(std: float = 0.02):
    return nnx.initializers.normal(std)


zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel shape in_shape + out_shape, contracted over in_shape."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], names: Names, *,
                 use_bias: bool, rngs: nnx.Rngs, dtype, param_dtype, init_std: float = 0.02):
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.dtype = dtype
        self.kernel = make_param(rngs, normal(init_std), self.in_shape + self.out_shape, names,
                                 param_dtype)
        self.bias = (make_param(rngs, zeros, self.out_shape, names[len(self.in_shape):],
                                param_dtype) if use_bias else None)

    def __call__(self, x: jax.Array, *, out_dtype=None) -> jax.Array:
        n_in = len(self.in_shape)
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        y = jax.lax.dot_general(
            x, kernel,
            ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
            preferred_element_type=out_dtype,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, names: Names = ("norm",), *, param_dtype,
                 rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.weight = make_param(rngs, ones, (dim,), names, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * x32).astype(dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, names: Names = ("norm",), *, param_dtype,
                 rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.weight = make_param(rngs, ones, (dim,), names, param_dtype)
        self.bias = make_param(rngs, zeros, (dim,), names, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32)
                + self.bias[...].astype(jnp.float32)).astype(dtype)


def make_norm(kind: str, dim: int, eps: float, names: Names, *, param_dtype, rngs):
    if kind == "layer_norm":
        return LayerNorm(dim, eps, names, param_dtype=param_dtype, rngs=rngs)
    if kind == "rms_norm":
        return RMSNorm(dim, eps, names, param_dtype=param_dtype, rngs=rngs)
    raise ValueError(f"unknown norm type {kind!r}; expected 'layer_norm' or 'rms_norm'")


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch.nn.GELU() in InternViT and the projector."""
    return jax.nn.gelu(x, approximate=False)
