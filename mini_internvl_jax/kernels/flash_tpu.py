"""Flash attention for TPU: Pallas kernels lowered by Mosaic, forward and backward.

Layout inside: [B, heads, S, D], padded to a multiple of the blocks; the wrapper transposes and
pads once, so the caller keeps [B, S, H, D]. GQA maps query head h to kv head h // G in the
index maps (K/V are never repeated in memory). Per query block the kernels visit only the kv
blocks that the causal mask and the segment layout leave non-empty (ranges from
`common.block_ranges`, scalar-prefetched); skipped grid steps keep the previous block index,
so they issue no DMA. The backward recomputes P from the saved logsumexp. Where a kv head's
whole K and V fit in VMEM, one fused kernel walks the query blocks and produces dQ, dK and dV
(5 matmuls per block pair); longer sequences take two kernels, one for dQ and one for dK/dV
that loops over the G query heads of a kv head, which both recompute S and dP (7 matmuls).

Blocks: the pipeline copies an operand's block from HBM again whenever its index changes between
consecutive grid steps, so with 128-blocks InternViT's 1025 tokens (9 query blocks) re-read all
of K/V 9 times and were bandwidth-bound. Short sequences (`_auto_blocks`) therefore take one
inner block spanning the whole sequence, padded to a multiple of 128 only (1152 = 9 x 128, not
a power of two): K/V are read once per head, and each grid step is large enough to hide its
fixed cost. Long ones (the LLM's 4096 causal packed tokens) keep power-of-two `BlockSizes`,
which let the kernels skip masked-out blocks. The cost estimates count those copies
(`_dma_bytes`), not each array once.

Row statistics follow the splash-attention layout: m and l live lane-replicated as [bq, 128];
logsumexp and delta travel lane-major as [B, H, 1, S]; segment ids are pre-broadcast to
[S, 128] (ids along sublanes) and [8, S] (ids along lanes).
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
from jax.experimental.pallas import tpu as pltpu

from mini_internvl_jax.kernels import common

LANES, SUBLANES = 128, 8
# Automatic blocks: the inner side spans the whole 128-padded sequence up to this length (less
# when causal or segmented, where one whole block gives up skipping the masked-out blocks) ...
WHOLE_MAX, WHOLE_MAX_SKIPPING = 2048, 1024
# ... with the outer block as large as keeps each f32 [outer, inner] temporary (scores,
# probabilities, their gradients) within 2 MiB of the 16 MiB default scoped VMEM of a v5e.
TEMP_ELEMS = 512 * 1024
NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
NN = (((1,), (0,)), ((), ()))
TN = (((0,), (0,)), ((), ()))  # contract the first dims: a.T @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes (powers of two >= 128). Each is shrunk for short or odd lengths
    (`pick_block`). Without them the kernels pick their own (`_auto_blocks`)."""

    block_q: int = 512
    block_kv: int = 512
    block_q_dkv: int = 512
    block_kv_dkv: int = 512
    block_q_dq: int = 512
    block_kv_dq: int = 512

    def __post_init__(self):
        for f in dataclasses.fields(self):
            b = getattr(self, f.name)
            if b < LANES or b & (b - 1):
                raise ValueError(f"TPU flash attention: {f.name}={b} must be a power of two "
                                 f">= {LANES}")


@dataclasses.dataclass(frozen=True)
class _Cfg:
    causal: bool
    scale: float
    seq_len: int
    padded_len: int
    groups: int
    has_seg: bool
    interpret: object
    fwd: tuple[int, int]
    dkv: tuple[int, int]
    dq: tuple[int, int]
    fused: tuple[int, int] | None = None  # the fused backward's blocks; None: two kernels


