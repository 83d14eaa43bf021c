"""Flash attention for GPU: Pallas kernels lowered through Triton, forward and backward.

Works in the caller's [B, S, H, D] layout with no padding copies: every kernel sees whole
sequences and indexes them itself, loading the ragged tail block with row masks. Head dim 96 is
processed as 128 lanes with a column mask. GQA reads kv head h // G (never repeated in memory).
Per query block the forward and dQ kernels loop only over kv blocks that the causal mask and
segment layout leave non-empty, and skip mask arithmetic on blocks that need none
(`common.block_ranges`); the dK/dV kernel does the same per kv block, looping over the G query
heads of its kv head so that dK/dV accumulate in registers. Softmax runs in base 2 (exp2), with
the saved logsumexp in base 2 as well.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mini_internvl_jax.kernels import common

LOG2E = math.log2(math.e)
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 16) and Triton launch parameters.

    `default()` holds the values picked on an H100 (jax 0.11.2, bf16) by
    `benchmarks/attention.py --sweep`: for D=64, 64x64 tiles with 4 warps beat 128-row tiles
    (ViT fwd 0.38 vs 0.63 ms); the backward pipelines 3 stages deep when bidirectional and 2
    when causal (ViT fwd+bwd 1.57 vs 1.70 ms, packed LLM 0.90 vs 0.97 ms).
    """

    block_q: int = 64
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 3
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    block_q_dq: int = 64
    block_kv_dq: int = 64
    num_warps_bwd: int = 4
    num_stages_bwd: int = 3

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_q_dq",
                     "block_kv_dq"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"GPU flash attention: {name}={b} must be a power of two >= 16")

    @classmethod
    def default(cls, head_dim: int, causal: bool) -> BlockSizes:
        if head_dim <= 64:
            return cls(num_stages_bwd=2 if causal else 3)
        return cls(block_q=128, block_kv=64, num_warps=8, num_stages=2, block_q_dkv=32,
                   block_kv_dkv=64, block_q_dq=64, block_kv_dq=32, num_warps_bwd=4,
                   num_stages_bwd=2)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    causal: bool
    scale: float
    seq_len: int
    padded_len: int
    head_dim: int
    head_dim_padded: int
    groups: int
    has_seg: bool
    interpret: bool
    blocks: BlockSizes


def _fits(n: int, block: int) -> int:
    """Block no larger than needed for a short sequence (min 16, for the MMA shape)."""
    return min(block, max(16, pl.next_power_of_2(n)))


def _dot(a, b, dims):
    # f32: exact (IEEE, no TF32); bf16: explicit DEFAULT, whatever the global precision.
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _and(*masks):
    masks = [m for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, masks) if masks else None


def _load(ref, mask, other=0.0):
    # plgpu.load even when unmasked: the interpreter then pads blocks that overhang a short
    # sequence (they are traced even inside loops that run zero times).
    return plgpu.load(ref, mask=mask, other=None if mask is None else other)


def _visible(cfg: _Cfg, q_pos, k_pos, q_ids, kv_ids, kv_major=False):
    """Visibility of a [queries, keys] block, or [keys, queries] when kv_major."""
    col = lambda x: x[None, :] if kv_major else x[:, None]
    row = lambda x: x[:, None] if kv_major else x[None, :]
    conds = []
    if cfg.causal:
        conds.append(col(q_pos) >= row(k_pos))
    elif not cfg.has_seg:
        conds.append(row(k_pos) < cfg.seq_len)
    if cfg.has_seg:
        conds.append(col(q_ids) == row(kv_ids))
    return _and(*conds)


def _three_ranges(tab_ref, outer, body, carry):
    """Masked [lo, flo), mask-free [flo, fhi), masked [fhi, hi)."""
    lo, hi, flo, fhi = (tab_ref[outer, c] for c in range(4))
    carry = lax.fori_loop(lo, flo, functools.partial(body, True), carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(body, False), carry)
    return lax.fori_loop(fhi, hi, functools.partial(body, True), carry)


def _col_mask(cfg: _Cfg):
    if cfg.head_dim == cfg.head_dim_padded:
        return None
    return (jnp.arange(cfg.head_dim_padded) < cfg.head_dim)[None, :]


