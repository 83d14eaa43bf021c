"""Pieces shared by the TPU and GPU flash-attention kernels.

Both kernels visit, for each outer block (a query block, or a key block in the dK/dV pass), a
contiguous range of inner blocks split in three: [lo, flo) masked, [flo, fhi) mask-free,
[fhi, hi) masked. Blocks outside [lo, hi) are provably empty (causal mask or segment layout) and
are skipped. The ranges come from per-block segment-id min/max, which is exact for packed
(monotone) segments and a sound superset otherwise.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

HEAD_DIMS = (64, 96, 128)
# Names of what the forward kernel leaves for the backward one (output, logsumexp). A remat
# policy that saves them (models/stack.py) keeps the backward from running the forward kernel
# again: a Pallas call is no dot, so `dots_*_saveable` alone would recompute it.
RESIDUAL_NAMES = ("attention_out", "attention_lse")
# Finite start for the running max: below any real logit, so that rows with every key masked
# (logits -inf) keep m finite and produce p = exp(-inf - m) = 0 instead of NaN.
M_INIT = -1e30


def name_residuals(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    return checkpoint_name(out, RESIDUAL_NAMES[0]), checkpoint_name(lse, RESIDUAL_NAMES[1])


def check_inputs(q, k, v, segment_ids, kv_segment_ids) -> tuple[int, int, int, int, int, int]:
    """Validates the shapes of the kernel contract; returns (B, S, H, KV, T, D)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q/k/v must be [B, S, H, D]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    b, s, h, d = q.shape
    _, t, kvh, _ = k.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k/v must be [B, T, KV, D] matching q {q.shape}; got "
                         f"k {k.shape}, v {v.shape}")
    if d not in HEAD_DIMS:
        raise ValueError(f"flash attention: head dim {d} is not supported (one of {HEAD_DIMS})")
    if h % kvh:
        raise ValueError(f"flash attention: {h} query heads are not a multiple of {kvh} kv heads")
    if s != t:
        raise ValueError(f"flash attention needs S == T (got {s}, {t}); decode uses the dense path")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"flash attention: q/k/v must all be float32 or bfloat16; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    for name, seg in (("segment_ids", segment_ids), ("kv_segment_ids", kv_segment_ids)):
        if seg is not None and tuple(seg.shape) != (b, s):
            raise ValueError(f"attention: {name} must be [B, S] = {(b, s)}; got {seg.shape}")
    return b, s, h, kvh, t, d


def kv_segments(segment_ids, kv_segment_ids):
    """Key segment ids: the query ids unless given; keys without query ids are an error."""
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("flash attention: kv_segment_ids given without segment_ids")
    return segment_ids if kv_segment_ids is None else kv_segment_ids


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pads, constant_values=value)


def _block_minmax(seg, length: int, block: int, n: int):
    """Per-block (min, max, uniform) of the non-padding segment ids; empty blocks: min > max."""
    big = np.iinfo(np.int32).max
    seg = jnp.asarray(seg, dtype=jnp.int32)[:, :length]
    seg = jnp.pad(seg, ((0, 0), (0, n * block - length))).reshape(seg.shape[0], n, block)
    valid = seg > 0
    lo = jnp.min(jnp.where(valid, seg, big), axis=-1)
    hi = jnp.max(jnp.where(valid, seg, 0), axis=-1)
    uniform = jnp.all(valid, axis=-1) & (lo == hi)
    return lo, hi, uniform


def block_ranges(q_seg, kv_seg, *, q_len: int, kv_len: int, bq: int, bk: int, causal: bool,
                 by_kv: bool = False) -> jax.Array | np.ndarray:
    """int32 [B or 1, n_outer, 4] = (lo, hi, flo, fhi) ranges of inner blocks per outer block.

    Outer blocks are query blocks (forward, dQ), or key blocks when `by_kv` (dK/dV). Segment ids
    come both or neither; with none the table is a numpy constant. A "mask-free" block pair has
    every query and key in bounds, every key visible under the causal rule, and (with segments)
    one shared segment.
    """
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    qi = np.arange(nq)[:, None]
    kj = np.arange(nk)[None, :]
    q_first, q_last = qi * bq, np.minimum((qi + 1) * bq, q_len) - 1
    k_first, k_last = kj * bk, np.minimum((kj + 1) * bk, kv_len) - 1
    # numpy tables without segments, jax arrays (traced) with them.
    visible: np.ndarray | jax.Array = np.ones((nq, nk), bool)
    full: np.ndarray | jax.Array = ((qi + 1) * bq <= q_len) & ((kj + 1) * bk <= kv_len)
    xp: types.ModuleType
    if causal:
        visible = k_first <= q_last
        full = full & (k_last <= q_first)
    if q_seg is None:
        xp = np
        visible, full = visible[None], full[None]
    else:
        xp = jnp
        qmin, qmax, qu = _block_minmax(q_seg, q_len, bq, nq)
        kmin, kmax, ku = _block_minmax(kv_seg, kv_len, bk, nk)
        overlap = (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])
        same = qu[:, :, None] & ku[:, None, :] & (qmin[:, :, None] == kmin[:, None, :])
        visible = overlap & visible[None]
        full = same & full[None]
    if by_kv:
        visible, full = xp.swapaxes(visible, 1, 2), xp.swapaxes(full, 1, 2)
    n_inner = visible.shape[2]
    idx = xp.arange(n_inner, dtype=xp.int32)

    def first_last(mask):
        any_ = xp.any(mask, axis=-1)
        first = xp.min(xp.where(mask, idx, n_inner), axis=-1)
        last = xp.max(xp.where(mask, idx + 1, 0), axis=-1)
        return xp.where(any_, first, 0), xp.where(any_, last, 0)

    lo, hi = first_last(visible)
    flo, fhi = first_last(full)
    # The mask-free range must be contiguous; otherwise every visible block is masked.
    contiguous = xp.sum(full, axis=-1) == fhi - flo
    ok = contiguous & (fhi > flo)
    flo, fhi = xp.where(ok, flo, lo), xp.where(ok, fhi, lo)
    return xp.stack([lo, hi, flo, fhi], axis=-1).astype(xp.int32)


def pick_block(length: int, preferred: int, minimum: int) -> int:
    """Largest power-of-two block <= preferred whose padding wastes at most 1/8 of the length."""
    b = preferred
    while b > minimum and round_up(length, b) - length > length // 8:
        b //= 2
    return max(b, minimum)

