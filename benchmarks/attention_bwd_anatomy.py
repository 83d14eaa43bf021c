"""Attention backward anatomy: the TPU flash attention's forward + backward at the two W1 shapes,
compiled for v5e:2x2 on this (CPU) machine, with the two-kernel backward (dQ; dK/dV) and the
fused one (dQ, dK, dV in one kernel, K/V resident in VMEM) side by side.

Per chip (FSDP over the 4 chips, batch sharded): ViT 6 tiles x 1025 tokens, 16 heads, non-causal;
Qwen2 LLM 1 x 4096 tokens, 14 query / 2 kv heads, causal with packed segment ids; head dim 64,
bf16. For each Pallas kernel and for the rest (XLA's transposes, pads, the delta reduction): its
FLOPs and HBM bytes (a kernel's from its `pl.CostEstimate`: the blocks its pipeline copies) and
the v5e per-kernel roofline max(FLOPs / 197e12, bytes / 819e9), per layer and for the 24 layers
of each tower. The kernels are FLOP-bound. In this attention-only program XLA keeps some arrays
in VMEM (S(1), no HBM bytes), and which ones differs between the two variants, so the "other"
bytes move a little for reasons that a full step (less VMEM to spare) would not share.

    python benchmarks/attention_bwd_anatomy.py
    python benchmarks/attention_bwd_anatomy.py --json benchmarks/results/attention_bwd_fused.json

Needs libtpu; nothing runs on a TPU. Each compile takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYERS = 24
SHAPES = {
    # name: global batch (4 chips), seq, heads, kv heads, causal, segment ids
    "vit": (24, 1025, 16, 16, False, False),
    "llm": (4, 4096, 14, 2, True, True),
}


def compile_text(name: str, fused: bool) -> tuple[str, float]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mini_internvl_jax.kernels import AttentionMask, dispatch, flash_tpu
    from mini_internvl_jax.train.aot import topology_devices

    b, s, h, kvh, causal, seg = SHAPES[name]
    devs = topology_devices("v5e:2x2")
    mesh = jax.make_mesh((4,), ("fsdp",), devices=devs, axis_types=(jax.sharding.AxisType.Auto,))

    def loss(q, k, v, ids):
        out = dispatch.attention(q, k, v, AttentionMask(causal, ids if seg else None),
                                 impl="auto")
        return jnp.sum(out.astype(jnp.float32))

    rows = NamedSharding(mesh, P("fsdp"))
    args = (jax.ShapeDtypeStruct((b, s, h, 64), jnp.bfloat16, sharding=rows),
            *[jax.ShapeDtypeStruct((b, s, kvh, 64), jnp.bfloat16, sharding=rows)] * 2,
            jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=rows))
    budget = flash_tpu.FUSED_VMEM_BUDGET
    flash_tpu.FUSED_VMEM_BUDGET = budget if fused else -1  # -1: no length fits, two kernels
    try:
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
        return compiled.as_text(), time.perf_counter() - t0
    finally:
        flash_tpu.FUSED_VMEM_BUDGET = budget


def anatomy(text: str) -> dict:
    from mini_internvl_jax.tools.hlo import CHIPS, analyze

    peak, bw = CHIPS["v5e"]
    rows: dict[str, dict] = {}
    for k in analyze(text).kernels:
        m = re.search(r"flash_(?:fwd|bwd_\w+?)(?=[./\"]|$)", k.op_name)
        key = m.group(0) if m and k.instr.opcode == "custom-call" else "other (XLA)"
        r = rows.setdefault(key, {"calls": 0.0, "gflop": 0.0, "mb": 0.0, "v5e_ms": 0.0})
        r["calls"] += k.calls
        r["gflop"] += k.calls * k.flops / 1e9
        r["mb"] += k.calls * k.bytes / 1e6
        r["v5e_ms"] += k.calls * max(k.flops / peak, k.bytes / bw) * 1e3
    fields = ("calls", "gflop", "mb", "v5e_ms")
    rows["backward kernels"] = {f: sum(r[f] for n, r in rows.items() if "bwd" in n)
                                for f in fields}
    rows["total"] = {f: sum(r[f] for n, r in rows.items() if n != "backward kernels")
                     for f in fields}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    results = []
    print(f"{'shape':5} {'backward':10} {'kernel':16} {'GFLOP':>8} {'MB':>8} {'v5e ms':>8} "
          f"{'x' + str(LAYERS) + ' ms':>8}")
    for name in SHAPES:
        for fused in (False, True):
            text, seconds = compile_text(name, fused)
            rows = anatomy(text)
            label = "fused" if fused else "two-kernel"
            for kernel, r in rows.items():
                print(f"{name:5} {label:10} {kernel:16} {r['gflop']:8.2f} {r['mb']:8.1f} "
                      f"{r['v5e_ms']:8.3f} {r['v5e_ms'] * LAYERS:8.2f}")
            results.append({"shape": name, "backward": label, "compile_s": round(seconds, 1),
                            "per_layer": rows, "v5e_ms_per_step": {
                                k: rows[k]["v5e_ms"] * LAYERS for k in ("backward kernels",
                                                                        "total")}})
    for name in SHAPES:
        for part in ("backward kernels", "total"):
            two, fused = (r["v5e_ms_per_step"][part] for r in results if r["shape"] == name)
            print(f"{name}: {part}, {LAYERS} layers, v5e per-kernel roofline {two:.2f} -> "
                  f"{fused:.2f} ms per step ({two - fused:.2f} ms saved)")
    if a.json:
        from mini_internvl_jax.fileio import write_atomic

        write_atomic(a.json, json.dumps({"shapes": SHAPES, "layers": LAYERS, "chip": "v5e",
                                         "topology": "v5e:2x2", "results": results},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