def _grid(cfg: _Cfg, n_outer: int, heads: int, batch: int):
    """Launch grid, and a map from grid indices to (outer block, head, batch).

    Triton launches grid axis 0 fastest. Causal: outer blocks are the slowest axis, so the
    longest programs of every head start first (longest-first keeps the triangle's tail short
    on all SMs). Otherwise one head's outer blocks run together and share its K/V in L2.
    """
    if cfg.causal:
        return (batch, heads, n_outer), lambda bi, hi, o: (o, hi, bi)
    return (n_outer, heads, batch), lambda o, hi, bi: (o, hi, bi)


def _outer_id(cfg: _Cfg, n_outer: int, heads: int, batch: int):
    _, ids = _grid(cfg, n_outer, heads, batch)
    return ids(*(pl.program_id(a) for a in range(3)))[0]


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, tab_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, cfg,
                launch):
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_kv
    nq = pl.cdiv(cfg.seq_len, bq)
    pid = _outer_id(cfg, nq, *launch)
    i = nq - 1 - pid if cfg.causal else pid  # causal: the longest rows first
    q_pos = i * bq + jnp.arange(bq)
    cmask = _col_mask(cfg)
    q_rows = pl.ds(i * bq, bq)
    row_mask = _and((q_pos < cfg.seq_len)[:, None], cmask)
    q = _load(q_ref.at[q_rows, :], row_mask)
    q_ids = qseg_ref[q_rows] if cfg.has_seg else None
    c = cfg.scale * LOG2E

    def body(masked, jb, carry):
        acc, m, denom = carry
        k_pos = jb * bk + jnp.arange(bk)
        k_rows = pl.ds(jb * bk, bk)
        kv_mask = _and((k_pos < cfg.seq_len)[:, None], cmask) if masked else cmask
        k = _load(k_ref.at[k_rows, :], kv_mask)
        s = _dot(q, k, NT) * c
        if masked:
            kv_ids = kseg_ref[k_rows] if cfg.has_seg else None
            s = jnp.where(_visible(cfg, q_pos, k_pos, q_ids, kv_ids), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        denom = denom * alpha + jnp.sum(p, axis=1)
        v = _load(v_ref.at[k_rows, :], kv_mask)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, NN)
        return acc, m_new, denom

    init = (jnp.zeros((bq, cfg.head_dim_padded), jnp.float32),
            jnp.full((bq,), common.M_INIT, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, denom = _three_ranges(tab_ref, i, body, init)
    empty = denom == 0.0
    l_safe = jnp.where(empty, 1.0, denom)
    o = acc / l_safe[:, None]
    plgpu.store(o_ref.at[q_rows, :], o.astype(o_ref.dtype), mask=row_mask)
    lse_ref[q_rows] = jnp.where(empty, jnp.inf, m + jnp.log2(l_safe))


def _specs_common(cfg: _Cfg, tab, qseg, kseg, ids):
    """BlockSpecs and operands for the range table and the segment ids."""
    tb = tab.shape[0]
    # A None spec stands for a None operand (no segment ids): pallas_call skips both.
    specs: list[pl.BlockSpec | None] = [pl.BlockSpec((None, *tab.shape[1:]),
                          lambda *g: (ids(*g)[2] if tb > 1 else 0, 0, 0))]
    args = [tab]
    if cfg.has_seg:
        seg_spec = pl.BlockSpec((None, cfg.padded_len), lambda *g: (ids(*g)[2], 0))
        specs += [seg_spec, seg_spec]
        args += [qseg, kseg]
    else:
        specs += [None, None]
        args += [None, None]
    return specs, args


def _fwd(cfg: _Cfg, q, k, v, tab, qseg, kseg):
    b, s, h, _ = q.shape
    g, dp = cfg.groups, cfg.head_dim_padded
    bq = cfg.blocks.block_q
    grid, ids = _grid(cfg, pl.cdiv(s, bq), h, b)
    q_spec = pl.BlockSpec((None, s, None, dp), lambda *i: (ids(*i)[2], 0, ids(*i)[1], 0))
    kv_spec = pl.BlockSpec((None, s, None, dp),
                           lambda *i: (ids(*i)[2], 0, ids(*i)[1] // g, 0))
    row_spec = pl.BlockSpec((None, None, cfg.padded_len), lambda *i: (ids(*i)[2], ids(*i)[1], 0))
    extra_specs, extra = _specs_common(cfg, tab, qseg, kseg, ids)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, launch=(h, b)),
        grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec, *extra_specs],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, cfg.padded_len), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.blocks.num_warps,
                                        num_stages=cfg.blocks.num_stages),
        interpret=cfg.interpret,
        name="flash_fwd",
    )(q, k, v, *extra)


