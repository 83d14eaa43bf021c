"""Training-step benchmark, workload W1, beside the PyTorch reference in the same run.

W1: the Mini-InternVL-1B preset (InternViT-300M + MLP + Qwen2-0.5B), batch 4 x 4096 tokens,
6 tiles of 448 px per sample (24 tiles), bf16 compute with float32 master weights, AdamW,
random weights and data. Every system runs in its own subprocess, one after the other, so each
gets the accelerator to itself and its own peak-memory counter:

    python benchmarks/train_step.py [--size 1b] [--batch 4] [--seq 4096] [--tiles 6]
        [--remat full,save_dots] [--attention auto] [--torch-ref PATH] [--torch eager,compile]
        [--iters 5] [--json OUT.json]

Prints a table (step time, LLM tokens/s, model TFLOP/s, MFU, peak GiB, speed relative to each
PyTorch mode) and writes all results as JSON. Model FLOPs follow mini_internvl_jax/train/flops.py
(the reference's formula plus the ViT patch embedding).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1b", choices=("1b", "2b", "4b", "tiny"),
                   help="preset mini-internvl-SIZE; tiny = tiny-qwen2 (CPU dry runs)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--tiles", type=int, default=6, help="tiles per sample")
    p.add_argument("--remat", default="full", help="comma list of none|full|save_dots")
    p.add_argument("--attention", default="auto", help="comma list of auto|xla|cudnn|pallas")
    p.add_argument("--loss-chunk", type=int, default=1024, help="positions per CE chunk")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="compute dtype of the JAX runs (master weights stay float32)")
    p.add_argument("--no-scan", action="store_true", help="unrolled layers instead of a scan")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the JAX runs")
    p.add_argument("--profile", help="write a jax.profiler trace of 2 timed steps here")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--torch-ref", help="PyTorch reference step script (transformers InternVL, "
                   "same workload flags; not shipped with the repository)")
    p.add_argument("--torch", default="compile",
                   help="comma list of eager|compile, or none (skip the PyTorch reference)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per system")
    p.add_argument("--json", help="write every result here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# one JAX configuration (runs in a subprocess)

def run_jax(a) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
    import jax
    import numpy as np

    from mini_internvl_jax.config import ComputeConfig
    from mini_internvl_jax.placement import to_global
    from mini_internvl_jax.sharding import make_mesh
    from mini_internvl_jax.train import flops
    from mini_internvl_jax.train.batches import SyntheticBatches
    from mini_internvl_jax.train.config import (
        OptimConfig,
        SyntheticConfig,
        TrainConfig,
        build_model_config,
    )
    from mini_internvl_jax.train.setup import build

    cfg = TrainConfig(
        model="tiny-qwen2" if a.size == "tiny" else f"mini-internvl-{a.size}",
        batch_size=a.batch, seq_len=a.seq,
        max_tiles=a.batch * max(a.tiles, 1), total_steps=10_000, stage=2,
        synthetic=SyntheticConfig(tiles_per_sample=a.tiles, min_fill=1.0), packed=False,
        optim=OptimConfig(lr=1e-5, warmup_steps=0, weight_decay=0.01, clip_norm=None),
        compute=ComputeConfig(dtype=a.dtype, param_dtype="float32", remat=a.remat,
                              attention_impl=a.attention, scan_layers=not a.no_scan),
        loss_chunk=a.loss_chunk)
    model_cfg = build_model_config(cfg)
    mesh = make_mesh(1, -1, 1)
    t0 = time.perf_counter()
    s = build(cfg, mesh, model_cfg)
    data = SyntheticBatches(vocab_size=model_cfg.llm.vocab_size,
                            image_token_id=model_cfg.image_token_id,
                            num_image_tokens=model_cfg.num_image_tokens,
                            image_size=model_cfg.vision.image_size, seq_len=a.seq,
                            batch_size=a.batch, max_tiles=cfg.max_tiles,
                            tiles_per_sample=a.tiles, samples_per_row=1, seed=0, min_fill=1.0)
    host = next(data)
    batch = to_global({k: v[None] for k, v in host.items()}, s.batch_sh)
    state = s.state
    with jax.set_mesh(mesh):
        state, m = s.step_fn(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for _ in range(a.warmup - 1):
            state, m = s.step_fn(state, batch)
        jax.block_until_ready((state, m))
        times = []
        for i in range(a.iters):
            if a.profile and i == a.iters - 2:
                jax.profiler.start_trace(a.profile)
            t = time.perf_counter()
            state, m = s.step_fn(state, batch)
            jax.block_until_ready((state, m))
            times.append(time.perf_counter() - t)
        if a.profile:
            jax.profiler.stop_trace()
    step_s = statistics.median(times)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    model_flops = flops.step_flops(model_cfg, batch=a.batch, seq_len=a.seq,
                                   tiles=a.batch * a.tiles)
    from mini_internvl_jax.train.metrics import mfu, peak_tflops

    return {
        "system": f"mini_internvl_jax (remat={a.remat}, attention={a.attention}"
                  f"{', unrolled' if a.no_scan else ''}"
                  f"{', ' + a.dtype if a.dtype != 'bfloat16' else ''})",
        "jax": jax.__version__, "device": dev.device_kind, "platform": dev.platform,
        "batch": a.batch, "seq": a.seq, "tiles": a.batch * a.tiles, "step_s": step_s,
        "step_s_all": times, "llm_tokens_per_s": a.batch * a.seq / step_s,
        "model_tflops_per_s": model_flops / step_s / 1e12,
        "mfu": mfu(model_flops, step_s, 1, peak_tflops(dev.device_kind)),
        "peak_gib": None if peak is None else peak / 2**30,
        "first_step_s": compile_s, "loss": float(np.asarray(m["loss"])),
        "finite": bool(np.asarray(m["finite"])),
    }


# ----------------------------------------------------------------------------------------------
# orchestration

def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _subprocess(cmd: list[str], timeout: int, label: str, xla_flags: str = "") -> dict:
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env=env)
    except subprocess.TimeoutExpired:
        return {"system": label, "error": f"timed out after {timeout} s"}
    out = _last_json(p.stdout)
    if p.returncode != 0 or out is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-8:]
        return {"system": label, "error": f"exit {p.returncode}: " + " | ".join(tail)}
    out["wall_s"] = time.perf_counter() - t
    return out


def run_torch(a, mode: str) -> dict:
    label = "transformers InternVL" + (" + torch.compile" if mode == "compile" else " (eager)")
    if a.torch_ref is None:
        return {"system": label, "error": "no --torch-ref script given (or pass --torch none)"}
    if not Path(a.torch_ref).is_file():
        return {"system": label, "error": f"reference script {a.torch_ref} not found"}
    cmd = [sys.executable, a.torch_ref, "--size", a.size, "--batch", str(a.batch), "--seq",
           str(a.seq), "--tiles", str(a.tiles), "--iters", str(a.iters)]
    if mode == "compile":
        cmd.append("--compile")
    return _subprocess(cmd, a.timeout, label)


def run_jax_subprocess(a, remat: str, attention: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--size", a.size, "--batch",
           str(a.batch), "--seq", str(a.seq), "--tiles", str(a.tiles), "--remat", remat,
           "--attention", attention, "--loss-chunk", str(a.loss_chunk), "--iters", str(a.iters),
           "--warmup", str(a.warmup), "--dtype", a.dtype] + (["--no-scan"] if a.no_scan else [])
    if a.profile:
        cmd += ["--profile", str(Path(a.profile) / f"{remat}-{attention}")]
    label = f"mini_internvl_jax (remat={remat}, attention={attention}, {a.dtype})"
    return _subprocess(cmd, a.timeout, label, a.xla_flags)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(results: list[dict]) -> str:
    refs = {r["system"]: r["step_s"] for r in results if "transformers" in r["system"]
            and "step_s" in r}
    head = ["system", "step s", "tokens/s", "TFLOP/s", "MFU", "peak GiB"]
    head += [f"x {name.split('InternVL')[-1].strip() or 'torch'}" for name in refs]
    rows, errors = [head], []
    for r in results:
        if "error" in r:
            errors.append(f"{r['system']}: FAILED: {r['error'][:600]}")
            continue
        row = [r["system"], _fmt(r["step_s"], ".3f"), _fmt(r["llm_tokens_per_s"], ",.0f"),
               _fmt(r.get("model_tflops_per_s"), ".1f"),
               _fmt(None if r.get("mfu") is None else 100 * r["mfu"], ".1f"),
               _fmt(r.get("peak_gib"), ".1f")]
        row += [f"{ref / r['step_s']:.2f}" for ref in refs.values()]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)) for row in rows]
    return "\n".join(lines + errors)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one:
        print(json.dumps(run_jax(a)), flush=True)
        return 0
    results = []
    modes = [] if a.torch == "none" else [m for m in a.torch.split(",") if m]
    for mode in modes:  # first, so no JAX process holds accelerator memory meanwhile
        results.append(run_torch(a, mode))
        print(json.dumps(results[-1]), flush=True)
    for remat in a.remat.split(","):
        for attention in a.attention.split(","):
            results.append(run_jax_subprocess(a, remat, attention))
            print(json.dumps(results[-1]), flush=True)
    print(f"\nW1-style training step: size {a.size}, batch {a.batch} x {a.seq} tokens, "
          f"{a.batch * a.tiles} tiles (x N: PyTorch step time / this step time)")
    print(table(results))
    if a.json:
        with tempfile.NamedTemporaryFile("w", dir=Path(a.json).resolve().parent, delete=False,
                                         suffix=".tmp") as fh:
            json.dump({"workload": vars(a), "results": results}, fh, indent=1)
        os.replace(fh.name, a.json)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
