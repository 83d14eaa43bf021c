"""A non-editable install works. The default test builds the wheel (seconds, offline) and checks
what it holds against the checkout: every preset of configs/ (repository root) as package data,
the console scripts of pyproject.toml, and presets readable through importlib.resources from the
unpacked wheel. The slow test installs that wheel into a fresh venv (with this environment's
packages for the dependencies) and runs the demo from a folder outside the repository:
`mivl-demo-data`, then `mivl-train --config demo` with the preset read as package data."""

import ast
import configparser
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mini_internvl_jax"


def _run(cmd, cwd, env=None, timeout=300):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}\n{(p.stdout + p.stderr)[-3000:]}"
    return p


def _clean_env(**extra) -> dict[str, str]:
    """This environment without PYTHONPATH, so nothing finds the checkout by accident."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy so the checkout gets no build/ or egg-info folders.
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for folder in (PACKAGE, "configs"):  # configs/ installs as mini_internvl_jax.configs
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(out)], cwd=src)
    [built] = out.glob("*.whl")
    return built


def test_wheel_holds_presets_entry_points_and_readable_package_data(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        ep_text = zf.read(entry_points).decode()
        zf.extractall(tmp_path / "unpacked")

    presets = sorted(f"{PACKAGE}/configs/{p.relative_to(ROOT / 'configs').as_posix()}"
                     for p in (ROOT / "configs").rglob("*.yaml"))
    assert {"models", "train"} <= {Path(p).parent.name for p in presets}, presets
    missing = [p for p in presets if p not in names]
    assert not missing, f"presets missing from the wheel: {missing}"

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "mivl-train" in scripts
    parser = configparser.ConfigParser()
    parser.optionxform = str  # keep the script names as written
    parser.read_string(ep_text)
    assert dict(parser["console_scripts"]) == scripts
    for target in scripts.values():  # each target is a top-level function of a shipped module
        module, func = target.split(":")
        path = module.replace(".", "/") + ".py"
        assert path in names, f"{target}: {path} is not in the wheel"
        tree = ast.parse((tmp_path / "unpacked" / path).read_text())
        assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, target

    # The unpacked wheel alone (run from elsewhere, no checkout on the path) reads a preset.
    code = ("import json, mini_internvl_jax\n"
            "from mini_internvl_jax import configlib\n"
            "print(json.dumps([mini_internvl_jax.__file__, configlib.preset_names('train'),"
            " configlib.read_preset('train', 'demo'),"
            " configlib.read_preset('models', 'mini-internvl-1b')]))")
    away = tmp_path / "elsewhere"
    away.mkdir()
    p = _run([sys.executable, "-c", code], away,
             _clean_env(PYTHONPATH=str(tmp_path / "unpacked")))
    where, train_presets, demo, model_1b = json.loads(p.stdout)
    assert Path(where).is_relative_to(tmp_path / "unpacked"), where
    assert sorted(train_presets) == sorted(
        Path(p).stem for p in presets if Path(p).parent.name == "train")
    assert demo == yaml.safe_load((ROOT / "configs/train/demo.yaml").read_text())
    assert model_1b == yaml.safe_load((ROOT / "configs/models/mini-internvl-1b.yaml").read_text())


@pytest.mark.slow
def test_wheel_in_fresh_venv_runs_the_demo(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    bin_dir = venv / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
          str(wheel)], cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _clean_env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                     PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    where = _run([str(bin_dir / "python"), "-c",
                  "import mini_internvl_jax; print(mini_internvl_jax.__file__)"], work, env)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # not the checkout
    assert "--config" in _run(["mivl-train", "--help"], work, env).stdout
    _run(["mivl-demo-data", "demo_data", "--num-stage1", "8", "--num-stage2", "16"], work, env)
    _run(["mivl-train", "--config", "demo", "total_steps=2", "batch_size=2", "max_tiles=16",
          "checkpoint.dir=run", "checkpoint.every=2", "log.every=1",
          "log.progress_bar=false"], work, env, timeout=600)
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert (work / "run" / "2").is_dir()
