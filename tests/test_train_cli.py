"""`python train.py` end to end: the README demo (demo data, tiny model, CPU) shows the loss
falling; SIGTERM saves a checkpoint and exits 143; config errors exit 2 naming the field."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import yaml

from mini_internvl_jax.checkpoints.run import read_meta
from mini_internvl_jax.cli.train import main
from mini_internvl_jax.train import trainer
from tests.helpers import events
from tests.test_train_run import BASE, ONE, compilation_cache  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("model", [
    # InternVL3.5's decoder family (q/k norms, explicit head_dim) with its internvl2_5 template
    pytest.param(["model=tiny-qwen3", "data.template=internvl2_5"], id="qwen3"),
    # the README's command as written; Qwen2 training is covered by the tests of test_train_run
    pytest.param([], id="readme", marks=pytest.mark.slow),
])
def test_demo_loss_falls(tmp_path, model):
    from mini_internvl_jax.tools.demo import write_demo

    data = tmp_path / "demo_data"
    write_demo(data)
    run = tmp_path / "run"
    # relative paths, as the README's demo command uses them (Orbax itself needs absolute ones)
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "demo",
           "tokenizer=demo_data/tokenizers/qwen2", "data.meta_path=demo_data/stage2_meta.json",
           "total_steps=40", "optim.warmup_steps=5", "checkpoint.dir=run",
           "checkpoint.every=1000", "log.every=10", "log.progress_bar=false", *model]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in rows}
    assert loss[10] > 5.0  # ~ln(512) at the start
    assert loss[40] < loss[10] - 1.5, loss
    assert rows[-1]["data_num_samples"] > 0 and rows[-1]["tokens_per_s"] > 0
    tb = events.values(run)
    assert [step for step, _ in tb["loss"]] == [10, 20, 30, 40]
    [(step, tiles)] = tb["samples/tiles"]  # the first batch's tiles, as one image grid
    assert step == 1 and tiles.ndim == 3 and tiles.shape[2] == 3 and tiles.std() > 0
    [(step, text)] = next(v for k, v in tb.items() if k.startswith("samples/text"))
    assert step == 1 and "<IMG_CONTEXT>x" in text and "supervised targets" in text
    assert (run / "40").is_dir()  # final checkpoint


def test_sigterm_saves_and_exits_cleanly(tmp_path, monkeypatch, capsys):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({**BASE, "mesh": ONE,
                                        "checkpoint": {"dir": str(tmp_path / "ckpt")}}))
    real = trainer.make_iterator

    def sigterm_after_2(*a, **k):
        it = real(*a, **k)
        original = type(it).__next__

        def next_and_signal(self):
            b = original(self)
            if self.index == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return b

        monkeypatch.setattr(type(it), "__next__", next_and_signal)
        return it

    monkeypatch.setattr(trainer, "make_iterator", sigterm_after_2)
    monkeypatch.setattr(jax, "devices", lambda *a: jax.local_devices()[:1])  # a 1-device mesh
    assert main(["--config", str(cfg_path)]) == 143  # not "finished" for a scheduler
    assert "stopped by SIGTERM at step 2; checkpoint saved" in capsys.readouterr().out
    step, meta = read_meta(str(tmp_path / "ckpt"))
    assert step == 2 and meta["train_config"]["total_steps"] == 4


@pytest.mark.parametrize("bad,match", [(["optim.lr=-1"], "optim.lr"),
                                       (["nosuchkey=1"], "unknown key"),
                                       (["batch_size=6", "mesh.data=8"], "multiple of mesh")])
def test_cli_reports_config_errors(tmp_path, capsys, bad, match):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({**BASE, "max_tiles": 48}))
    assert main(["--config", str(cfg_path), *bad]) == 2
    assert match in capsys.readouterr().err
