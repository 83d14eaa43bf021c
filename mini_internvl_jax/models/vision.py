"""InternViT: the vision encoder of InternVL (300M and 6B variants).

Pre-norm blocks with layer scale (`ls1`, `ls2`), a CLS token and a learned position table that is
bicubically resampled (PyTorch's kernel, align_corners=False) when the patch grid differs from
the stored one. No final norm: the output is the last selected block's output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mini_internvl_jax.config import VisionConfig
from mini_internvl_jax.kernels import AttentionMask, attention
from mini_internvl_jax.models.layers import Dense, gelu, make_norm, make_param, normal
from mini_internvl_jax.models.stack import LayerStack
from mini_internvl_jax.sharding import shard_activation


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


@functools.lru_cache(maxsize=32)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's bicubic interpolate (a=-0.75, align_corners=False, clamped)."""
    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        base = int(np.floor(src))
        t = src - base
        for k in range(-1, 3):
            m[o, min(max(base + k, 0), in_size - 1)] += _cubic(np.array(k - t))
    return m.astype(np.float32)


def resize_position_grid(table: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """table [G, G, D] -> [out_h, out_w, D], separable bicubic in float32."""
    g_h, g_w = table.shape[:2]
    if (g_h, g_w) == (out_h, out_w):
        return table
    wh = jnp.asarray(bicubic_matrix(g_h, out_h))
    ww = jnp.asarray(bicubic_matrix(g_w, out_w))
    t = table.astype(jnp.float32)
    return jnp.einsum("oh,hwd,pw->opd", wh, t, ww, precision=jax.lax.Precision.HIGHEST)


class VisionEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        g = cfg.stored_grid_size
        # Conv kernel stored as [p, p, C, D] (HWIO); a stride-p conv is a matmul over patches.
        self.patch_kernel = make_param(rngs, normal(0.02), (p, p, c, d),
                                       ("vision_patch", "vision_patch", None, "vision_embed"),
                                       param_dtype)
        self.patch_bias = make_param(rngs, nnx.initializers.zeros_init(), (d,),
                                     ("vision_embed",), param_dtype)
        self.class_embedding = make_param(rngs, normal(0.02), (1, 1, d),
                                          (None, None, "vision_embed"), param_dtype)
        self.position_embedding = make_param(rngs, normal(0.02), (1, g * g + 1, d),
                                             (None, "vision_pos", "vision_embed"), param_dtype)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [T, C, H, W] (PyTorch layout) -> tokens [T, 1 + h*w, D]."""
        cfg = self.cfg
        t, c, hgt, wid = pixel_values.shape
        p = cfg.patch_size
        if c != cfg.num_channels or hgt % p or wid % p:
            raise ValueError(f"pixel_values of shape {pixel_values.shape}: expected "
                             f"[tiles, {cfg.num_channels}, H, W] with H, W multiples of {p}")
        gh, gw = hgt // p, wid // p
        x = pixel_values.astype(self.dtype).reshape(t, c, gh, p, gw, p)
        kernel = self.patch_kernel[...].astype(self.dtype)
        patches = jnp.einsum("tcapbq,pqcd->tabd", x, kernel)
        patches = patches.reshape(t, gh * gw, -1) + self.patch_bias[...].astype(self.dtype)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype),
                               (t, 1, cfg.hidden_size))
        tokens = jnp.concatenate([cls, patches], axis=1)
        pos = self.position_embedding[...]
        g = cfg.stored_grid_size
        grid = resize_position_grid(pos[0, 1:].reshape(g, g, -1), gh, gw).reshape(gh * gw, -1)
        pos = jnp.concatenate([pos[0, :1].astype(jnp.float32), grid.astype(jnp.float32)], 0)
        return tokens + pos.astype(self.dtype)[None]


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention_impl: str,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.attention_impl = attention_impl
        d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = make_norm(cfg.norm_type, d, cfg.norm_eps, ("vision_embed",),
                               param_dtype=param_dtype, rngs=rngs)
        self.norm2 = make_norm(cfg.norm_type, d, cfg.norm_eps, ("vision_embed",),
                               param_dtype=param_dtype, rngs=rngs)
        self.qkv = Dense((d,), (3, h, hd), ("vision_embed", None, "vision_heads", "head_dim"),
                         use_bias=cfg.qkv_bias, **kw)
        if cfg.qk_normalization:
            self.q_norm = make_norm("rms_norm", d, cfg.norm_eps, ("vision_embed",),
                                    param_dtype=param_dtype, rngs=rngs)
            self.k_norm = make_norm("rms_norm", d, cfg.norm_eps, ("vision_embed",),
                                    param_dtype=param_dtype, rngs=rngs)
        else:
            self.q_norm = self.k_norm = None
        self.proj = Dense((h, hd), (d,), ("vision_heads", "head_dim", "vision_embed"),
                          use_bias=True, **kw)
        self.fc1 = Dense((d,), (cfg.intermediate_size,), ("vision_embed", "vision_mlp"),
                         use_bias=True, **kw)
        self.fc2 = Dense((cfg.intermediate_size,), (d,), ("vision_mlp", "vision_embed"),
                         use_bias=True, **kw)
        init = nnx.initializers.constant(cfg.layer_scale_init)
        self.ls1 = make_param(rngs, init, (d,), ("vision_embed",), param_dtype)
        self.ls2 = make_param(rngs, init, (d,), ("vision_embed",), param_dtype)

    def _attention(self, x: jax.Array) -> jax.Array:
        t, n, d = x.shape
        qkv = self.qkv(x)  # [T, N, 3, H, hd]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(t, n, d)).reshape(q.shape)
            k = self.k_norm(k.reshape(t, n, d)).reshape(k.shape)
        q = shard_activation(q, ("tiles", "length", "act_heads", None))
        out = attention(q, k, v, AttentionMask(causal=False), impl=self.attention_impl)
        return self.proj(out)

    def __call__(self, x: jax.Array, drop: tuple | None):
        """drop: None (eval) or (key, rate) for stochastic depth per tile."""
        y = self._attention(self.norm1(x)) * self.ls1[...].astype(x.dtype)
        x = x + _drop_path(y, drop, 0)
        y = self.fc2(gelu(self.fc1(self.norm2(x)))) * self.ls2[...].astype(x.dtype)
        x = x + _drop_path(y, drop, 1)
        return shard_activation(x, ("tiles", "length", "act_embed")), None


def _drop_path(y: jax.Array, drop: tuple | None, which: int) -> jax.Array:
    if drop is None:
        return y
    key, rate = drop
    keep = 1.0 - rate
    mask = jax.random.bernoulli(jax.random.fold_in(key, which), keep, (y.shape[0], 1, 1))
    return jnp.where(mask, y / jnp.maximum(keep, 1e-6), 0).astype(y.dtype)


class InternViT(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "xla", scan_layers: bool = False, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = LayerStack(
            lambda r: VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype,
                                  attention_impl=attention_impl, rngs=r),
            cfg.num_layers, scan=scan_layers, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, *, num_layers: int | None = None,
                 dropout_key: jax.Array | None = None, remat: str = "none") -> jax.Array:
        """Hidden states after `num_layers` blocks (default all): [T, 1 + patches, D]."""
        x = self.embeddings(pixel_values)
        x = shard_activation(x, ("tiles", "length", "act_embed"))
        n = self.cfg.num_layers if num_layers is None else num_layers
        drop = None
        if dropout_key is not None and self.cfg.drop_path_rate > 0:
            rates = jnp.linspace(0.0, self.cfg.drop_path_rate, self.cfg.num_layers)
            drop = (jax.random.split(dropout_key, self.cfg.num_layers), rates)
        x, _ = self.encoder(x, drop, remat=remat, num_layers=n)
        return x
