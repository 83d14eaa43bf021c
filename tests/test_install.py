"""A non-editable install works: a wheel built from the checkout, installed into a fresh venv
(with this environment's packages for the dependencies), runs the demo from a folder outside the
repository: `mivl-demo-data`, then `mivl-train --config demo` with the preset read as package
data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, cwd, env=None, timeout=300):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}\n{(p.stdout + p.stderr)[-3000:]}"
    return p


def test_wheel_in_fresh_venv_runs_the_demo(tmp_path):
    # Build from a copy so the checkout gets no build/ or egg-info folders.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "mini_internvl_jax", src / "mini_internvl_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
          "-q", "-w", str(wheels)], cwd=src)
    [wheel] = wheels.glob("*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    bin_dir = venv / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
         cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    where = _run([str(bin_dir / "python"), "-c",
                  "import mini_internvl_jax; print(mini_internvl_jax.__file__)"], work, env)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # not the checkout
    _run(["mivl-demo-data", "demo_data", "--num-stage1", "8", "--num-stage2", "16"], work, env)
    _run(["mivl-train", "--config", "demo", "total_steps=2", "batch_size=2", "max_tiles=16",
          "checkpoint.dir=run", "checkpoint.every=2", "log.every=1",
          "log.progress_bar=false"], work, env, timeout=600)
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert (work / "run" / "2").is_dir()
