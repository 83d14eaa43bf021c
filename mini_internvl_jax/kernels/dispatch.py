"""Picks an attention implementation per backend and runs Pallas kernels under the mesh.

`impl`:
  * `xla`    the dense reference (`kernels.reference.dot_product_attention`);
  * `cudnn`  `jax.nn.dot_product_attention(implementation="cudnn")`; GPU only and only where it
             is exact, so segment ids raise (cuDNN cannot keep packed samples apart);
  * `pallas` our flash kernel for the backend: Mosaic on TPU, Triton on GPU, the GPU kernel in
             the Pallas interpreter on CPU (tests);
  * `auto`   TPU -> pallas; GPU -> cudnn when it is exact and supported (no segments, bf16 or
             fp16, length a multiple of 128), else pallas; CPU -> xla.
The kernels cover training and prefill (S == T, q_offset 0); decoding against a KV cache falls
back to the dense reference.

Mosaic and Triton kernels are not partitioned by XLA, so under a mesh (`jax.set_mesh`) the
kernel runs inside `jax.shard_map` with the specs the logical rules give activations
(`sharding.logical_to_spec(("batch", None, "act_heads", None))`): batch over the mesh axes of
`batch` that divide B, query heads over those of `act_heads` that divide H. KV heads are sharded
with them when that axis divides KV; otherwise (e.g. Qwen2's 2 KV heads on tensor=4 with 8
query heads) K/V are repeated to H heads before the shard_map, so each shard holds exactly the
KV heads of its query heads. Axes that are already manual (inside the caller's shard_map) are
left alone.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from mini_internvl_jax.config import ATTENTION_IMPLS as IMPLS
from mini_internvl_jax.kernels import flash_gpu, flash_tpu
from mini_internvl_jax.kernels.common import HEAD_DIMS
from mini_internvl_jax.kernels.reference import AttentionMask, dot_product_attention
from mini_internvl_jax.sharding import logical_to_spec, vmapped_mesh_axes


def target_platform() -> str:
    """'tpu', 'gpu' or 'cpu': the platform of the active mesh, else the default backend.

    The mesh wins so that ahead-of-time compiles for TPU from a CPU host pick the TPU kernel.
    """
    mesh = jax.sharding.get_abstract_mesh()
    platform = None
    if not mesh.empty and mesh.abstract_device is not None:
        platform = mesh.abstract_device.platform
    platform = platform or jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def resolve_impl(impl: str, *, platform: str, has_segments: bool, dtype, seq_len: int,
                 head_dim: int | None = None) -> str:
    """The concrete implementation for `impl` (resolves `auto` to the best exact choice)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    dtype = jnp.dtype(dtype)
    # Our kernels take head dims 64/96/128 in float32/bfloat16; anything else stays exact on XLA.
    kernel_ok = (head_dim is None or head_dim in HEAD_DIMS) and dtype in (jnp.float32,
                                                                          jnp.bfloat16)
    if platform == "tpu":
        return "pallas" if kernel_ok else "xla"
    if platform == "gpu":
        # cuDNN's backward rejects odd lengths (ViT's 1025), where our kernel is as fast anyway.
        cudnn_ok = (not has_segments and dtype in (jnp.bfloat16, jnp.float16)
                    and seq_len % 128 == 0)
        return "cudnn" if cudnn_ok else "pallas" if kernel_ok else "xla"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, impl: str,
              scale: float | None = None, block_sizes=None) -> jax.Array:
    """Attention of q [B, S, H, D] over k/v [B, T, KV, D] under `mask`, computed by `impl` (see
    the module docstring); the one entry point the models call. `block_sizes`
    (flash_tpu/flash_gpu.BlockSizes) tunes the Pallas kernel."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if impl == "xla":
        return dot_product_attention(q, k, v, mask, scale)
    causal, segment_ids, kv_segment_ids = mask.causal, mask.segment_ids, mask.key_segment_ids
    platform = target_platform()
    impl = resolve_impl(impl, platform=platform, has_segments=segment_ids is not None,
                        dtype=q.dtype, seq_len=q.shape[1], head_dim=q.shape[-1])
    dense = lambda: dot_product_attention(q, k, v, mask, scale)
    if impl == "xla":
        return dense()
    prefill = (isinstance(mask.q_offset, (int, np.integer)) and mask.q_offset == 0
               and q.shape[1] == k.shape[1])
    if impl == "cudnn":
        if segment_ids is not None:
            raise ValueError("attention impl 'cudnn' cannot keep packed segments apart; use "
                             "'pallas' or 'auto' with segment_ids")
        if platform != "gpu":
            raise ValueError(f"attention impl 'cudnn' needs a GPU, not {platform!r}")
        if not prefill:
            return dense()
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            implementation="cudnn")
    if not prefill:
        return dense()

    if platform == "tpu":
        kernel = lambda *a: flash_tpu.flash_attention(
            *a[:3], causal=causal, segment_ids=a[3], kv_segment_ids=a[4], scale=scale,
            block_sizes=block_sizes)
    else:
        kernel = lambda *a: flash_gpu.flash_attention(
            *a[:3], causal=causal, segment_ids=a[3], kv_segment_ids=a[4], scale=scale,
            block_sizes=block_sizes, interpret=platform != "gpu")
    return sharded(kernel, q, k, v, segment_ids, kv_segment_ids)


def _taken_axes(mesh) -> set[str]:
    """Mesh axes the kernel's shard_map may not name: of size 1 (nothing to split), already
    manual, or taken by an enclosing vmap (which shards its mapped dimension over them)."""
    return ({a for a, s in mesh.shape.items() if s == 1} | set(mesh.manual_axes)
            | vmapped_mesh_axes())


def sharded(kernel, q, k, v, segment_ids=None, kv_segment_ids=None, mesh=None):
    """Runs kernel(q, k, v, segment_ids, kv_segment_ids) per shard of `mesh` (default: the
    active mesh); calls it directly when there is no mesh. Mosaic kernels cannot be partitioned
    automatically, so a mesh whose axes divide neither batch nor heads still gets a shard_map
    (with every input replicated) rather than a bare call."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return kernel(q, k, v, segment_ids, kv_segment_ids)
    h, kvh = q.shape[2], k.shape[2]
    act = logical_to_spec(("batch", None, "act_heads", None), q.shape, mesh,
                          exclude=_taken_axes(mesh))
    heads = act[2]
    head_axes = () if heads is None else (heads,) if isinstance(heads, str) else heads
    tp = math.prod(dict(mesh.shape)[a] for a in head_axes)
    if kvh % tp:
        k, v = (jnp.repeat(x, h // kvh, axis=2) for x in (k, v))
    seg = P(act[0], None)
    args = (q, k, v, segment_ids, kv_segment_ids)
    specs = (act, act, act, *(None if s is None else seg for s in args[3:]))
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        # Explicit-sharding meshes: shard_map takes inputs only in exactly its in_specs.
        args = tuple(a if a is None else jax.sharding.reshard(a, sp)
                     for a, sp in zip(args, specs, strict=True))
    return jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=act,
                         check_vma=False)(*args)

