"""Weights & Biases logging, offline: the run's config and logged scalars read back from the
run file with an independent reader (tests/helpers/wandb_run.py), next to TensorBoard and JSONL."""

import json

import jax.numpy as jnp
import pytest

from mini_internvl_jax import configlib
from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.train.config import WandbConfig, build_model_config, load_train_config
from mini_internvl_jax.train.report import Reporter
from tests.helpers.events import values
from tests.helpers.wandb_run import read_run


@pytest.fixture()
def offline_wandb(tmp_path, monkeypatch):
    """No network and nothing written outside tmp_path."""
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_run_config_and_metrics_reach_an_offline_wandb_run(tmp_path, offline_wandb):
    log_dir = tmp_path / "run"
    cfg = load_train_config("demo", [f"log.dir={log_dir}", "log.every=1",
                                     "log.progress_bar=false", "seq_len=192",
                                     "log.wandb={project: mivl-test, name: demo-run}"])
    assert cfg.log.wandb == WandbConfig(project="mivl-test", name="demo-run")
    model_cfg = build_model_config(cfg)
    rep = Reporter(cfg, model_cfg, start=0, n_devices=1)
    for step, loss in ((1, 2.5), (2, 1.25)):
        metrics = {"loss": jnp.float32(loss), "grad_norm": jnp.float32(0.5),
                   "lr": jnp.float32(1e-3), "accuracy": jnp.float32(0.25),
                   "skipped": jnp.bool_(False), "tokens": jnp.int32(1000),
                   "real_tiles": jnp.int32(4)}
        rep.report(step, metrics, {})
    rep.close()

    config, history = read_run(log_dir / "wandb")
    assert config["seq_len"] == 192 and config["model"] == "tiny-qwen2"
    assert config["log"]["wandb"] == {"project": "mivl-test", "name": "demo-run",
                                      "entity": None, "mode": None}
    assert config["data"]["meta_path"] == "demo_data/stage2_meta.json"
    assert config["resolved_model"]["llm"]["vocab_size"] == 512
    assert [(h["_step"], h["loss"]) for h in history] == [(1, 2.5), (2, 1.25)]
    assert history[0]["lr"] == pytest.approx(1e-3) and "skipped" not in history[0]
    # TensorBoard and metrics.jsonl still get the same numbers.
    assert values(log_dir)["loss"] == [(1, 2.5), (2, 1.25)]
    rows = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [2.5, 1.25]


def test_wandb_config_is_checked():
    with pytest.raises(ConfigError, match="project"):
        load_train_config("demo", ["log.wandb={name: x}"])
    with pytest.raises(ConfigError, match="log.wandb.mode"):
        load_train_config("demo", ["log.wandb={project: p, mode: sometimes}"])
    assert configlib.to_dict(load_train_config("demo").log)["wandb"] is None
