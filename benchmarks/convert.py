"""Converter time and peak memory on a full-size random Mini-InternVL-1B checkpoint.

Generates (once; reused from --workdir) an original-layout bf16 safetensors checkpoint with
InternVL2-1B's exact names and shapes, then measures in separate subprocesses, each with
os.wait4's own ru_maxrss:
  * the import baseline (the converter's modules loaded, nothing converted),
  * HF -> Orbax (`convert_weights.py --from-hf`),
  * Orbax -> HF (`convert_weights.py --from-orbax --to-hf`), checked byte-identical to the input.
Goal: conversion peak RSS <= 1.3x the checkpoint's bytes.

    python benchmarks/convert.py [--workdir DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL = 1.3


def generate(hf_dir: Path, preset: str) -> None:
    """Random bf16 tensors, streamed to one safetensors file (one tensor in memory at a time)."""
    import ml_dtypes
    import numpy as np

    from mini_internvl_jax.config import load_model_config
    from mini_internvl_jax.convert.hf_config import hf_config_from_model
    from mini_internvl_jax.convert.hf_io import PlannedTensor, SafetensorsWriter
    from mini_internvl_jax.convert.mapping import model_rules

    cfg = load_model_config(preset)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    plan = [PlannedTensor(n, bf16, s) for r in model_rules(cfg, "original")
            for n, s in zip(r.sources, r.source_shapes, strict=True)]
    tmp = hf_dir.with_name(hf_dir.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    writer = SafetensorsWriter(tmp, plan, 10**12)
    for t in plan:
        writer.write(t.name, (rng.standard_normal(t.shape, np.float32) * 0.02).astype(bf16))
    writer.close()
    (tmp / "config.json").write_text(json.dumps(hf_config_from_model(cfg, "original",
                                                                      "bfloat16")))
    (tmp / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": cfg.image_token_id}))
    os.replace(tmp, hf_dir)


def measure(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (bytes) of one child process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return {"seconds": round(seconds, 2), "peak_rss_bytes": usage.ru_maxrss * 1024}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir",
                   default=str(Path(tempfile.gettempdir()) / "mini_internvl_convert_bench"),
                   help="holds the generated checkpoint (reused) and the outputs")
    p.add_argument("--preset", default="mini-internvl-1b")
    p.add_argument("--json", help="results file (default: WORKDIR/convert_benchmark.json)")
    p.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.workdir)
    hf = work / f"{args.preset}-hf"
    if args.generate_only:
        generate(hf, args.preset)
        return
    # This process stays small (no numpy/JAX): a child's ru_maxrss starts from its parent's
    # RSS at fork, so generating here would inflate every measurement.
    if not (hf / "model.safetensors").is_file():
        print(f"generating a random {args.preset} checkpoint in {hf} ...", flush=True)
        measure([sys.executable, __file__, "--workdir", str(work), "--preset", args.preset,
                 "--generate-only"])
    ckpt = hf / "model.safetensors"
    ckpt_bytes = ckpt.stat().st_size
    script = str(REPO / "convert_weights.py")
    py = sys.executable
    rows = {
        "import baseline": measure([py, "-c", "import mini_internvl_jax.convert.importer, "
                                    "mini_internvl_jax.convert.exporter"]),
        "HF -> Orbax": measure([py, script, "--from-hf", str(hf), "--to", str(work / "orbax"),
                                "--overwrite", "--quiet"]),
        "Orbax -> HF": measure([py, script, "--from-orbax", str(work / "orbax"), "--to-hf",
                                str(work / "back"), "--overwrite", "--quiet"]),
    }
    identical = sha256(ckpt) == sha256(work / "back" / "model.safetensors")

    print(f"\ncheckpoint: {ckpt} ({ckpt_bytes / 1e9:.3f} GB, bf16, original layout)")
    print(f"{'step':<16} {'seconds':>8} {'peak RSS GB':>12} {'RSS / ckpt':>11}")
    for name, r in rows.items():
        r["rss_over_checkpoint"] = round(r["peak_rss_bytes"] / ckpt_bytes, 3)
        print(f"{name:<16} {r['seconds']:>8.1f} {r['peak_rss_bytes'] / 1e9:>12.3f} "
              f"{r['rss_over_checkpoint']:>11.3f}")
    print(f"goal: HF -> Orbax peak RSS <= {GOAL}x checkpoint bytes: "
          f"{'met' if rows['HF -> Orbax']['rss_over_checkpoint'] <= GOAL else 'NOT met'}; "
          f"round trip byte-identical: {identical}")
    result = {"preset": args.preset, "checkpoint_bytes": ckpt_bytes, "goal_ratio": GOAL,
              "round_trip_identical": identical, "steps": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}}
    out = Path(args.json) if args.json else work / "convert_benchmark.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
