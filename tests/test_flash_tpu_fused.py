"""The fused TPU flash backward (one kernel for dQ, dK and dV with K/V resident in VMEM).

Gradients from the Pallas interpreter against jax.grad of the dense reference and against the
two-kernel backward; which backward each shape takes (the jaxpr names the Pallas kernels); and
an ahead-of-time compile for v5e at the two W1 attention shapes, which runs Mosaic's checks
(layouts, scoped VMEM) on the kernel.
"""

import importlib.util
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from mini_internvl_jax.kernels import AttentionMask, dot_product_attention, flash_tpu
from tests.test_kernels import (
    TPU_BLOCKS,
    assert_close,
    make_inputs,
    out_and_grads,
    row_segments,
    tpu_kernel_costs,
)


def kernels_in(fn, *args) -> set[str]:
    """Names of the Pallas kernels that `fn` traces to."""
    return set(re.findall(r"\b(flash_(?:fwd|bwd_\w+)) = \{", str(jax.make_jaxpr(fn)(*args))))


def flash(fused, **kw):
    return lambda q, k, v: flash_tpu.flash_attention(q, k, v, block_sizes=TPU_BLOCKS,
                                                     fused_backward=fused, **kw)


CASES = [
    # b, s, h, kvh, causal, segments, dtype, interpret; the two-kernel backward is run (and
    # compared) in the float32 causal case only, to keep the suite fast
    # 300 tokens in 128-blocks: 3 query blocks x 3 kv sub-blocks, a padded tail
    # (TPU memory-model interpreter: stricter about scratch and DMA use)
    pytest.param(1, 300, 1, 1, False, 0, jnp.float32, pltpu.InterpretParams(), id="full300"),
    # GQA 2; row 1 all padding, kv ids hiding keys 5-19 of row 0
    pytest.param(2, 300, 4, 2, True, 3, jnp.float32, True, id="causal-seg3-gqa2"),
    pytest.param(1, 300, 4, 2, True, 4, jnp.bfloat16, True, id="causal-seg4-gqa2-bf16"),
]


@pytest.mark.parametrize("b,s,h,kvh,causal,nseg,dtype,interpret", CASES)
def test_fused_backward_matches_reference_and_two_kernels(b, s, h, kvh, causal, nseg, dtype,
                                                          interpret):
    q, k, v, do = make_inputs(b, s, h, kvh, 64, dtype, seed=11)
    seg, kv_seg = row_segments(b, s, nseg, seed=11) if nseg else (None, None)
    kw = dict(causal=causal, segment_ids=seg, kv_segment_ids=kv_seg, interpret=interpret)
    grads = lambda fused: jax.jit(lambda *a: out_and_grads(flash(fused, **kw), *a))
    assert kernels_in(grads(None), q, k, v, do) == {"flash_fwd", "flash_bwd_fused"}
    fused = grads(None)(q, k, v, do)
    want = out_and_grads(lambda q, k, v: dot_product_attention(
        q, k, v, AttentionMask(causal, seg, kv_seg)), q, k, v, do)
    assert_close(fused, want, dtype, "fused vs dense")
    if causal and dtype == jnp.float32:
        assert kernels_in(grads(False), q, k, v, do) == {"flash_fwd", "flash_bwd_dq",
                                                         "flash_bwd_dkv"}
        # the same sums in another order: equal to float32 rounding
        assert_close(fused, grads(False)(q, k, v, do), dtype, "fused vs two kernels")


def test_fused_cost_estimate_counts_what_the_pipeline_copies():
    """5 matmuls per visited block pair; bytes as the pipeline copies them, counted by hand:
    non-causal 1025 tokens (1152 padded, 384-blocks), 2 query heads on 1 kv head, float32.
    Per query block Q, dO, lse, delta in and dQ out; K, V in and dK, dV out once."""
    whole, whole_row = 1152 * 64 * 4, 1152 * 4
    cost = tpu_kernel_costs(1025, 2, 1, False, None, fused=True)["flash_bwd_fused"]
    assert cost.flops == 2 * 9 * 5 * 2 * 384 * 384 * 64
    assert cost.bytes_accessed == (2 * (3 * whole + 2 * whole_row) + 4 * whole + 3 * 4 * 4)


