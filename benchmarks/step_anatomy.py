"""Step anatomy: compile the W1 training step for a TPU topology on this (CPU) machine and show
where its FLOPs and bytes go, so speed work can be judged between accelerator sessions.

W1 = the 1B preset (and the 2B / 4B presets at the same shape), batch 4 x 4096 tokens, 6 tiles
per sample (24 tiles), bf16 compute with float32 master weights, AdamW, stage 2 (all parts
train). The step is lowered on abstract arguments for the topology's compile-only devices (needs
libtpu) with FSDP over all chips, and from the compiled executable it reports, per chip:

  * XLA cost analysis FLOPs and bytes (a while-loop body counted once, as XLA does), and the
    same from a walk of the optimized HLO that weights loop bodies by their trip counts
    (mini_internvl_jax.tools.hlo.py);
  * model FLOPs (train/flops.py) / HLO FLOPs: below 1 by the share of recomputation (remat);
  * all-gather / reduce-scatter / all-reduce: ops, executions and bytes per step;
  * float32 <-> bfloat16 converts of weight-sized arrays inside loops (master weights cast
    again every layer iteration / micro-step);
  * the largest kernels by bytes per step, and a roofline lower bound for v5e and v5p:
    max(FLOPs / peak, bytes / HBM bandwidth), globally and summed kernel by kernel; the
    ratio of that per-kernel sum to the model-FLOP time on the topology's chip;
  * a per-category table that sums to the step (ViT / LLM layers forward, recompute and
    backward, embedding + LM head + loss, optimizer, weight casts, collectives, copies).

    python benchmarks/step_anatomy.py                        # W1 1B on v5e:2x2
    python benchmarks/step_anatomy.py --size 1b,2b,4b --remat auto --json anatomy.json
                        # 1B, 2B on v5e:2x2, 4B on v5p:2x2x1, each with its best fitting remat
    python benchmarks/step_anatomy.py --size 4b   # on v5p:2x2x1: 4B needs > 16 GB per chip
    python benchmarks/step_anatomy.py --tiny                 # the tiny model, seconds

Compiling W1 takes minutes on a 2-core machine; the compile time is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Where each preset is compiled unless --topology says otherwise: 4B needs more than a v5e's
# 16 GB per chip.
DEFAULT_TOPOLOGY = {"1b": "v5e:2x2", "2b": "v5e:2x2", "4b": "v5p:2x2x1", "tiny": "v5e:2x2"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1b", help="comma list of 1b|2b|4b")
    p.add_argument("--topology", default="auto",
                   help="TPU topology to compile for, or `cpu` (this process's CPU devices); "
                        "auto: v5e:2x2 for 1b/2b, v5p:2x2x1 for 4b")
    p.add_argument("--chips", type=int, help="use only the first N devices")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--tiles", type=int, default=6, help="tiles per sample")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--remat", default="full",
                   help="a policy, or auto: the least recomputation whose compiled step fits "
                        "the chip (train/aot.choose_remat; compiles each candidate in turn)")
    p.add_argument("--attention", default="auto", help="auto (Pallas flash on TPU) or xla")
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra TrainConfig overrides (repeatable), e.g. optim.grad_accum=2")
    p.add_argument("--tiny", action="store_true",
                   help="tiny-qwen2 at batch 4 x 64 tokens (seconds; tests, smoke runs)")
    p.add_argument("--top", type=int, default=8, help="largest kernels to list")
    p.add_argument("--label", default="", help="a name for this variant in the table")
    p.add_argument("--dump-hlo", help="write each optimized HLO module into this folder")
    p.add_argument("--hlo", help="analyse this dumped module instead of compiling ({model} is "
                                 "replaced by the preset name, e.g. DIR/step_{model}.hlo.txt)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def train_config(a, size: str):
    from mini_internvl_jax.train.config import train_config_from_dict

    if a.tiny:
        model, batch, seq, tiles = "tiny-qwen2", 4, 64, 1
    else:
        model, batch, seq, tiles = f"mini-internvl-{size}", a.batch, a.seq, a.tiles
    data = {
        "model": model, "batch_size": batch, "seq_len": seq, "stage": 2,
        "max_tiles": batch // a.grad_accum * tiles, "total_steps": 10_000, "packed": False,
        "synthetic": {"tiles_per_sample": tiles, "min_fill": 1.0},
        "optim": {"lr": 1e-5, "warmup_steps": 0, "weight_decay": 0.01, "clip_norm": 1.0,
                  "grad_accum": a.grad_accum},
        "compute": {"dtype": "bfloat16", "param_dtype": "float32", "remat": a.remat,
                    "attention_impl": a.attention, "scan_layers": True},
        "loss_chunk": a.loss_chunk,
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1}}
    return train_config_from_dict(data, a.set)


def weight_shapes(trees) -> set[tuple[int, ...]]:
    """Shapes the layer loops see of the scanned layers' weight matrices: one layer's slice,
    unsharded or one chip's shard, with neighbouring dims merged. Vectors (norms, biases) and
    weights outside the layer stacks (embeddings: a ViT position table is shaped like a tile's
    activations) are left out."""
    import jax

    from mini_internvl_jax.tools.hlo import merged_forms

    shapes = set()
    for path, x in jax.tree_util.tree_flatten_with_path(trees)[0]:
        if "layers" not in jax.tree_util.keystr(path):
            continue
        for s in (tuple(x.shape), tuple(x.sharding.shard_shape(x.shape))):
            t = s[1:]  # the leading axis of a stack is the layer
            if len(t) >= 2 and min(t) > 1:
                shapes |= merged_forms(t)
    return shapes


def run_one(a, size: str) -> dict:
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    import jax

    from mini_internvl_jax.sharding import make_mesh
    from mini_internvl_jax.tools.hlo import analyze
    from mini_internvl_jax.train import flops
    from mini_internvl_jax.train.aot import pick_remat, remat_label, topology_devices
    from mini_internvl_jax.train.setup import build_abstract

    cfg = train_config(a, size)
    topology = DEFAULT_TOPOLOGY[size] if a.topology == "auto" else a.topology
    devices = jax.devices("cpu") if topology == "cpu" else topology_devices(topology)
    devices = devices[:a.chips] if a.chips else devices
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    t0 = time.perf_counter()
    choice = ""
    cost, mem = {}, None
    if a.hlo:  # re-read a dumped module: no compile, no XLA cost or memory figures
        s = build_abstract(cfg, mesh)
        text = Path(a.hlo.format(model=s.model_cfg.name)).read_text()
        t1 = t2 = time.perf_counter()
    else:
        if cfg.compute.remat == "auto":  # lowers and compiles every candidate: all compile time
            cfg, s, _, compiled, choice = pick_remat(cfg, mesh)
            print(choice, flush=True)
            t1 = t0
        else:
            s = build_abstract(cfg, mesh)
            with jax.set_mesh(mesh):
                lowered = s.step_fn.lower(s.state, s.batch_abstract())
                t1 = time.perf_counter()
                compiled = lowered.compile()
        t2 = time.perf_counter()
        text = compiled.as_text()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        mem = compiled.memory_analysis()
    if a.dump_hlo:
        Path(a.dump_hlo).mkdir(parents=True, exist_ok=True)
        (Path(a.dump_hlo) / f"step_{s.model_cfg.name}.hlo.txt").write_text(text)
    an = analyze(text, weight_shapes((s.state.params, s.state.frozen)))
    chips = len(devices)
    tiles = cfg.max_tiles * cfg.optim.grad_accum
    model_flops = flops.step_flops(s.model_cfg, batch=cfg.batch_size, seq_len=cfg.seq_len,
                                   tiles=tiles) / chips
    top = sorted(an.kernels, key=lambda k: -k.calls * k.bytes)[:a.top]
    roofline = an.roofline(model_flops)
    chip = topology.split(":")[0] if topology.split(":")[0] in roofline else "v5e"
    r = roofline[chip]
    return {
        "label": a.label or "default", "model": s.model_cfg.name, "topology": topology,
        "chips": chips, "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
        "batch": cfg.batch_size, "seq": cfg.seq_len, "tiles": tiles,
        "grad_accum": cfg.optim.grad_accum,
        "remat": remat_label(cfg.compute.remat, cfg.compute.remat_vision), "remat_choice": choice,
        "attention": cfg.compute.attention_impl, "loss_chunk": cfg.loss_chunk, "overrides": a.set,
        "lower_s": t1 - t0, "compile_s": t2 - t1,
        "xla_cost_flops": float(cost.get("flops", float("nan"))),
        "xla_cost_bytes": float(cost.get("bytes accessed", float("nan"))),
        "hlo_flops": an.flops, "hlo_bytes": an.bytes, "model_flops": model_flops,
        # bytes counting operands and results in on-chip memory (VMEM) too: the figure this
        # benchmark reported before it told HBM from on-chip memory
        "hlo_bytes_all_memory_spaces": an.bytes_all_spaces,
        "model_over_hlo_flops": model_flops / an.flops if an.flops else None,
        "matmul_flops_by_dtype": an.matmul_flops_by_dtype, "collectives": an.collectives,
        "weight_converts_in_loops": an.weight_converts,
        "loops": an.loops, "unknown_trip_counts": an.unknown_trip_counts,
        "peak_gib": None if mem is None else (
            mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes) / 2**30,
        "temp_gib": None if mem is None else mem.temp_size_in_bytes / 2**30,
        "roofline": roofline, "chip": chip,
        # the figure: the per-kernel bound over the model-FLOP time, on this chip
        "ratio_per_kernel": r["per_kernel_s"] / r["model_flops_s"],
        "ratio_global": r["global_s"] / r["model_flops_s"],
        "categories": an.categories(),
        "top_kernels": [{"name": k.instr.name, "opcode": k.instr.opcode,
                         "category": k.category, "named_by": k.named_by,
                         "op_name": k.op_name[-120:], "calls": k.calls,
                         "gb_per_step": k.calls * k.bytes / 1e9,
                         "gflop_per_step": k.calls * k.flops / 1e9} for k in top],
    }


def f32_share(r: dict) -> float:
    """Share of matmul FLOPs with a float32 operand (slow: no bf16 tensor-core rate)."""
    d = r["matmul_flops_by_dtype"]
    total = sum(d.values())
    return sum(v for k, v in d.items() if "f32" in k) / total if total else 0.0


def table(results: list[dict]) -> str:
    head = ["variant", "model", "topology", "ratio", "compile s", "HLO TFLOP", "f32 share",
            "model/HLO", "HLO GB", "XLA GB",
            "AG n/GB", "RS n/GB", "AR n/GB", "cvt n/GB", "v5e ms", "v5p ms", "peak GiB"]
    rows = [head]
    for r in results:
        c = r["collectives"]

        def cell(kind, c=c):
            d = c.get(kind)
            return "0" if d is None else f"{d['count']:.0f}/{d['bytes'] / 1e9:.2f}"

        cv = r["weight_converts_in_loops"]
        rows.append([r["label"], r["model"], r["topology"], f"{r['ratio_per_kernel']:.2f}",
                     f"{r['compile_s']:.0f}",
                     f"{r['hlo_flops'] / 1e12:.2f}", f"{f32_share(r):.3f}",
                     f"{r['model_over_hlo_flops']:.3f}",
                     f"{r['hlo_bytes'] / 1e9:.1f}", f"{r['xla_cost_bytes'] / 1e9:.1f}",
                     cell("all-gather"), cell("reduce-scatter"), cell("all-reduce"),
                     f"{cv['count']:.0f}/{cv['bytes'] / 1e9:.2f}",
                     f"{1e3 * r['roofline']['v5e']['global_s']:.0f}",
                     f"{1e3 * r['roofline']['v5p']['global_s']:.0f}",
                     "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(widths[i]) if i > 2 else c.ljust(widths[i])
                       for i, c in enumerate(row)) for row in rows]
    out = ["per chip; ratio = per-kernel roofline / model-FLOP time on the topology's chip; "
           "f32 share = matmul FLOPs with a float32 operand; n = executions per step; "
           "cvt = f32<->bf16 converts of weight-sized arrays inside loops; v5e/v5p ms = "
           "max(HLO FLOPs/peak, HLO bytes/HBM bandwidth)"] + lines
    for r in results:
        out.append(f"\n{r['label']} {r['model']} on {r['topology']}: per category (sums to the "
                   f"step; {r['chip']} per-kernel roofline)")
        out.append(f"  {'category':<28}{'kernels':>8}{'GFLOP':>10}{'GB':>9}{'ms':>9}  largest")
        for cat, c in r["categories"].items():
            big = c["top"][0]["op_name"][-70:] if c["top"] else ""
            out.append(f"  {cat:<28}{c['kernels']:>8}{c['gflop']:>10.1f}{c['gb']:>9.2f}"
                       f"{1e3 * c['per_kernel_s'][r['chip']]:>9.1f}  {big}")
        rf = r["roofline"][r["chip"]]
        out.append(f"  {'total':<28}{'':>8}{r['hlo_flops'] / 1e9:>10.1f}"
                   f"{r['hlo_bytes'] / 1e9:>9.2f}{1e3 * rf['per_kernel_s']:>9.1f}  model-FLOP "
                   f"time {1e3 * rf['model_flops_s']:.1f} ms, ratio {r['ratio_per_kernel']:.2f}")
    for r in results:
        out.append(f"\n{r['label']} {r['model']}: largest kernels by bytes per step")
        for k in r["top_kernels"]:
            out.append(f"  {k['gb_per_step']:8.2f} GB {k['gflop_per_step']:9.1f} GFLOP "
                       f"x{k['calls']:<5.0f} {k['opcode']:<12} {k['category']:<20} "
                       f"{k['op_name']}")
    return "\n".join(out)


def main(argv=None) -> int:
    a = parse_args(argv)
    sizes = ["tiny"] if a.tiny else [x for x in a.size.split(",") if x]
    results = []
    errors = []
    for size in sizes:
        try:
            results.append(run_one(a, size))
        except Exception as e:  # e.g. out of HBM on this topology: keep the other sizes
            errors.append({"size": size, "topology": a.topology, "error": str(e)[:2000]})
            print(f"{size}: FAILED: {str(e)[:300]}", flush=True)
            continue
        print(json.dumps({k: v for k, v in results[-1].items() if k != "top_kernels"}),
              flush=True)
    print(table(results))
    if a.json:
        from mini_internvl_jax.fileio import write_atomic

        write_atomic(a.json, json.dumps({"args": vars(a), "results": results,
                                          "errors": errors}, indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