# ----------------------------------------------------------------------------- backward: dQ


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, o_ref, lse_ref, tab_ref, qseg_ref, kseg_ref,
               dq_ref, di_ref, *, cfg, launch):
    """dQ for one query block; also writes delta = rowsum(dO * O) for the dK/dV kernel."""
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_kv_dq
    nq = pl.cdiv(cfg.seq_len, bq)
    pid = _outer_id(cfg, nq, *launch)
    i = nq - 1 - pid if cfg.causal else pid
    q_pos = i * bq + jnp.arange(bq)
    cmask = _col_mask(cfg)
    q_rows = pl.ds(i * bq, bq)
    in_rows = q_pos < cfg.seq_len
    row_mask = _and(in_rows[:, None], cmask)
    q = _load(q_ref.at[q_rows, :], row_mask)
    do = _load(do_ref.at[q_rows, :], row_mask)
    o = _load(o_ref.at[q_rows, :], row_mask)
    di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=1)
    di_ref[q_rows] = di
    lse = plgpu.load(lse_ref.at[q_rows], mask=in_rows, other=jnp.inf)
    q_ids = qseg_ref[q_rows] if cfg.has_seg else None
    c = cfg.scale * LOG2E

    def body(masked, jb, dq):
        k_pos = jb * bk + jnp.arange(bk)
        k_rows = pl.ds(jb * bk, bk)
        kv_mask = _and((k_pos < cfg.seq_len)[:, None], cmask) if masked else cmask
        k = _load(k_ref.at[k_rows, :], kv_mask)
        v = _load(v_ref.at[k_rows, :], kv_mask)
        s = _dot(q, k, NT) * c
        if masked:
            kv_ids = kseg_ref[k_rows] if cfg.has_seg else None
            s = jnp.where(_visible(cfg, q_pos, k_pos, q_ids, kv_ids), s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        dp = _dot(do, v, NT)
        ds = p * (dp - di[:, None])
        return dq + _dot(ds.astype(k.dtype), k, NN)

    dq = _three_ranges(tab_ref, i, body, jnp.zeros((bq, cfg.head_dim_padded), jnp.float32))
    plgpu.store(dq_ref.at[q_rows, :], (dq * cfg.scale).astype(dq_ref.dtype), mask=row_mask)


def _dq(cfg: _Cfg, q, k, v, do, out, lse, tab, qseg, kseg):
    b, s, h, _ = q.shape
    g, dp = cfg.groups, cfg.head_dim_padded
    grid, ids = _grid(cfg, pl.cdiv(s, cfg.blocks.block_q_dq), h, b)
    q_spec = pl.BlockSpec((None, s, None, dp), lambda *i: (ids(*i)[2], 0, ids(*i)[1], 0))
    kv_spec = pl.BlockSpec((None, s, None, dp),
                           lambda *i: (ids(*i)[2], 0, ids(*i)[1] // g, 0))
    row_spec = pl.BlockSpec((None, None, cfg.padded_len), lambda *i: (ids(*i)[2], ids(*i)[1], 0))
    extra_specs, extra = _specs_common(cfg, tab, qseg, kseg, ids)
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, launch=(h, b)),
        grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, q_spec, row_spec, *extra_specs],
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, cfg.padded_len), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.blocks.num_warps_bwd,
                                        num_stages=cfg.blocks.num_stages_bwd),
        interpret=cfg.interpret,
        name="flash_bwd_dq",
    )(q, k, v, do, out, lse, *extra)


