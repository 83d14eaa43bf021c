"""Attention anatomy: the TPU flash kernels alone (forward + backward), compiled for a TPU
topology on this (CPU) machine, with their FLOPs, HBM bytes and per-kernel v5e roofline.

Each shape runs `jax.value_and_grad` of a sum through `kernels.dispatch.attention` under a
v5e:2x2 mesh with fsdp=4 (batch split over the 4 chips, heads whole), at the W1 shapes per
chip:

  * vit: 6 tiles x 1025 tokens x 16 heads x 64, bf16, non-causal (global batch 24 tiles);
  * llm: the 1B decoder, 1 x 4096 tokens, 14 query / 2 kv heads x 64, bf16, causal, packed
    segment ids (global batch 4).

Two block choices side by side in one run: `before` = `BlockSizes()` (the choice every length
got before `_auto_blocks`: for 1025 tokens 128-blocks), `after` = the kernel's own choice. Bytes
are given twice: `copies` = the kernel's cost estimate (the blocks the Pallas pipeline copies,
`flash_tpu._dma_bytes`), `once` = every operand and result counted once (the estimate the
kernel carried before, which undercounts re-read blocks). For the LLM both choices are the same
blocks: only the accounting differs. Roofline per kernel: max(FLOPs / peak, bytes / HBM
bandwidth) on a v5e (tools/hlo.CHIPS).

    python benchmarks/vit_attention_anatomy.py --json benchmarks/results/vit_attention_anatomy.json
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

SHAPES = {
    # global batch (fsdp=4: a quarter per chip), seq, heads, kv heads, head dim, causal, segments
    "vit": (24, 1025, 16, 16, 64, False, False),
    "llm": (4, 4096, 14, 2, 64, True, True),
}
_BYTES = re.compile(r'"bytes_accessed"\s*:\s*"?(\d+)')


def compile_attention(shape: str, block_sizes, mesh) -> str:
    """Optimized HLO of value_and_grad(sum(attention)) for one shape and block choice."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mini_internvl_jax.kernels import AttentionMask, dispatch

    b, s, h, kvh, d, causal, seg = SHAPES[shape]

    def loss(q, k, v, segment_ids):
        mask = AttentionMask(causal, segment_ids if seg else None)
        out = dispatch.attention(q, k, v, mask, impl="pallas", block_sizes=block_sizes)
        return jnp.sum(out.astype(jnp.float32))

    act = NamedSharding(mesh, P("fsdp"))
    args = (jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16, sharding=act),
            jax.ShapeDtypeStruct((b, s, kvh, d), jnp.bfloat16, sharding=act),
            jax.ShapeDtypeStruct((b, s, kvh, d), jnp.bfloat16, sharding=act),
            jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=act))
    with jax.set_mesh(mesh):
        grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
        return jax.jit(grad).lower(*args).compile().as_text()


def flash_kernels(text: str, chip: str = "v5e") -> list[dict]:
    """Per flash kernel of a compiled module: FLOPs, bytes both ways, roofline ms both ways."""
    from mini_internvl_jax.tools.hlo import CHIPS, analyze, custom_call_target

    peak, bandwidth = CHIPS[chip]
    rows = []
    for k in analyze(text).kernels:
        if custom_call_target(k.instr) != "tpu_custom_call":
            continue
        name = re.sub(r"\.\d+$", "", k.instr.name)
        copies = float(_BYTES.search(k.instr.attrs).group(1))
        once = k.bytes_all  # operands and results, each once, wherever they live
        rows.append({
            "kernel": name, "calls": k.calls, "gflop": k.flops / 1e9,
            "mb_copies": copies / 1e6, "mb_once": once / 1e6,
            "flop_per_byte": k.flops / copies,
            "ms_copies": 1e3 * max(k.flops / peak, copies / bandwidth),
            "ms_once": 1e3 * max(k.flops / peak, once / bandwidth),
            "bound": "compute" if k.flops / peak >= copies / bandwidth else "HBM"})
    return sorted(rows, key=lambda r: r["kernel"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--shapes", default="vit,llm")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from mini_internvl_jax.kernels import flash_tpu
    from mini_internvl_jax.train.aot import topology_devices

    devices = topology_devices(args.topology)
    mesh = jax.make_mesh((len(devices),), ("fsdp",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    rows = []
    for shape in args.shapes.split(","):
        for variant, blocks in (("before", flash_tpu.BlockSizes()), ("after", None)):
            t0 = time.perf_counter()
            text = compile_attention(shape, blocks, mesh)
            seconds = time.perf_counter() - t0
            for r in flash_kernels(text):
                rows.append({"shape": shape, "variant": variant, "compile_s": seconds, **r})
    head = (f"{'shape':5} {'variant':7} {'kernel':14} {'GFLOP':>7} {'MB copies':>10} "
            f"{'MB once':>8} {'FLOP/B':>7} {'ms copies':>10} {'ms once':>8}  bound")
    print(f"per chip, {args.topology} fsdp={len(devices)}, v5e roofline per kernel")
    print(head)
    totals: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        print(f"{r['shape']:5} {r['variant']:7} {r['kernel']:14} {r['gflop']:7.2f} "
              f"{r['mb_copies']:10.1f} {r['mb_once']:8.1f} {r['flop_per_byte']:7.0f} "
              f"{r['ms_copies']:10.3f} {r['ms_once']:8.3f}  {r['bound']}")
        t = totals.setdefault((r["shape"], r["variant"]), [0.0] * 5)
        for i, key in enumerate(("gflop", "mb_copies", "mb_once", "ms_copies", "ms_once")):
            t[i] += r[key]
    for (shape, variant), t in totals.items():
        print(f"{shape:5} {variant:7} {'total':14} {t[0]:7.2f} {t[1]:10.1f} {t[2]:8.1f} "
              f"{'':7} {t[3]:10.3f} {t[4]:8.3f}")
    result = {"command": "python benchmarks/vit_attention_anatomy.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "topology": args.topology,
        "mesh": {"fsdp": len(devices)}, "shapes": {k: SHAPES[k] for k in args.shapes.split(",")},
        "rows": rows, "totals": [{"shape": s, "variant": v, "gflop": t[0], "mb_copies": t[1],
                                  "mb_once": t[2], "ms_copies": t[3], "ms_once": t[4]}
                                 for (s, v), t in totals.items()]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