W1 = [
    # name, b, s, h, kvh, causal, segments: a W1 step's per-chip rows on a 2-way data mesh
    ("vit", 12, 1025, 16, 16, False, False),
    ("llm", 2, 4096, 14, 2, True, True),
]


def abstract_args(b, s, h, kvh, dtype=jnp.bfloat16):
    return (jax.ShapeDtypeStruct((b, s, h, 64), dtype),
            *[jax.ShapeDtypeStruct((b, s, kvh, 64), dtype)] * 2,
            jax.ShapeDtypeStruct((b, s), jnp.int32))


def grad_fn(causal, seg, **kw):
    def loss(q, k, v, ids):
        out = flash_tpu.flash_attention(q, k, v, causal=causal,
                                        segment_ids=ids if seg else None, **kw)
        return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def test_backward_choice_by_length():
    """Both W1 shapes take the fused backward; a sequence whose K/V do not fit in VMEM takes
    the two kernels (and refuses an explicit fused_backward=True)."""
    for _, b, s, h, kvh, causal, seg in W1:
        assert "flash_bwd_fused" in kernels_in(grad_fn(causal, seg), *abstract_args(b, s, h, kvh))
    long = abstract_args(1, 32768, 4, 2)
    assert kernels_in(grad_fn(True, True), *long) == {"flash_fwd", "flash_bwd_dq",
                                                      "flash_bwd_dkv"}
    with pytest.raises(ValueError, match="fused backward needs"):
        jax.make_jaxpr(grad_fn(True, True, fused_backward=True))(*long)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_fused_backward_compiles_for_v5e_at_w1_shapes(monkeypatch):
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from mini_internvl_jax.kernels import dispatch
    from mini_internvl_jax.tools.hlo import analyze

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    mesh = Mesh(np.array(topo.devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
    act = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    for name, b, s, h, kvh, causal, seg in W1:
        def loss(q, k, v, ids, causal=causal, seg=seg):
            mask = AttentionMask(causal, ids if seg else None)
            return jnp.sum(dispatch.attention(q, k, v, mask, impl="auto").astype(jnp.float32))

        args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=act if x.ndim == 4 else rows)
                for x in abstract_args(b, s, h, kvh)]
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile(
            ).as_text()
        print(f"{name}: compiled for v5e:2x2 in {time.perf_counter() - t0:.1f} s")
        # forward + the fused backward; no dQ / dK/dV kernels
        assert hlo.count('custom_call_target="tpu_custom_call"') == 2, name
        assert "flash_bwd_fused" in hlo and "flash_bwd_dkv" not in hlo, name
        # Its cost estimate: 5 matmuls of 2 * 384 * 384 * 64 FLOPs (ViT: 1152 padded tokens
        # in 384-blocks, all 9 pairs visible) or 2 * 512 * 512 * 64 (LLM: 4096 causal tokens
        # in 512-blocks, 36 pairs), per head and row on a chip (data 2 x tensor 2).
        per_chip = {"vit": 6 * 8 * 9 * 384 * 384, "llm": 1 * 7 * 36 * 512 * 512}[name]
        fused = [k for k in analyze(hlo).kernels
                 if k.instr.opcode == "custom-call" and "flash_bwd_fused" in k.instr.attrs]
        assert [k.flops for k in fused] == [2 * 5 * 64 * per_chip], name
    # The two-kernel backward (what longer sequences take) still compiles: here the LLM shape
    # with no VMEM budget for the fused one.
    monkeypatch.setattr(flash_tpu, "FUSED_VMEM_BUDGET", -1)
    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile(
        ).as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 3
    assert "flash_bwd_dq" in hlo and "flash_bwd_dkv" in hlo and "flash_bwd_fused" not in hlo