# ----------------------------------------------------------------------------- backward: dK, dV


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, tab_ref, qseg_ref, kseg_ref,
                dk_ref, dv_ref, *, cfg, launch):
    """Transposed form: S^T [bk, bq] = K Q^T, so dV += P^T dO and dK += dS^T Q need no
    transposes of the probability tiles."""
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_kv_dkv
    j = _outer_id(cfg, pl.cdiv(cfg.seq_len, bk), *launch)  # causal: the longest columns first
    k_pos = j * bk + jnp.arange(bk)
    cmask = _col_mask(cfg)
    k_rows = pl.ds(j * bk, bk)
    kv_mask = _and((k_pos < cfg.seq_len)[:, None], cmask)
    k = _load(k_ref.at[k_rows, :], kv_mask)
    v = _load(v_ref.at[k_rows, :], kv_mask)
    kv_ids = kseg_ref[k_rows] if cfg.has_seg else None
    c = cfg.scale * LOG2E

    # With G > 1 the q-side refs hold the G heads of this kv head: pick head g.
    head = (lambda ref, g, rows: ref.at[rows]) if cfg.groups == 1 else (
        lambda ref, g, rows: ref.at[rows, g] if ref.ndim == 3 else ref.at[g, rows])

    def body(g, masked, ib, carry):
        dk, dv = carry
        q_pos = ib * bq + jnp.arange(bq)
        q_rows = pl.ds(ib * bq, bq)
        if masked:
            in_rows = q_pos < cfg.seq_len
            row_mask = _and(in_rows[:, None], cmask)
            # Rows past the end: p = 0 (lse = inf) and delta = 0, whatever memory holds.
            lse = plgpu.load(head(lse_ref, g, q_rows), mask=in_rows, other=jnp.inf)
            di = plgpu.load(head(di_ref, g, q_rows), mask=in_rows, other=0.0)
        else:
            row_mask = cmask
            lse = head(lse_ref, g, q_rows)[...]
            di = head(di_ref, g, q_rows)[...]
        q = _load(head(q_ref, g, q_rows), row_mask)
        do = _load(head(do_ref, g, q_rows), row_mask)
        s = _dot(k, q, NT) * c
        if masked:
            q_ids = qseg_ref[q_rows] if cfg.has_seg else None
            s = jnp.where(_visible(cfg, q_pos, k_pos, q_ids, kv_ids, kv_major=True), s, -jnp.inf)
        p = jnp.exp2(s - lse[None, :])
        dv = dv + _dot(p.astype(do.dtype), do, NN)
        dp = _dot(v, do, NT)
        ds = p * (dp - di[None, :])
        return dk + _dot(ds.astype(q.dtype), q, NN), dv

    def per_head(g, carry):
        return _three_ranges(tab_ref, j, functools.partial(body, g), carry)

    zeros = jnp.zeros((bk, cfg.head_dim_padded), jnp.float32)
    if cfg.groups == 1:
        dk, dv = per_head(0, (zeros, zeros))
    else:
        dk, dv = lax.fori_loop(0, cfg.groups, per_head, (zeros, zeros))
    plgpu.store(dk_ref.at[k_rows, :], (dk * cfg.scale).astype(dk_ref.dtype), mask=kv_mask)
    plgpu.store(dv_ref.at[k_rows, :], dv.astype(dv_ref.dtype), mask=kv_mask)


def _dkv(cfg: _Cfg, q, k, v, do, lse, di, tab, qseg, kseg):
    b, s, _, _ = q.shape
    kvh = k.shape[2]
    g, dp = cfg.groups, cfg.head_dim_padded
    grid, ids = _grid(cfg, pl.cdiv(s, cfg.blocks.block_kv_dkv), kvh, b)
    heads = None if g == 1 else g
    q_spec = pl.BlockSpec((None, s, heads, dp), lambda *i: (ids(*i)[2], 0, ids(*i)[1], 0))
    kv_spec = pl.BlockSpec((None, s, None, dp), lambda *i: (ids(*i)[2], 0, ids(*i)[1], 0))
    row_spec = pl.BlockSpec((None, heads, cfg.padded_len),
                            lambda *i: (ids(*i)[2], ids(*i)[1], 0))
    extra_specs, extra = _specs_common(cfg, tab, qseg, kseg, ids)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, launch=(kvh, b)),
        grid=grid,
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *extra_specs],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.blocks.num_warps_bwd,
                                        num_stages=cfg.blocks.num_stages_bwd),
        interpret=cfg.interpret,
        name="flash_bwd_dkv",
    )(q, k, v, do, lse, di, *extra)