def _cost(cfg: _Cfg, blocks: tuple[int, int], heads: int, matmuls: int, grid, tab_b: int,
          in_specs, args, out_specs, outs, by_kv=False) -> pl.CostEstimate:
    """XLA's cost estimate of one kernel: `matmuls` [bq, d] x [d, bk]-sized products per
    visited block pair, an exp per score, and the HBM bytes the pipeline moves (`_dma_bytes`).
    Visited pairs and block indices are those of the causal (or full) mask without segment ids:
    the most the kernel computes and moves (segments only skip more, at run time). The step
    anatomy (tools/hlo.py) reads these figures."""
    bq, bk = blocks
    d = args[0].shape[-1]
    tab = common.block_ranges(None, None, q_len=cfg.seq_len, kv_len=cfg.seq_len, bq=bq, bk=bk,
                              causal=cfg.causal, by_kv=by_kv)
    pairs = int(np.sum(tab[..., 1] - tab[..., 0])) * heads
    # with segments the index maps read one table row per batch row: here all the same
    flat = np.broadcast_to(tab, (tab_b, *tab.shape[1:])).reshape(-1)
    moved = _dma_bytes(grid, [*in_specs, *out_specs], [*args, *outs], flat)
    return pl.CostEstimate(flops=2 * matmuls * pairs * bq * bk * d,
                           transcendentals=pairs * bq * bk, bytes_accessed=moved + flat.nbytes)


def _dma_bytes(grid: tuple[int, ...], specs, arrays, tab: np.ndarray) -> int:
    """HBM bytes the Pallas TPU pipeline moves for these blocks: it walks the grid in order
    (last axis fastest) and copies an input block in, or an output block out, whenever the
    block index differs from the previous grid step's. The kernel's own index maps are
    evaluated on numpy grid indices (`_clamp` follows its inputs' array type)."""
    steps = np.indices(grid).reshape(len(grid), -1)
    n = steps.shape[1]
    total = 0
    for spec, x in zip(specs, arrays, strict=True):
        if spec is None or x is None:
            continue
        idx = np.stack([np.broadcast_to(np.asarray(i), (n,)) for i in spec.index_map(*steps, tab)])
        copies = 1 + int(np.count_nonzero(np.any(idx[:, 1:] != idx[:, :-1], axis=0)))
        block = math.prod(b if isinstance(b, int) else 1 for b in spec.block_shape)
        total += copies * block * np.dtype(x.dtype).itemsize
    return total


def _precision(dtype):
    # Explicit for bf16 too: a global jax_default_matmul_precision="highest" would otherwise
    # ask Mosaic for an fp32-precision bf16 matmul, which it rejects.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _mask(cfg: _Cfg, s, q_pos, k_pos, q_ids, kv_ids):
    """Scores s with the hidden ones at -inf, from int32 query/key position grids of the
    block's shape. A kernel traces its masked branch even where no block needs it (full
    attention over an unpadded length): then there is nothing to hide."""
    conds = []
    if cfg.causal:
        conds.append(k_pos <= q_pos)
    elif not cfg.has_seg and cfg.padded_len > cfg.seq_len:
        conds.append(k_pos < cfg.seq_len)
    if cfg.has_seg:
        conds.append(q_ids == kv_ids)
    return jnp.where(functools.reduce(jnp.logical_and, conds), s, -jnp.inf) if conds else s


def _ranges(tab_ref, b, outer, n_outer, tab_b):
    base = ((b if tab_b > 1 else 0) * n_outer + outer) * 4
    return tab_ref[base], tab_ref[base + 1], tab_ref[base + 2], tab_ref[base + 3]


def _clamp(x, lo, hi):
    """Inner block index to fetch: outside [lo, hi) repeat an edge block, so no new DMA.
    numpy indices (the byte count of `_dma_bytes`) stay numpy."""
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.minimum(xp.maximum(x, lo), xp.maximum(hi - 1, lo))


def _run_blocks(inner, lo, hi, flo, fhi, body):
    """Calls body(masked) for a visible inner block; mask-free blocks skip the mask."""
    visible = (inner >= lo) & (inner < hi)
    free = (inner >= flo) & (inner < fhi)

    @pl.when(visible & free)
    def _():
        body(False)

    @pl.when(visible & jnp.logical_not(free))
    def _():
        body(True)


