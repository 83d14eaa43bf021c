"""Restart cost: the second start of a run reads its compiled step from the persistent cache
under the run folder instead of compiling it again."""

import json
import os
import subprocess
import sys

import jax
import yaml

from mini_internvl_jax.train.compile_cache import cache_dir
from mini_internvl_jax.train.config import train_config_from_dict
from tests.test_train_run import BASE, ONE


def _start(cfg_path, tmp_path, *overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "mini_internvl_jax.cli.train", "--config",
                        str(cfg_path), *overrides], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    [line] = [x for x in p.stdout.splitlines() if x.startswith("time to first step")]
    return line


def _entries(cache) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}


def test_second_start_reuses_the_compiled_step(tmp_path):
    run = tmp_path / "run"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({**BASE, "mesh": ONE, "total_steps": 1,
                                        "log": {**BASE["log"], "every": 1},
                                        "checkpoint": {"dir": str(run)}}))
    first = _start(cfg_path, tmp_path)
    cache = run / "compile_cache"
    assert ": 0 hit(s)" in first and str(cache) in first, first
    written = _entries(cache)
    assert written, "the first start wrote nothing to the compile cache"

    # a restart after preemption: resume from step 1 and run one more step
    second = _start(cfg_path, tmp_path, "total_steps=2")
    hits = int(second.split(": ")[1].split(" hit")[0])
    assert hits >= 1, second
    after = _entries(cache)
    assert {k: after[k] for k in written} == written  # read back, not compiled and rewritten
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["compile_cache_hits"] == 0 and rows[1]["compile_cache_hits"] == hits
    assert rows[1]["time_to_first_step"] > 0


def test_cache_dir_setting():
    def cfg(**over):
        return train_config_from_dict({"model": "tiny-qwen2", **over})

    shared = jax.config.jax_compilation_cache_dir  # the test session's own cache (conftest)
    jax.config.update("jax_compilation_cache_dir", "/shared/cache")
    try:  # "auto" defers to a cache JAX is already set to use
        assert cache_dir(cfg(checkpoint={"dir": "/x"})) == "/shared/cache"
        jax.config.update("jax_compilation_cache_dir", None)
        assert cache_dir(cfg(checkpoint={"dir": "gs://b/run"})) == "gs://b/run/compile_cache"
        assert cache_dir(cfg(log={"dir": "/x/logs/"})) == "/x/logs/compile_cache"
        assert cache_dir(cfg(checkpoint={"dir": "/x"}, compile_cache_dir=None)) is None
        assert cache_dir(cfg(checkpoint={"dir": "/x"}, compile_cache_dir="/c")) == "/c"
    finally:
        jax.config.update("jax_compilation_cache_dir", shared)
