"""The step anatomy's HLO walk (FLOPs by trip count, collectives, weight converts) on programs
whose answers are counted by hand, and benchmarks/step_anatomy.py end to end on the tiny model."""

import importlib.util
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mini_internvl_jax.tools.hlo import (
    CHIPS,
    _walk,
    analyze,
    nbytes,
    parse_module,
    scattering_all_reduces,
    trip_count,
)

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _cpu_mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))


def test_scan_flops_and_all_reduce_counted_per_iteration_on_cpu():
    mesh = _cpu_mesh()

    def f(w, x):
        def body(h, wi):
            y = h @ wi
            y = jax.shard_map(lambda a: jax.lax.psum(a, "x"), mesh=mesh, in_specs=P("x"),
                              out_specs=P("x"))(y)
            return y, None

        return jax.lax.scan(body, x, w)[0]

    w = jax.ShapeDtypeStruct((5, 64, 64), jnp.float32, sharding=NamedSharding(mesh, P()))
    x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    with jax.set_mesh(mesh):
        a = analyze(jax.jit(f).lower(w, x).compile().as_text())
    # per device: 5 iterations of [2, 64] @ [64, 64]
    assert a.flops == 5 * 2 * 2 * 64 * 64
    assert a.matmul_flops_by_dtype == {"f32": a.flops}
    assert [lp["trips"] for lp in a.loops] == [5] and a.unknown_trip_counts == 0
    # one psum op, run 5 times, of a float32 [2, 64] shard
    assert a.collectives == {"all-reduce": {"count": 5.0, "bytes": 5 * 2 * 64 * 4, "ops": 1}}


HLO_WITH_FUSED_CONDITION = """
HloModule m

%cmp (p0: s32[], p1: s32[]) -> pred[] {
  %p0 = s32[] parameter(0)
  %p1 = s32[] parameter(1)
  ROOT %lt = pred[] compare(%p0, %p1), direction=LT
}

%cond (t: (s32[], f32[8,16])) -> pred[] {
  %t = (s32[], f32[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(7)
  ROOT %c = pred[] fusion(%i, %n), kind=kLoop, calls=%cmp
}

%body (t.1: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %t.1 = (s32[], f32[8,16]) parameter(0)
  %i.1 = s32[] get-tuple-element(%t.1), index=0
  %h = f32[8,16]{1,0} get-tuple-element(%t.1), index=1
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%h, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %i.2 = s32[] add(%i.1, %one)
  ROOT %r = (s32[], f32[8,16]) tuple(%i.2, %d)
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %z = s32[] constant(0)
  %t.2 = (s32[], f32[8,16]) tuple(%z, %x)
  %loop = (s32[], f32[8,16]) while(%t.2), condition=%cond, body=%body
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_trip_count_from_a_fused_condition_and_byte_sizes():
    comps = parse_module(HLO_WITH_FUSED_CONDITION)
    loop = next(i for i in comps["main"].instrs if i.opcode == "while")
    assert trip_count(loop, comps) == 7
    a = analyze(HLO_WITH_FUSED_CONDITION)
    assert a.flops == 7 * 2 * 8 * 16 * 16
    # the dot reads h (8x16) and w (16x16) and writes 8x16 floats; the add moves 3 ints
    dot = next(k for k in a.kernels if k.instr.opcode == "dot")
    assert (dot.calls, dot.bytes) == (7, 4 * (8 * 16 + 16 * 16 + 8 * 16))
    assert nbytes("(bf16[2,3]{1,0:T(8,128)(2,1)}, s32[], pred[4])") == 12 + 4 + 4


# A scan of 5 steps (bound 5 in its condition) whose body runs one matmul (ViT forward), one
# elementwise fusion (ViT recompute), one Pallas-style custom call with a cost estimate of 1000
# FLOPs (LLM backward) and the counter's add and compare (no metadata: "other"); before the
# loop, XLA prefetches the input into on-chip memory (S(1)): HBM is read, not written.
HLO_HAND_COUNTED = """
HloModule m