def _pallas(cfg: _Cfg, kernel, name: str, *, tab, grid, in_specs, args, seg_specs, seg_args,
            out_specs, out_shape, scratch, semantics, blocks, heads: int, matmuls: int,
            by_kv=False, vmem_limit: int | None = None):
    """One kernel call of this module: the block table scalar-prefetched, the segment-id blocks
    appended to the inputs (their slots left empty without segments), and the cost estimate
    from the same specs."""
    if cfg.has_seg:
        in_specs, args = [*in_specs, *seg_specs], [*args, *seg_args]
    else:
        in_specs, args = [*in_specs, None, None], [*args, None, None]
    tab_b = tab.shape[0]
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg, tab_b=tab_b),
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid,
                                               in_specs=in_specs, out_specs=out_specs,
                                               scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics,
                                             vmem_limit_bytes=vmem_limit),
        interpret=cfg.interpret,
        name=name,
        cost_estimate=_cost(cfg, blocks, heads, matmuls, grid, tab_b, in_specs, args,
                            out_specs, out_shape, by_kv=by_kv),
    )(jnp.asarray(tab).reshape(-1), *args)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(tab_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, cfg: _Cfg, tab_b: int):
    bq, bk = cfg.fwd
    nq, nk = cfg.padded_len // bq, cfg.padded_len // bk
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo, hi, flo, fhi = _ranges(tab_ref, b, i, nq, tab_b)
    d = acc_sc.shape[-1]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, common.M_INIT, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def body(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32,
                            precision=_precision(q.dtype)) * cfg.scale
        if masked:
            q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            q_ids = kv_ids = None
            if cfg.has_seg:
                q_ids = jnp.tile(qseg_ref[...], (1, bk // LANES))
                kv_ids = kseg_ref[:1, :]
            s = _mask(cfg, s, q_pos, k_pos, q_ids, kv_ids)
        m_prev, l_prev = m_sc[...], l_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - jnp.tile(m_next, (1, bk // LANES)))
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
        m_sc[...] = m_next
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32,
                             precision=_precision(v.dtype))
        acc_sc[...] = alpha[:, :d] * acc_sc[...] + pv

    _run_blocks(j, lo, hi, flo, fhi, body)

    @pl.when(j == nk - 1)
    def _finish():
        denom = l_sc[...]
        empty = denom == 0.0
        l_safe = jnp.where(empty, 1.0, denom)
        inv = jnp.where(empty, 0.0, 1.0 / l_safe)
        o_ref[...] = (acc_sc[...] * inv[:, :d]).astype(o_ref.dtype)
        lse = jnp.where(empty, jnp.inf, m_sc[...] + jnp.log(l_safe))
        lse_ref[...] = jnp.transpose(lse)[:1, :]


def _fwd(cfg: _Cfg, tab, qt, kt, vt, qseg_col, kseg_row):
    b, h, sp, d = qt.shape
    bq, bk = cfg.fwd
    g = cfg.groups
    nq, nk = sp // bq, sp // bk
    tab_b = tab.shape[0]

    def q_map(bi, hi, i, j, t):
        return bi, hi, i, 0

    def kv_map(bi, hi, i, j, t):
        lo, up, _, _ = _ranges(t, bi, i, nq, tab_b)
        return bi, hi // g, _clamp(j, lo, up), 0

    def kseg_map(bi, hi, i, j, t):
        lo, up, _, _ = _ranges(t, bi, i, nq, tab_b)
        return bi, 0, _clamp(j, lo, up)

    out, lse = _pallas(
        cfg, _fwd_kernel, "flash_fwd", tab=tab, grid=(b, h, nq, nk),
        in_specs=[pl.BlockSpec((None, None, bq, d), q_map),
                  pl.BlockSpec((None, None, bk, d), kv_map),
                  pl.BlockSpec((None, None, bk, d), kv_map)],
        args=[qt, kt, vt],
        seg_specs=[pl.BlockSpec((None, bq, LANES), lambda bi, hi, i, j, t: (bi, i, 0)),
                   pl.BlockSpec((None, SUBLANES, bk), kseg_map)],
        seg_args=[qseg_col, kseg_row],
        out_specs=[pl.BlockSpec((None, None, bq, d), q_map),
                   pl.BlockSpec((None, None, 1, bq), lambda bi, hi, i, j, t: (bi, hi, 0, i))],
        out_shape=[jax.ShapeDtypeStruct((b, h, sp, d), qt.dtype),
                   jax.ShapeDtypeStruct((b, h, 1, sp), jnp.float32)],
        scratch=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                 pltpu.VMEM((bq, d), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary"),
        blocks=cfg.fwd, heads=b * h, matmuls=2)  # QK^T and PV
    return out, lse


# ----------------------------------------------------------------------------- backward: dQ


def _dq_kernel(tab_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kseg_ref,
               dq_ref, acc_sc, *, cfg: _Cfg, tab_b: int):
    bq, bk = cfg.dq
    nq, nk = cfg.padded_len // bq, cfg.padded_len // bk
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo, hi, flo, fhi = _ranges(tab_ref, b, i, nq, tab_b)

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def body(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        prec = _precision(q.dtype)
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32,
                            precision=prec) * cfg.scale
        if masked:
            q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            q_ids = kv_ids = None
            if cfg.has_seg:
                q_ids = jnp.tile(qseg_ref[...], (1, bk // LANES))
                kv_ids = kseg_ref[:1, :]
            s = _mask(cfg, s, q_pos, k_pos, q_ids, kv_ids)
        lse = jnp.expand_dims(lse_ref[0], -1)
        di = jnp.expand_dims(di_ref[0], -1)
        p = jnp.exp(s - lse)
        dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32, precision=prec)
        ds = p * (dp - di)
        acc_sc[...] += lax.dot_general(ds.astype(k.dtype), k, NN,
                                       preferred_element_type=jnp.float32, precision=prec)

    _run_blocks(j, lo, hi, flo, fhi, body)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (acc_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _backward_in_specs(bq: int, bk: int, d: int, q_map, kv_map, row_map
                       ) -> list[pl.BlockSpec | None]:
    """Blocks of (q, k, v, dO, lse, delta), the inputs both backward kernels read."""
    return [pl.BlockSpec((None, None, bq, d), q_map),
            pl.BlockSpec((None, None, bk, d), kv_map),
            pl.BlockSpec((None, None, bk, d), kv_map),
            pl.BlockSpec((None, None, bq, d), q_map),
            pl.BlockSpec((None, None, 1, bq), row_map),
            pl.BlockSpec((None, None, 1, bq), row_map)]


def _dq(cfg: _Cfg, tab, qt, kt, vt, dot_, lse, di, qseg_col, kseg_row):
    b, h, sp, d = qt.shape
    bq, bk = cfg.dq
    g = cfg.groups
    nq, nk = sp // bq, sp // bk
    tab_b = tab.shape[0]

    def q_map(bi, hi, i, j, t):
        return bi, hi, i, 0

    def row_map(bi, hi, i, j, t):
        return bi, hi, 0, i

    def kv_map(bi, hi, i, j, t):
        lo, up, _, _ = _ranges(t, bi, i, nq, tab_b)
        return bi, hi // g, _clamp(j, lo, up), 0

    def kseg_map(bi, hi, i, j, t):
        lo, up, _, _ = _ranges(t, bi, i, nq, tab_b)
        return bi, 0, _clamp(j, lo, up)

    (dq,) = _pallas(
        cfg, _dq_kernel, "flash_bwd_dq", tab=tab, grid=(b, h, nq, nk),
        in_specs=_backward_in_specs(bq, bk, d, q_map, kv_map, row_map),
        args=[qt, kt, vt, dot_, lse, di],
        seg_specs=[pl.BlockSpec((None, bq, LANES), lambda bi, hi, i, j, t: (bi, i, 0)),
                   pl.BlockSpec((None, SUBLANES, bk), kseg_map)],
        seg_args=[qseg_col, kseg_row],
        out_specs=[pl.BlockSpec((None, None, bq, d), q_map)],
        out_shape=[jax.ShapeDtypeStruct(qt.shape, qt.dtype)],
        scratch=[pltpu.VMEM((bq, d), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary"),
        blocks=cfg.dq, heads=b * h, matmuls=3)  # QK^T, dO V^T, dS K
    return dq


# ----------------------------------------------------------------------------- backward: dK, dV


def _dkv_kernel(tab_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kseg_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, cfg: _Cfg, tab_b: int):
    """Transposed form (keys on sublanes, queries on lanes): lse/delta broadcast as rows."""
    bq, bk = cfg.dkv
    nq, nk = cfg.padded_len // bq, cfg.padded_len // bk
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    lo, hi, flo, fhi = _ranges(tab_ref, b, j, nk, tab_b)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def body(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        prec = _precision(q.dtype)
        s = lax.dot_general(k, q, NT, preferred_element_type=jnp.float32,
                            precision=prec) * cfg.scale
        if masked:
            q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
            q_ids = kv_ids = None
            if cfg.has_seg:
                q_ids = qseg_ref[:1, :]
                kv_ids = jnp.tile(kseg_ref[...], (1, bq // LANES))
            s = _mask(cfg, s, q_pos, k_pos, q_ids, kv_ids)
        p = jnp.exp(s - lse_ref[...])
        dv_sc[...] += lax.dot_general(p.astype(do.dtype), do, NN,
                                      preferred_element_type=jnp.float32, precision=prec)
        dp = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32, precision=prec)
        ds = p * (dp - di_ref[...])
        dk_sc[...] += lax.dot_general(ds.astype(q.dtype), q, NN,
                                      preferred_element_type=jnp.float32, precision=prec)

    _run_blocks(i, lo, hi, flo, fhi, body)

    @pl.when((g == cfg.groups - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dkv(cfg: _Cfg, tab, qt, kt, vt, dot_, lse, di, qseg_row, kseg_col):
    b, kvh, sp, d = kt.shape
    bq, bk = cfg.dkv
    g = cfg.groups
    nq, nk = sp // bq, sp // bk
    tab_b = tab.shape[0]

    def kv_map(bi, kh, j, gi, i, t):
        return bi, kh, j, 0

    def q_i(bi, j, i, t):
        lo, up, _, _ = _ranges(t, bi, j, nk, tab_b)
        return _clamp(i, lo, up)

    def q_map(bi, kh, j, gi, i, t):
        return bi, kh * g + gi, q_i(bi, j, i, t), 0

    def row_map(bi, kh, j, gi, i, t):
        return bi, kh * g + gi, 0, q_i(bi, j, i, t)

    # QK^T, dO V^T, P^T dO, dS^T Q for each of the G query heads of a kv head
    return _pallas(
        cfg, _dkv_kernel, "flash_bwd_dkv", tab=tab, grid=(b, kvh, nk, g, nq),
        in_specs=_backward_in_specs(bq, bk, d, q_map, kv_map, row_map),
        args=[qt, kt, vt, dot_, lse, di],
        seg_specs=[pl.BlockSpec((None, SUBLANES, bq),
                                lambda bi, kh, j, gi, i, t: (bi, 0, q_i(bi, j, i, t))),
                   pl.BlockSpec((None, bk, LANES), lambda bi, kh, j, gi, i, t: (bi, j, 0))],
        seg_args=[qseg_row, kseg_col],
        out_specs=[pl.BlockSpec((None, None, bk, d), kv_map),
                   pl.BlockSpec((None, None, bk, d), kv_map)],
        out_shape=[jax.ShapeDtypeStruct(kt.shape, kt.dtype),
                   jax.ShapeDtypeStruct(vt.shape, vt.dtype)],
        scratch=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        blocks=cfg.dkv, heads=b * kvh * g, matmuls=4, by_kv=True)


# ----------------------------------------------------------------------------- backward: fused

# The fused backward keeps the whole (padded) K and V of a kv head in VMEM, with float32 dK/dV
# accumulators of the same length. It is taken where a generous estimate of all it holds
# (`_fused_vmem_bytes`) stays within FUSED_VMEM_BUDGET, well inside the smallest VMEM of the
# chips we target (v5p: 64 MiB per core; v5e, v6e: 128 MiB): bf16 with segment ids fits 8192
# tokens, float32 4096. Its scoped VMEM (scratch and temporaries: the v5e compiler asks for 6
# MiB at 4096 bf16 tokens with segment ids, 10 at 8192) gets an explicit FUSED_VMEM_LIMIT,
# twice v5e's 16 MiB default and half of v5p's VMEM, so these lengths do not depend on it.
FUSED_VMEM_BUDGET = 48 * 2**20
FUSED_VMEM_LIMIT = 32 * 2**20


def _fused_vmem_bytes(sp: int, bq: int, bk: int, d: int, itemsize: int, has_seg: bool) -> int:
    """VMEM the fused backward needs: double-buffered blocks (rows of d pad to 128 lanes,
    one-row blocks to 8 sublanes), float32 scratch, and the [bk, bq] float32 temporaries."""
    row = common.round_up(d, LANES)
    seqs = 2 * 2 * sp * row * itemsize * 2           # K, V in; dK, dV out
    seqs += 2 * sp * row * 4                         # dK, dV accumulators
    qblk = 2 * 3 * bq * row * itemsize + bq * row * 4  # Q, dO in, dQ out; dQ accumulator
    qblk += 2 * 2 * SUBLANES * bq * 4                # lse, delta
    seg = 2 * (sp * LANES + SUBLANES * bq) * 4 if has_seg else 0
    temps = 8 * bk * bq * 4                          # S, P, dP, dS, their casts and the mask
    return seqs + qblk + seg + temps


def _divisor_block(sp: int, cap: int) -> int:
    """Largest multiple of 128 that divides sp and is at most max(cap, 128)."""
    b = max(cap, LANES) // LANES * LANES
    while sp % b:
        b -= LANES
    return b


def _fused_blocks(cfg: _Cfg, d: int, dtype, bs: BlockSizes, fused: bool | None
                  ) -> tuple[int, int] | None:
    """(query block, kv sub-block) of the fused backward, or None for the two-kernel one:
    when asked (`fused` False), or when a kv head's whole sequence does not fit in VMEM.
    The blocks divide the padded length (at most block_q_dkv / block_kv_dkv)."""
    sp = cfg.padded_len
    if fused is False:
        return None
    if sp % LANES:  # whole-sequence blocks of an odd length: no 128-multiple divides it
        if fused:
            raise ValueError(f"TPU flash attention: no fused backward at {sp} padded tokens "
                             f"(not a multiple of {LANES})")
        return None
    bq, bk = _divisor_block(sp, bs.block_q_dkv), _divisor_block(sp, bs.block_kv_dkv)
    need = _fused_vmem_bytes(sp, bq, bk, d, jnp.dtype(dtype).itemsize, cfg.has_seg)
    if need > FUSED_VMEM_BUDGET:
        if fused:
            raise ValueError(f"TPU flash attention: the fused backward needs ~{need >> 20} MiB "
                             f"of VMEM at {sp} tokens (budget {FUSED_VMEM_BUDGET >> 20} MiB)")
        return None
    return bq, bk


def _fused_kernel(tab_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kseg_ref,
                  dq_ref, dk_ref, dv_ref, dq_sc, dk_sc, dv_sc, *, cfg: _Cfg, tab_b: int):
    """One query block against every visible kv sub-block of the resident K/V. Transposed
    form as in the dK/dV kernel (keys on sublanes): lse/delta broadcast as rows, and only dQ
    needs a transposed operand."""
    assert cfg.fused is not None
    bq, bk = cfg.fused
    nq = cfg.padded_len // bq
    b, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo, hi, flo, fhi = _ranges(tab_ref, b, i, nq, tab_b)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
    q, do = q_ref[...], do_ref[...]
    lse, di = lse_ref[...], di_ref[...]
    prec = _precision(q.dtype)

    def body(j, masked: bool):
        rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k, v = k_ref[rows, :], v_ref[rows, :]
        s = lax.dot_general(k, q, NT, preferred_element_type=jnp.float32,
                            precision=prec) * cfg.scale
        if masked:
            q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
            q_ids = kv_ids = None
            if cfg.has_seg:
                q_ids = qseg_ref[:1, :]
                kv_ids = jnp.tile(kseg_ref[rows, :], (1, bq // LANES))
            s = _mask(cfg, s, q_pos, k_pos, q_ids, kv_ids)
        p = jnp.exp(s - lse)
        dv_sc[rows, :] += lax.dot_general(p.astype(do.dtype), do, NN,
                                          preferred_element_type=jnp.float32, precision=prec)
        dp = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32, precision=prec)
        ds = (p * (dp - di)).astype(q.dtype)
        dk_sc[rows, :] += lax.dot_general(ds, q, NN, preferred_element_type=jnp.float32,
                                          precision=prec)
        dq_sc[...] += lax.dot_general(ds, k, TN, preferred_element_type=jnp.float32,
                                      precision=prec)

    def loop(start, stop, masked: bool):
        def step(j, carry):
            body(j, masked)
            return carry

        lax.fori_loop(start, stop, step, 0)

    # [lo, flo) and [fhi, hi) need the mask; [flo, fhi) is mask-free (common.block_ranges).
    loop(lo, flo, True)
    loop(flo, fhi, False)
    loop(fhi, hi, True)
    dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)

    @pl.when((g == cfg.groups - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _fused_bwd(cfg: _Cfg, tab, qt, kt, vt, dot_, lse, di, qseg_row, kseg_col):
    b, h, sp, d = qt.shape
    kvh = kt.shape[1]
    assert cfg.fused is not None
    bq, _ = cfg.fused
    g = cfg.groups
    nq = sp // bq

    def q_map(bi, kh, gi, i, t):
        return bi, kh * g + gi, i, 0

    def row_map(bi, kh, gi, i, t):
        return bi, kh * g + gi, 0, i

    def seq_map(bi, kh, gi, i, t):  # constant along (g, i): fetched once per kv head
        return bi, kh, 0, 0

    # QK^T, dO V^T, P^T dO, dS^T Q, dS K; K/V and dK/dV move once per (row, kv head)
    return _pallas(
        cfg, _fused_kernel, "flash_bwd_fused", tab=tab, grid=(b, kvh, g, nq),
        in_specs=[pl.BlockSpec((None, None, bq, d), q_map),
                  pl.BlockSpec((None, None, sp, d), seq_map),
                  pl.BlockSpec((None, None, sp, d), seq_map),
                  pl.BlockSpec((None, None, bq, d), q_map),
                  pl.BlockSpec((None, None, 1, bq), row_map),
                  pl.BlockSpec((None, None, 1, bq), row_map)],
        args=[qt, kt, vt, dot_, lse, di],
        seg_specs=[pl.BlockSpec((None, SUBLANES, bq), lambda bi, kh, gi, i, t: (bi, 0, i)),
                   pl.BlockSpec((None, sp, LANES), lambda bi, kh, gi, i, t: (bi, 0, 0))],
        seg_args=[qseg_row, kseg_col],
        out_specs=[pl.BlockSpec((None, None, bq, d), q_map),
                   pl.BlockSpec((None, None, sp, d), seq_map),
                   pl.BlockSpec((None, None, sp, d), seq_map)],
        out_shape=[jax.ShapeDtypeStruct(qt.shape, qt.dtype),
                   jax.ShapeDtypeStruct(kt.shape, kt.dtype),
                   jax.ShapeDtypeStruct(vt.shape, vt.dtype)],
        scratch=[pltpu.VMEM((bq, d), jnp.float32), pltpu.VMEM((sp, d), jnp.float32),
                 pltpu.VMEM((sp, d), jnp.float32)],
        semantics=("parallel", "parallel", "arbitrary", "arbitrary"),
        blocks=cfg.fused, heads=b * h, matmuls=5, vmem_limit=FUSED_VMEM_LIMIT)


# ----------------------------------------------------------------------------- custom vjp


def _seg_layouts(cfg: _Cfg, q_seg, kv_seg):
    """Padded segment ids in both lane/sublane layouts; padding and id 0 on the kv side
    become -1 so that a single equality test encodes the whole segment rule."""
    if not cfg.has_seg:
        return None, None, None, None
    sp = cfg.padded_len
    q = common.pad_axis(q_seg.astype(jnp.int32), 1, sp)
    kv = common.pad_axis(kv_seg.astype(jnp.int32), 1, sp)
    kv = jnp.where(kv == 0, -1, kv)
    b = q.shape[0]
    q_col = lax.broadcast_in_dim(q, (b, sp, LANES), (0, 1))
    q_row = lax.broadcast_in_dim(q, (b, SUBLANES, sp), (0, 2))
    kv_col = lax.broadcast_in_dim(kv, (b, sp, LANES), (0, 1))
    kv_row = lax.broadcast_in_dim(kv, (b, SUBLANES, sp), (0, 2))
    return q_col, q_row, kv_col, kv_row


def _to_kernel_layout(cfg: _Cfg, x):
    return common.pad_axis(jnp.swapaxes(x, 1, 2), 2, cfg.padded_len)


def _table(cfg: _Cfg, q_seg, kv_seg, blocks: tuple[int, int], by_kv: bool = False):
    return common.block_ranges(q_seg, kv_seg, q_len=cfg.seq_len, kv_len=cfg.seq_len,
                               bq=blocks[0], bk=blocks[1], causal=cfg.causal, by_kv=by_kv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Cfg, q, k, v, q_seg, kv_seg):
    return _flash_fwd(cfg, q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(cfg: _Cfg, q, k, v, q_seg, kv_seg):
    s = q.shape[1]
    qt, kt, vt = (_to_kernel_layout(cfg, x) for x in (q, k, v))
    q_col, _, _, kv_row = _seg_layouts(cfg, q_seg, kv_seg)
    ot, lse = _fwd(cfg, _table(cfg, q_seg, kv_seg, cfg.fwd), qt, kt, vt, q_col, kv_row)
    ot, lse = common.name_residuals(ot, lse)
    out = jnp.swapaxes(ot[:, :, :s], 1, 2)
    return out, (qt, kt, vt, ot, lse, q_seg, kv_seg)


def _flash_bwd(cfg: _Cfg, res, dout):
    qt, kt, vt, ot, lse, q_seg, kv_seg = res
    b, s, h, d = dout.shape
    dot_ = _to_kernel_layout(cfg, dout)
    di = jnp.sum(ot.astype(jnp.float32) * dot_.astype(jnp.float32), axis=-1)[:, :, None, :]
    q_col, q_row, kv_col, kv_row = _seg_layouts(cfg, q_seg, kv_seg)
    if cfg.fused is not None:
        tab = _table(cfg, q_seg, kv_seg, cfg.fused)
        dqt, dkt, dvt = _fused_bwd(cfg, tab, qt, kt, vt, dot_, lse, di, q_row, kv_col)
    else:
        tab_dq = _table(cfg, q_seg, kv_seg, cfg.dq)
        tab_dkv = _table(cfg, q_seg, kv_seg, cfg.dkv, by_kv=True)
        dqt = _dq(cfg, tab_dq, qt, kt, vt, dot_, lse, di, q_col, kv_row)
        dkt, dvt = _dkv(cfg, tab_dkv, qt, kt, vt, dot_, lse, di, q_row, kv_col)
    back = lambda x: jnp.swapaxes(x[:, :, :s], 1, 2)
    none = lambda seg: None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)
    return back(dqt), back(dkt), back(dvt), none(q_seg), none(kv_seg)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, causal: bool, segment_ids=None, kv_segment_ids=None,
                    scale: float | None = None, block_sizes: BlockSizes | None = None,
                    interpret=False, fused_backward: bool | None = None) -> jax.Array:
    """Flash attention on TPU (Mosaic). q [B,S,H,D], k/v [B,S,KV,D] -> [B,S,H,D].

    Masking follows `kernels.reference.dot_product_attention`: segment ids (0 = padding) keep
    queries inside their segment, fully masked rows return zeros. `interpret` is passed to
    `pallas_call` (True or `pltpu.InterpretParams()` to run on CPU). `fused_backward`: None
    takes the one-kernel backward where K/V fit in VMEM, False forces the two kernels, True
    insists on the fused one (an error where it does not fit). The fused backward's blocks are
    the largest multiples of 128 that divide the padded length, at most block_q_dkv (queries)
    and block_kv_dkv (keys).
    """
    _, s, h, kvh, _, d = common.check_inputs(q, k, v, segment_ids, kv_segment_ids)
    kv_segment_ids = common.kv_segments(segment_ids, kv_segment_ids)
    has_seg = segment_ids is not None
    blocks = _auto_blocks(s, causal, has_seg) if block_sizes is None else None
    if blocks is None:
        bs = block_sizes or BlockSizes()
        blocks = [common.pick_block(s, getattr(bs, f.name), LANES)
                  for f in dataclasses.fields(bs)]
    cfg = _Cfg(causal=causal, scale=float(d**-0.5 if scale is None else scale), seq_len=s,
               padded_len=common.round_up(s, max(blocks)), groups=h // kvh, has_seg=has_seg,
               interpret=interpret, fwd=(blocks[0], blocks[1]), dkv=(blocks[2], blocks[3]),
               dq=(blocks[4], blocks[5]))
    cfg = dataclasses.replace(cfg, fused=_fused_blocks(cfg, d, q.dtype,
                                                       block_sizes or BlockSizes(),
                                                       fused_backward))
    return _flash(cfg, q, k, v, segment_ids, kv_segment_ids)


def _auto_blocks(s: int, causal: bool, has_seg: bool) -> list[int] | None:
    """(fwd q, kv, dK/dV q, kv, dQ q, kv) for a short sequence: the inner block is the whole
    128-padded sequence, so K/V are read once per head (forward, dQ) and Q/dO once per outer
    kv block (dK/dV), and the padding stays below 128. None: longer, use `BlockSizes()`."""
    whole = common.round_up(s, LANES)
    if whole > (WHOLE_MAX_SKIPPING if causal or has_seg else WHOLE_MAX):
        return None
    outer = max(b for b in range(LANES, min(whole, 512) + 1, LANES)
                if whole % b == 0 and b * whole <= TEMP_ELEMS)
    return [outer, whole, whole, outer, outer, whole]