# ----------------------------------------------------------------------------- custom vjp


def _segments(cfg: _Cfg, q_seg, kv_seg):
    """Padded ids; kv padding and id 0 become -1, so equality alone encodes the segment rule."""
    if not cfg.has_seg:
        return None, None
    q = common.pad_axis(q_seg.astype(jnp.int32), 1, cfg.padded_len)
    kv = common.pad_axis(kv_seg.astype(jnp.int32), 1, cfg.padded_len)
    return q, jnp.where(kv == 0, -1, kv)


def _table(cfg: _Cfg, q_seg, kv_seg, bq, bk, by_kv=False):
    return common.block_ranges(q_seg, kv_seg, q_len=cfg.seq_len, kv_len=cfg.seq_len, bq=bq,
                               bk=bk, causal=cfg.causal, by_kv=by_kv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Cfg, q, k, v, q_seg, kv_seg):
    return _flash_fwd(cfg, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(cfg: _Cfg, q, k, v, q_seg, kv_seg):
    qs, ks = _segments(cfg, q_seg, kv_seg)
    tab = _table(cfg, q_seg, kv_seg, cfg.blocks.block_q, cfg.blocks.block_kv)
    out, lse = common.name_residuals(*_fwd(cfg, q, k, v, tab, qs, ks))
    return out, (q, k, v, out, lse, q_seg, kv_seg)


def _flash_bwd(cfg: _Cfg, res, do):
    q, k, v, out, lse, q_seg, kv_seg = res
    bs = cfg.blocks
    qs, ks = _segments(cfg, q_seg, kv_seg)
    do = do.astype(q.dtype)
    tab_dq = _table(cfg, q_seg, kv_seg, bs.block_q_dq, bs.block_kv_dq)
    tab_dkv = _table(cfg, q_seg, kv_seg, bs.block_q_dkv, bs.block_kv_dkv, by_kv=True)
    dq, di = _dq(cfg, q, k, v, do, out, lse, tab_dq, qs, ks)
    dk, dv = _dkv(cfg, q, k, v, do, lse, di, tab_dkv, qs, ks)
    zero = lambda seg: None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
    return dq, dk, dv, zero(q_seg), zero(kv_seg)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, causal: bool, segment_ids=None, kv_segment_ids=None,
                    scale: float | None = None, block_sizes: BlockSizes | None = None,
                    interpret: bool = False) -> jax.Array:
    """Flash attention on GPU (Pallas Triton). q [B,S,H,D], k/v [B,S,KV,D] -> [B,S,H,D].

    Masking follows `kernels.reference.dot_product_attention`. `interpret=True` runs the same
    kernels through the Pallas interpreter (CPU tests).
    """
    _, s, h, kvh, _, d = common.check_inputs(q, k, v, segment_ids, kv_segment_ids)
    kv_segment_ids = common.kv_segments(segment_ids, kv_segment_ids)
    has_seg = segment_ids is not None
    bs = block_sizes or BlockSizes.default(d, causal)
    fit = {f.name: _fits(s, getattr(bs, f.name)) for f in dataclasses.fields(bs)
           if f.name.startswith("block_")}
    bs = dataclasses.replace(bs, **fit)
    cfg = _Cfg(causal=causal, scale=float(d**-0.5 if scale is None else scale), seq_len=s,
               padded_len=common.round_up(s, max(fit.values())), head_dim=d,
               head_dim_padded=pl.next_power_of_2(d), groups=h // kvh, has_seg=has_seg,
               interpret=bool(interpret), blocks=bs)
    return _flash(cfg, q, k, v, segment_ids, kv_segment_ids)