%cond (t: (s32[], f32[8,16])) -> pred[] {
  %t = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%double (p0: f32[8,32]) -> f32[8,32] {
  %p0 = f32[8,32]{1,0} parameter(0)
  %two = f32[] constant(2)
  %b = f32[8,32]{1,0} broadcast(%two), dimensions={}
  ROOT %m = f32[8,32]{1,0} multiply(%p0, %b)
}

%body (t.1: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %t.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%t.1), index=0
  %h = f32[8,16]{1,0} get-tuple-element(%t.1), index=1
  %w = f32[16,32]{1,0} constant({...})
  %d = f32[8,32]{1,0} dot(%h, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, @FWD
  %e = f32[8,32]{1,0} fusion(%d), kind=kLoop, calls=%double, @RECOMPUTE
  %k = f32[8,16]{1,0} custom-call(%e, %h), custom_call_target="tpu_custom_call", @CONFIG, @BWD
  %one = s32[] constant(1)
  %i.2 = s32[] add(%i.1, %one)
  ROOT %r = (s32[], f32[8,16]{1,0}) tuple(%i.2, %k)
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %cs = (f32[8,16]{1,0:S(1)}, f32[8,16]{1,0}, u32[]) copy-start(%x)
  %cd = f32[8,16]{1,0:S(1)} copy-done(%cs)
  %z = s32[] constant(0)
  %t.2 = (s32[], f32[8,16]{1,0}) tuple(%z, %cd)
  %loop = (s32[], f32[8,16]{1,0}) while(%t.2), condition=%cond, body=%body
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""
COST = '"cost_estimate": {"flops": "1000", "transcendentals": "0", "bytes_accessed": "3072"}'
for key, text in {
        "@FWD": 'metadata={op_name="jit(step)/jvp(vision_tower)/while/body/dot_general"}',
        "@RECOMPUTE": 'metadata={op_name="jit(step)/transpose(jvp(vision_tower))/while/body/'
                      'checkpoint/rematted_computation/mul"}',
        "@CONFIG": 'backend_config={"custom_call_config": {"body": "TUxJUgA=", ' + COST + '}}',
        "@BWD": 'metadata={op_name="jit(step)/transpose(jvp(llm_layers))/while/body/flash"}',
}.items():
    HLO_HAND_COUNTED = HLO_HAND_COUNTED.replace(key, text)


def test_accounting_by_hand_trip_count_custom_call_and_categories():
    """Every figure counted by hand. Fails if the loop's trip count or the custom call's FLOPs
    are dropped (checked by mutating tools/hlo.py: trip_count -> None, _custom_call_flops ->
    0), if the custom call's bytes are its operands' sizes instead of its estimate's, or if a
    kernel falls outside the categories."""
    a = analyze(HLO_HAND_COUNTED)
    f32 = 4
    dot_flops, dot_bytes = 2 * 8 * 32 * 16, f32 * (8 * 16 + 16 * 32 + 8 * 32)
    mul_bytes = f32 * (8 * 32 + 8 * 32)
    # its estimate: operands e, h and its result (2048 bytes), h read twice more by its grid
    call_bytes = f32 * (8 * 32 + 3 * 8 * 16 + 8 * 16)
    add_bytes = 3 * 4 + (4 + 4 + 1)  # the counter's add; the condition's compare (pred)
    prefetch = f32 * 8 * 16  # read from HBM; the copy lands in on-chip memory
    assert a.loops[0]["trips"] == 5 and a.unknown_trip_counts == 0
    assert a.flops == 5 * (dot_flops + 1000)
    assert a.bytes == 5 * (dot_bytes + mul_bytes + call_bytes + add_bytes) + prefetch
    assert a.bytes_all_spaces == a.bytes + prefetch  # its on-chip destination
    cats = a.categories()
    expect = {"ViT forward": (dot_flops, dot_bytes), "ViT recompute": (0, mul_bytes),
              "LLM layers backward": (1000, call_bytes), "other": (0, add_bytes)}
    for cat, (fl, by) in expect.items():
        assert cats[cat]["gflop"] * 1e9 == 5 * fl, cat
        assert round(cats[cat]["gb"] * 1e9) == 5 * by, cat
    assert round(cats["copies / layout"]["gb"] * 1e9) == prefetch
    assert "from HBM into on-chip" in cats["copies / layout"]["top"][0]["op_name"]
    assert sum(c["kernels"] for c in cats.values()) == len(a.kernels) == 6
    peak, bw = CHIPS["v5e"]
    per_kernel = 5 * (max(dot_flops / peak, dot_bytes / bw) + mul_bytes / bw
                      + max(1000 / peak, call_bytes / bw) + add_bytes / bw) + prefetch / bw
    assert abs(a.roofline(0.0)["v5e"]["per_kernel_s"] - per_kernel) < 1e-15
    assert abs(sum(c["per_kernel_s"]["v5e"] for c in cats.values()) - per_kernel) < 1e-15
    # a kernel without a cost estimate is an error, a runtime helper is not
    with pytest.raises(ValueError, match="carries no cost estimate"):
        analyze(HLO_HAND_COUNTED.replace(", " + COST, ""))
    helper = HLO_HAND_COUNTED.replace('"tpu_custom_call"', '"AsyncCollectiveDone"')
    assert analyze(helper.replace('"cost_estimate"', '"no_estimate"')).flops == 5 * dot_flops


def test_a_buffer_handed_out_is_not_written():
    """TPU's AllocateBuffer (the zeros a scan's stacked residuals start from, all overwritten
    in the loop) moves no bytes; the in-place update into it moves its update."""
    text = """
HloModule m

ENTRY %main (x: f32[8,16]) -> f32[24,8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %buf = f32[24,8,16]{2,1,0} custom-call(), custom_call_target="AllocateBuffer"
  %r = f32[1,8,16]{2,1,0} reshape(%x)
  %z = s32[] constant(0)
  ROOT %u = f32[24,8,16]{2,1,0} dynamic-update-slice(%buf, %r, %z, %z, %z)
}
"""
    a = analyze(text)
    by = {k.instr.name: k.bytes for k in a.kernels}
    assert by["buf"] == 0 and by["u"] == 2 * 4 * 8 * 16 + 3 * 4  # the update in and out
    assert a.flops == 0


HLO_WITH_REDUCE_SCATTER_FUSIONS = """
HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%all-reduce-scatter (in: f32[64,16]) -> f32[16,16] {
  %in = f32[64,16]{1,0} parameter(0)
  %ar = f32[64,16]{1,0} all-reduce(%in), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %pid = u32[] partition-id()
  %c16 = u32[] constant(16)
  %off = u32[] multiply(%pid, %c16)
  %z = u32[] constant(0)
  ROOT %ds = f32[16,16]{1,0} dynamic-slice(%ar, %off, %z), dynamic_slice_sizes={16,16}
}

%all-reduce-scatter.2 (p0: f32[32,8], p1: f32[8,4]) -> (f32[8,8], f32[2,4]) {
  %p0 = f32[32,8]{1,0} parameter(0)
  %p1 = f32[8,4]{1,0} parameter(1)
  %ar2 = (f32[32,8]{1,0}, f32[8,4]{1,0}) all-reduce(%p0, %p1), channel_id=2, to_apply=%add
  %g0 = f32[32,8]{1,0} get-tuple-element(%ar2), index=0
  %g1 = f32[8,4]{1,0} get-tuple-element(%ar2), index=1
  %pid2 = u32[] partition-id()
  %c8 = u32[] constant(8)
  %c2 = u32[] constant(2)
  %o8 = u32[] multiply(%pid2, %c8)
  %o2 = u32[] multiply(%pid2, %c2)
  %z2 = u32[] constant(0)
  %d0 = f32[8,8]{1,0} dynamic-slice(%g0, %o8, %z2), dynamic_slice_sizes={8,8}
  %d1 = f32[2,4]{1,0} dynamic-slice(%g1, %o2, %z2), dynamic_slice_sizes={2,4}
  ROOT %t = (f32[8,8]{1,0}, f32[2,4]{1,0}) tuple(%d0, %d1)
}

ENTRY %main (x: f32[64,16], y: f32[32,8], w: f32[8,4], v: f32[8,16]) -> f32[2,16] {
  %x = f32[64,16]{1,0} parameter(0)
  %y = f32[32,8]{1,0} parameter(1)
  %w = f32[8,4]{1,0} parameter(2)
  %v = f32[8,16]{1,0} parameter(3)
  %f1 = f32[16,16]{1,0} fusion(%x), kind=kCustom, calls=%all-reduce-scatter
  %f2 = (f32[8,8]{1,0}, f32[2,4]{1,0}) fusion(%y, %w), kind=kCustom, calls=%all-reduce-scatter.2
  %ar3 = f32[8,16]{1,0} all-reduce(%v), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
  %pid3 = u32[] partition-id()
  %c2b = u32[] constant(2)
  %o3 = u32[] multiply(%pid3, %c2b)
  %z3 = u32[] constant(0)
  ROOT %d3 = f32[2,16]{1,0} dynamic-slice(%ar3, %o3, %z3), dynamic_slice_sizes={2,16}
}
"""


def test_tpu_reduce_scatter_fusions_count_as_reduce_scatter():
    """TPU emits a reduce-scatter as a custom fusion that all-reduces and keeps its slice (one
    array or a tuple); an all-reduce sliced afterwards by an ordinary kernel moves the whole
    buffer and stays an all-reduce."""
    a = analyze(HLO_WITH_REDUCE_SCATTER_FUSIONS)
    assert a.collectives == {
        "reduce-scatter": {"count": 2.0, "bytes": 4 * (64 * 16 + 32 * 8 + 8 * 4), "ops": 2},
        "all-reduce": {"count": 1.0, "bytes": 4 * 8 * 16, "ops": 1}}


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'jax[tpu]')")
def test_tpu_fsdp_weight_gradient_is_reduce_scattered():
    """The gradient of an FSDP-sharded weight over a batch-sharded input: each chip needs only
    its shard of the sum, and XLA:TPU reduce-scatters the bfloat16 partial gradients (one
    collective over the whole [1024, 512] buffer); asked for a replicated gradient, it
    all-reduces it instead."""
    from jax.sharding import Mesh

    from mini_internvl_jax.train.aot import topology_devices

    mesh = Mesh(np.array(topology_devices("v5e:2x2")), ("x",))

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w.astype(jnp.bfloat16)).astype(jnp.float32))

    fsdp = NamedSharding(mesh, P("x"))
    w = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=fsdp)
    x = jax.ShapeDtypeStruct((64, 1024), jnp.bfloat16, sharding=fsdp)
    grad_bytes = 1024 * 512 * 2
    for out, kind in ((fsdp, "reduce-scatter"), (NamedSharding(mesh, P()), "all-reduce")):
        c = analyze(jax.jit(jax.grad(loss), out_shardings=out).lower(w, x).compile().as_text())
        reductions = {k: v for k, v in c.collectives.items() if k != "all-gather"}
        assert reductions == {kind: {"count": 1.0, "bytes": grad_bytes, "ops": 1}}, kind


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'jax[tpu]')")
def test_tpu_batched_matmuls_and_weight_converts_in_a_scan():
    """TPU writes batched matmuls as dilated convolutions: only real taps may count. A float32
    stacked weight cast to bfloat16 in the scan body is one convert per layer."""
    from jax.sharding import Mesh

    from mini_internvl_jax.train.aot import topology_devices

    mesh = Mesh(np.array(topology_devices("v5e:2x2")), ("x",))

    def attn(q, k):
        s = jnp.einsum("bshd,bthd->bhst", q, k)
        return jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(s, -1), k).sum()

    q = jax.ShapeDtypeStruct((4, 256, 4, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
    a = analyze(jax.jit(attn).lower(q, q).compile().as_text())
    assert a.flops == 2 * (2 * 1 * 4 * 256 * 256 * 64)  # one row and 4 heads per chip
    assert a.matmul_flops_by_dtype == {"bf16": a.flops}

    def layers(w, x):
        def body(carry, _):  # the weight changes every iteration: XLA cannot hoist the cast
            h, wi = carry
            return (jnp.tanh(h @ wi.astype(jnp.bfloat16)), wi * 0.5), None

        return jax.lax.scan(body, (x, w), None, length=6)[0][0].astype(jnp.float32).sum()

    w = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=NamedSharding(mesh, P()))
    x = jax.ShapeDtypeStruct((64, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
    a = analyze(jax.jit(layers).lower(w, x).compile().as_text(), {(512, 512)})
    assert a.weight_converts["count"] == 6
    assert a.weight_converts["bytes"] == 6 * 512 * 512 * (4 + 2)
    assert a.flops == 6 * 2 * 16 * 512 * 512


def _script():
    path = Path(__file__).parents[1] / "benchmarks" / "step_anatomy.py"
    spec = importlib.util.spec_from_file_location("step_anatomy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'jax[tpu]')")
def test_tiny_step_on_tpu_reduces_the_head_gradient_once(tmp_path):
    """tiny-qwen2 (tied head, float32 [64, 512]) with 64 positions in 4 loss chunks, FSDP over
    v5e:2x2: the head gradient is reduce-scattered once per step, not once per chunk."""
    assert _script().main(["--tiny", "--topology", "v5e:2x2", "--loss-chunk", "16",
                           "--dump-hlo", str(tmp_path)]) == 0
    comps = parse_module((tmp_path / "step_tiny-qwen2.hlo.txt").read_text())
    runs = _walk(comps)[0]
    head = [runs[c] for c, i in scattering_all_reduces(comps)
            if comps[c].by_name()[i].shape.startswith("f32[64,512]")]
    assert head == [1.0]


def test_step_anatomy_script_on_the_tiny_model(tmp_path):
    mod = _script()
    out = tmp_path / "anatomy.json"
    assert mod.main(["--tiny", "--topology", "cpu", "--chips", "2", "--attention", "xla",
                     "--json", str(out)]) == 0
    r = json.loads(out.read_text())["results"][0]
    assert r["chips"] == 2 and r["mesh"]["fsdp"] == 2
    # tiny-qwen2 has 2 ViT and 2 LLM layers: every scanned loop runs twice
    assert {lp["trips"] for lp in r["loops"]} == {2} and r["unknown_trip_counts"] == 0
    # full remat recomputes the forward pass: more HLO FLOPs than model FLOPs, but < 2x
    assert 0.4 < r["model_over_hlo_flops"] < 1.0
    assert r["collectives"]["all-gather"]["count"] > 0  # FSDP gathers the weights
    assert r["roofline"]["v5e"]["global_s"] >= r["hlo_flops"] / CHIPS["v5e"][0]
    assert os.path.getsize(out) > 0 and r["top_kernels"]


@pytest.mark.slow  # four CPU compiles of the step (811 s on a loaded 2-core machine); the
# one-compile case (room for no remat) runs in test_train_aot's tiny v5e:2x2 compile
def test_remat_auto_takes_the_least_recomputation_that_fits():
    """tiny-qwen2 on two CPU devices: with room, no remat (one compile); with a budget just
    under that peak, the next policy whose compiled peak fits; with none, a clear error."""
    from mini_internvl_jax.configlib import ConfigError
    from mini_internvl_jax.sharding import make_mesh
    from mini_internvl_jax.train.aot import choose_remat, remat_label
    from mini_internvl_jax.train.config import train_config_from_dict

    cfg = train_config_from_dict({
        "model": "tiny-qwen2", "batch_size": 4, "seq_len": 64, "max_tiles": 4,
        "synthetic": {"tiles_per_sample": 1}, "packed": False,
        "compute": {"attention_impl": "xla", "remat": "auto"},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1}})
    mesh = make_mesh(1, -1, 1, jax.devices("cpu")[:2])
    chosen, *_, tried = choose_remat(cfg, mesh, budget=float("inf"))
    assert chosen.compute.remat == "none" and [p for p, *_ in tried] == ["none"]
    budget = tried[0][1] - 1
    chosen, *_, tried = choose_remat(cfg, mesh, budget=budget)
    assert [p for p, *_ in tried][0] == "none"
    assert remat_label(chosen.compute.remat, chosen.compute.remat_vision) == tried[-1][0]
    assert tried[-1][1] <= budget < min(b for _, b, _ in tried[:-1])
    with pytest.raises(ConfigError, match="remat auto: no policy fits 0.00 GiB per device"):
        choose_remat(cfg, mesh, budget=1.0)
