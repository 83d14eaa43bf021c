"""Flash-attention kernels (Pallas interpreter on CPU) against the dense reference.

Both kernels are checked on the forward output and all three gradients: the TPU kernel
(Mosaic flavour, run by the Pallas interpreter) and the GPU kernel (Triton flavour,
`interpret=True`). Small blocks make short sequences span several blocks, so block skipping,
mask-free blocks and the ragged tail are all exercised; `tpu-auto` cases run the TPU kernel with
its own blocks, whose inner side spans the whole sequence at these lengths.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType

from mini_internvl_jax.kernels import (
    AttentionMask,
    common,
    dispatch,
    dot_product_attention,
    flash_gpu,
    flash_tpu,
)

# dK/dV query blocks larger than dQ's: the dK/dV kernel then reads rows the dQ kernel never
# wrote (delta past the end), which must stay masked.
GPU_BLOCKS = flash_gpu.BlockSizes(block_q=32, block_kv=16, block_q_dkv=64, block_kv_dkv=32,
                                  block_q_dq=32, block_kv_dq=16)
TPU_BLOCKS = flash_tpu.BlockSizes(*(128,) * 6)


def run_kernel(kernel, q, k, v, *, causal, seg=None, kv_seg=None, interpret=True):
    if kernel == "gpu":
        return flash_gpu.flash_attention(q, k, v, causal=causal, segment_ids=seg,
                                         kv_segment_ids=kv_seg, block_sizes=GPU_BLOCKS,
                                         interpret=True)
    return flash_tpu.flash_attention(q, k, v, causal=causal, segment_ids=seg,
                                     kv_segment_ids=kv_seg, interpret=interpret,
                                     block_sizes=None if kernel == "tpu-auto" else TPU_BLOCKS)


def make_inputs(b, s, h, kvh, d, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, kvh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, kvh, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, s, h, d), jnp.float32).astype(dtype)
    return q, k, v, do


def packed_segments(b, s, n, seed=0):
    """n segments of random lengths per row, then ~10% padding (id 0)."""
    rng = np.random.RandomState(seed)
    valid = s - max(1, s // 10)
    seg = np.zeros((b, s), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, valid), n - 1, replace=False))
        seg[r, :valid] = np.searchsorted(cuts, np.arange(valid), side="right") + 1
    return jnp.asarray(seg)


def row_segments(b, s, nseg, seed=0):
    """(query ids, kv ids) of `nseg` packed segments per row; with two rows or more, row 1 is
    pure padding (zeros out, finite grads) and the kv ids differ from the query ids (keys
    5-19 of row 0 hidden from everyone)."""
    seg = np.array(packed_segments(b, s, nseg, seed=seed))
    kv_seg = None
    if b > 1:
        seg[1] = 0
        kv_seg = seg.copy()
        kv_seg[0, 5:20] = 0
        kv_seg = jnp.asarray(kv_seg)
    return jnp.asarray(seg), kv_seg


def out_and_grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


def assert_close(got, want, dtype, what=""):
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.all(np.isfinite(a)), f"{what} {name}: non-finite values"
        err = np.max(np.abs(a - r)) / max(np.max(np.abs(r)), 1e-30)
        assert err <= tol, f"{what} {name}: relative error {err:.2e} > {tol:.0e}"


CASES = [
    # b, s, h, kvh, d, causal, segments, dtype
    pytest.param(1, 1025, 1, 1, 64, False, 0, jnp.float32, id="vit1025"),
    pytest.param(2, 77, 4, 2, 128, True, 0, jnp.float32, id="causal77-gqa2-d128"),
    pytest.param(1, 77, 7, 1, 64, True, 3, jnp.float32, id="seg3-gqa7"),
    pytest.param(2, 130, 2, 2, 96, False, 2, jnp.bfloat16, id="seg2-d96-bf16-padrow"),
    pytest.param(1, 300, 4, 1, 64, True, 4, jnp.bfloat16, id="seg4-gqa4-bf16"),
]
# The TPU kernel's own blocks: at 1025 one 1152 inner block and three 384 outer blocks; at 600
# (causal, segments) one 640 inner block and five 128 outer blocks; at 256 one block, unpadded
# (no mask at all).
AUTO_CASES = [
    pytest.param(1, 1025, 2, 1, 64, False, 0, jnp.float32, id="vit1025-gqa2"),
    pytest.param(1, 256, 2, 2, 64, False, 0, jnp.float32, id="full256"),
    pytest.param(2, 600, 2, 1, 64, True, 3, jnp.bfloat16, id="seg3-gqa2-bf16-padrow"),
]
KERNEL_CASES = [pytest.param(kernel, *c.values, id=f"{c.id}-{kernel}")
                for c in CASES for kernel in ("tpu", "gpu")]
KERNEL_CASES += [pytest.param("tpu-auto", *c.values, id=f"{c.id}-tpu-auto") for c in AUTO_CASES]


@pytest.mark.parametrize("kernel,b,s,h,kvh,d,causal,nseg,dtype", KERNEL_CASES)
def test_matches_dense_reference(kernel, b, s, h, kvh, d, causal, nseg, dtype):
    q, k, v, do = make_inputs(b, s, h, kvh, d, dtype)
    seg, kv_seg = row_segments(b, s, nseg) if nseg else (None, None)
    got = jax.jit(lambda *a: out_and_grads(lambda q, k, v: run_kernel(
        kernel, q, k, v, causal=causal, seg=seg, kv_seg=kv_seg), *a))(q, k, v, do)
    want = out_and_grads(lambda q, k, v: dot_product_attention(
        q, k, v, AttentionMask(causal, seg, kv_seg)), q, k, v, do)
    assert_close(got, want, dtype, kernel)
    if kv_seg is not None:
        assert np.all(np.asarray(got[0][1]) == 0.0)


@pytest.mark.parametrize("causal,h,kvh,offset", [(False, 4, 4, None), (True, 6, 2, None),
                                                 (True, 4, 1, 5)],
                         ids=["full", "causal-gqa3", "decode-offset5"])
def test_reference_matches_jax_nn_dot_product_attention(causal, h, kvh, offset):
    """The dense reference against JAX's own XLA attention (no segments). A decode step's
    offset causal mask is built here by hand (np.tril) and passed to jax.nn explicitly."""
    q, k, v, _ = make_inputs(2, 12, h, kvh, 64, jnp.float32, seed=7)
    if offset is None:
        got = dot_product_attention(q, k, v, AttentionMask(causal=causal))
        want = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    else:
        q = q[:, offset:offset + 3]
        got = dot_product_attention(q, k, v, AttentionMask(causal=True, q_offset=offset))
        visible = np.tril(np.ones((3, 12), bool), k=offset)
        want = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(visible)[None, None],
                                            implementation="xla")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_attention_mask_materialize_and_pytree():
    seg = jnp.asarray([[1, 1, 2, 0]], jnp.int32)
    kv = jnp.asarray([[1, 2, 2, 2, 0, 1]], jnp.int32)
    mask = AttentionMask(causal=True, segment_ids=seg, kv_segment_ids=kv, q_offset=2)
    # query i sits at causal index 2 + i; sees key j iff same non-zero segment and j <= 2 + i
    want = np.array([[1, 0, 0, 0, 0, 0],
                     [1, 0, 0, 0, 0, 0],
                     [0, 1, 1, 1, 0, 0],
                     [0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask.materialize(1, 4, 6)[0], want)
    # key ids only count together with query ids; no segments and not causal: no mask at all
    assert AttentionMask(causal=False, kv_segment_ids=kv).key_segment_ids is None
    assert AttentionMask(causal=False).materialize(1, 4, 6) is None
    # arrays are leaves, `causal` is static: a jitted function sees it as a Python bool
    assert len(jax.tree.leaves(mask)) == 3
    assert jax.jit(lambda m: jnp.asarray(m.causal))(mask)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_packed_equals_each_segment_alone(kernel):
    bounds = [(0, 56), (56, 112), (112, 168)]  # then 8 tokens of padding
    s = 176
    q, k, v, do = make_inputs(1, s, 4, 2, 64, jnp.float32, seed=2)
    seg = np.zeros((1, s), np.int32)
    for n, (a, e) in enumerate(bounds):
        seg[0, a:e] = n + 1
    seg = jnp.asarray(seg)
    grads = jax.jit(lambda *a, seg: out_and_grads(
        lambda q, k, v: run_kernel(kernel, q, k, v, causal=True, seg=seg), *a))
    packed = grads(q, k, v, do, seg=seg)
    for a, e in bounds:
        alone = grads(*(x[:, a:e] for x in (q, k, v, do)), seg=None)
        assert_close([x[:, a:e] for x in packed], alone, jnp.float32, f"{kernel} [{a}:{e}]")
    for x in packed:
        assert np.all(np.asarray(x[:, 168:]) == 0.0)


def test_tpu_kernel_under_tpu_interpret_params():
    """The TPU-memory-model interpreter (stricter about scratch and DMA use) agrees too."""
    q, k, v, do = make_inputs(1, 130, 2, 1, 64, jnp.float32, seed=3)
    seg = packed_segments(1, 130, 2, seed=3)
    got = out_and_grads(lambda q, k, v: run_kernel("tpu", q, k, v, causal=True, seg=seg,
                                                   interpret=pltpu.InterpretParams()),
                        q, k, v, do)
    want = out_and_grads(lambda q, k, v: dot_product_attention(q, k, v,
                                                               AttentionMask(True, seg)),
                         q, k, v, do)
    assert_close(got, want, jnp.float32, "tpu/InterpretParams")


def test_block_ranges_skip_empty_blocks():
    seg = jnp.asarray(np.repeat([1, 2, 0], [40, 40, 48])[None].astype(np.int32))
    tab = np.asarray(common.block_ranges(seg, seg, q_len=128, kv_len=128, bq=32, bk=32,
                                         causal=False))
    # q block 0 (ids 1) sees kv blocks 0-1; block 1 (ids 1,2) 0-2; block 2 (ids 2) 1-2;
    # block 3 (padding) nothing. Only block 0 x kv block 0 is one shared segment.
    np.testing.assert_array_equal(tab[0, :, :2], [[0, 2], [0, 3], [1, 3], [0, 0]])
    np.testing.assert_array_equal(tab[0, 0, 2:], [0, 1])
    causal = common.block_ranges(None, None, q_len=100, kv_len=100, bq=32, bk=16, causal=True)
    # q block 1 (rows 32-63): kv blocks 0-3 visible, 0-1 entirely below the diagonal.
    np.testing.assert_array_equal(causal[0, 1], [0, 4, 0, 2])


def tpu_kernel_costs(s, h, kvh, causal, block_sizes, fused=False):
    """{kernel name: pl.CostEstimate} of the TPU pallas_calls for one row of float32
    [s, h, 64] (traced only: nothing runs); the two-kernel backward unless `fused`."""
    q = jax.ShapeDtypeStruct((1, s, h, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, s, kvh, 64), jnp.float32)
    loss = lambda q, k, v: jnp.sum(flash_tpu.flash_attention(
        q, k, v, causal=causal, block_sizes=block_sizes, interpret=True,
        fused_backward=None if fused else False))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, kv, kv)
    return {str(e.params["name"]): e.params["cost_estimate"] for e in jaxpr.jaxpr.eqns
            if e.primitive.name == "pallas_call"}


def test_tpu_cost_estimate_counts_the_copies_the_pipeline_makes():
    """The bytes each kernel reports are the blocks the Pallas pipeline copies: a block is
    fetched again whenever its index changes between consecutive grid steps. Counted by hand."""
    f32 = 4
    blk, row = 128 * 64 * f32, 128 * f32  # a [128, 64] block, a [1, 128] lse block
    # Causal, 384 tokens in 128-blocks, 2 heads. Query block 0 visits kv block 0; block 1 finds
    # kv block 0 still there and fetches 1; block 2 goes back to 0, then 1 and 2: K and V are
    # copied 1 + 1 + 3 = 5 times per head (3 would be each block once). Q, O, lse: once.
    fwd = tpu_kernel_costs(384, 2, 2, True, TPU_BLOCKS)["flash_fwd"]
    table = 3 * 4 * 4  # scalar-prefetched (lo, hi, flo, fhi) per query block, int32
    assert fwd.bytes_accessed == 2 * (3 * blk + 2 * 5 * blk + 3 * blk + 3 * row) + table
    # Non-causal 1025 tokens, own blocks: 1152-row inner blocks, 384-row outer blocks; 2 query
    # heads sharing 1 kv head.
    assert flash_tpu._auto_blocks(1025, False, False) == [384, 1152, 1152, 384, 384, 1152]
    costs = tpu_kernel_costs(1025, 2, 1, False, None)
    whole, whole_row, outer = 1152 * 64 * f32, 1152 * f32, 384 * 64 * f32
    # forward: K and V once in all (both query heads read kv head 0), Q and O once per head
    assert costs["flash_fwd"].bytes_accessed == (2 * 2 * whole + 2 * whole + 2 * whole_row
                                                 + 3 * 4 * 4)
    # dK/dV: per kv block (3) and query head (2), Q, dO, lse and delta are copied again;
    # K, V in and dK, dV out once per kv block.
    assert costs["flash_bwd_dkv"].bytes_accessed == (3 * 2 * (2 * whole + 2 * whole_row)
                                                     + 4 * 3 * outer + 3 * 4 * 4)
    # the LLM's long causal packed sequences keep BlockSizes() (512-blocks)
    assert flash_tpu._auto_blocks(4096, True, True) is None


# ----------------------------------------------------------------------------- dispatch


def test_dispatch_on_cpu():
    q, k, v, _ = make_inputs(1, 40, 4, 2, 64, jnp.float32, seed=4)
    seg = packed_segments(1, 40, 2, seed=4)
    packed = AttentionMask(causal=True, segment_ids=seg)
    ref = dot_product_attention(q, k, v, packed)
    for impl in ("xla", "auto", "pallas"):
        out = jax.jit(lambda q, k, v, impl=impl: dispatch.attention(
            q, k, v, packed, impl=impl))(q, k, v)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, err_msg=impl)
    # decode against a cache (q_offset, S != T) falls back to the dense path
    q1 = q[:, 30:33]
    decode = AttentionMask(causal=True, q_offset=30)
    out = jax.jit(lambda q, k, v: dispatch.attention(q, k, v, decode, impl="pallas"))(q1, k, v)
    np.testing.assert_allclose(out, dot_product_attention(q1, k, v, decode), atol=1e-6)
    with pytest.raises(ValueError, match="packed segments"):
        dispatch.attention(q, k, v, packed, impl="cudnn")
    with pytest.raises(ValueError, match="needs a GPU"):
        dispatch.attention(q, k, v, AttentionMask(causal=True), impl="cudnn")
    with pytest.raises(ValueError, match="not one of"):
        dispatch.attention(q, k, v, AttentionMask(causal=True), impl="flash")


def test_resolve_impl():
    r = lambda platform, seg=False, dtype=jnp.bfloat16, s=4096, d=64: dispatch.resolve_impl(
        "auto", platform=platform, has_segments=seg, dtype=dtype, seq_len=s, head_dim=d)
    assert r("tpu") == "pallas" and r("tpu", seg=True) == "pallas"
    assert r("gpu") == "cudnn"
    assert r("gpu", seg=True) == "pallas"
    assert r("gpu", dtype=jnp.float32) == "pallas"
    assert r("gpu", s=1025) == "pallas"
    assert r("cpu") == "xla"
    # inputs our kernels do not take fall back to the exact dense path, never an error
    assert r("tpu", d=16) == "xla" and r("tpu", dtype=jnp.float16) == "xla"
    assert r("gpu", seg=True, d=80) == "xla" and r("gpu", dtype=jnp.float16) == "cudnn"
    assert dispatch.resolve_impl("pallas", platform="cpu", has_segments=True,
                                 dtype=jnp.float32, seq_len=8) == "pallas"


def test_bad_inputs_raise():
    q, k, v, _ = make_inputs(1, 16, 4, 2, 64, jnp.float32)
    for kernel in (flash_gpu, flash_tpu):
        with pytest.raises(ValueError, match="head dim 80"):
            kernel.flash_attention(q[..., :80].repeat(2, -1)[..., :80],
                                   k.repeat(2, -1)[..., :80], v.repeat(2, -1)[..., :80],
                                   causal=True)
        with pytest.raises(ValueError, match="not a multiple"):
            kernel.flash_attention(q[:, :, :3], k, v, causal=True)
        with pytest.raises(ValueError, match="S == T"):
            kernel.flash_attention(q[:, :8], k, v, causal=True)
    with pytest.raises(ValueError, match="power of two"):
        flash_tpu.BlockSizes(block_q=64)
    with pytest.raises(ValueError, match="power of two"):
        flash_gpu.BlockSizes(block_kv=48)


@pytest.mark.parametrize("mesh_shape,kvh,axis_type",
                         [((2, 2, 2), 2, AxisType.Auto), ((2, 1, 4), 2, AxisType.Explicit)],
                         ids=["kv-sharded", "kv-repeated-explicit"])
def test_pallas_under_mesh_runs_in_shard_map(mesh_shape, kvh, axis_type):
    """Batch over data/fsdp, heads over tensor; KV heads that tensor does not divide are
    repeated per shard. Values and gradients match the unsharded reference."""
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3)
    q, k, v, do = make_inputs(4, 24, 4, kvh, 64, jnp.float32, seed=5)
    seg = packed_segments(4, 24, 2, seed=5)
    fn = lambda impl: (lambda q, k, v: dispatch.attention(q, k, v, AttentionMask(True, seg),
                                                          impl=impl))
    want = out_and_grads(fn("xla"), q, k, v, do)
    with jax.set_mesh(mesh):
        step = jax.jit(lambda *a: out_and_grads(fn("pallas"), *a))
        assert "shard_map" in str(jax.make_jaxpr(step)(q, k, v, do))
        got = step(q, k, v, do)
    assert_close(got, want, jnp.float32, f"mesh {mesh_shape}")


def test_benchmark_script_runs_small(tmp_path, monkeypatch):
    """benchmarks/attention.py on CPU: tiny shapes through the interpreter, table + JSON."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "attention.py"
    spec = importlib.util.spec_from_file_location("attention_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look the module up
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--small", "--impls", "cudnn,ours", "--shapes", "vit", "--iters", "1",
                "--warmup", "0", "--out", str(out)])
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["ours"]["fwd_bwd_ms"] > 0 and rows["ours"]["max_abs_err"] < 2e-2
    assert rows["cudnn"]["error"].startswith("n/a")
