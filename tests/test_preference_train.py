"""MPO through the trainer on the demo folder's preference pairs (tiny model, CPU).

- BCO's running reward shift is training state: a run killed after step 2 and resumed from its
  checkpoint continues with the same delta and the same losses as an uninterrupted run.
- Precomputed reference log-probs (a first pass, stored as JSON) give the losses of the
  on-device reference model.
- (slow) The `mpo_demo` preset raises reward accuracy above chance.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from mini_internvl_jax.tools.demo import write_demo
from mini_internvl_jax.train import trainer
from mini_internvl_jax.train.config import load_train_config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpo") / "demo"
    write_demo(root, num_stage1=2, num_stage2=24)
    return root


def _cfg(demo, *over):
    return load_train_config("mpo_demo", [
        f"tokenizer={demo}/tokenizers/qwen2", f"data.meta_path={demo}/mpo_meta.json",
        "checkpoint.dir=null", "log.every=1", "preference.rpo_alpha=1.0",
        "batch_size=2", "optim.grad_accum=2", "max_tiles=8", "data.max_samples_per_row=1",
        *over])


def _run(cfg, **kw):
    return trainer.run(cfg, devices=jax.devices()[:1], **kw)


def _pick(run, key):
    return np.array([h[key] for h in run.history])


def test_bco_delta_and_losses_resume_exactly(demo, tmp_path):
    ckpt = tmp_path / "ckpt"
    over = [f"checkpoint.dir={ckpt}", "checkpoint.every=2", "total_steps=4"]
    full = _run(_cfg(demo, *over))
    assert [h["step"] for h in full.history] == [1, 2, 3, 4]
    delta = _pick(full, "pref/bco_delta")
    assert np.all(np.diff(delta[1:]) != 0)  # BCO's shift moves every step
    shutil.rmtree(ckpt / "4")  # as if killed after saving step 2
    resumed = _run(_cfg(demo, *over))
    assert [h["step"] for h in resumed.history] == [3, 4]
    for key in ("loss", "pref/bco_delta", "pref/loss_bco_pair", "pref/rewards_margin"):
        np.testing.assert_allclose(_pick(resumed, key), _pick(full, key)[2:], rtol=1e-6,
                                   atol=1e-7, err_msg=key)


@pytest.mark.slow  # the step and the resumed trainer path are covered above
def test_precomputed_reference_matches_the_reference_model(demo, tmp_path):
    table = tmp_path / "ref.json"
    on_device = _run(_cfg(demo, "total_steps=2"))
    pre = _run(_cfg(demo, "total_steps=2", "preference.reference=precomputed",
                    f"preference.ref_logps_path={table}"))
    assert len(json.loads(table.read_text())["pairs"]) >= 8
    for key in ("loss", "pref/bco_delta", "pref/rewards_margin"):
        np.testing.assert_allclose(_pick(pre, key), _pick(on_device, key), rtol=1e-5,
                                   atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_mpo_demo_raises_reward_accuracy_above_chance(demo):
    run = _run(load_train_config("mpo_demo", [
        f"tokenizer={demo}/tokenizers/qwen2", f"data.meta_path={demo}/mpo_meta.json",
        "checkpoint.dir=null"]))
    acc = _pick(run, "accuracy")
    assert acc[:2].max() == 0.0  # policy = reference: no margin yet
    assert acc[-12:].mean() > 0.65, acc


def test_shards_and_validator_accept_preference_pairs(demo, tmp_path):
    from mini_internvl_jax.data.config import DataConfig
    from mini_internvl_jax.data.shards import build_shards
    from mini_internvl_jax.data.sources import open_source, read_meta
    from mini_internvl_jax.data.validate import validate_dataset

    rows = [json.loads(x) for x in (demo / "mpo" / "pairs.jsonl").read_text().splitlines()]
    build_shards(demo / "mpo_meta.json", tmp_path / "shards", progress=False)
    [spec] = read_meta(tmp_path / "shards" / "meta.json")
    src = open_source(spec)
    recs = [src.read(i) for i in range(len(src))]
    assert [(r.conversations[0]["value"], r.conversations[1]["value"], r.rejected)
            for r in recs] == [(x["question"], x["chosen"], x["rejected"]) for x in rows]
    assert all(len(r.images) == 1 and isinstance(r.images[0], bytes) for r in recs)

    cfg = DataConfig(meta_path="unused", template="Hermes-2", max_dynamic_patch=2)
    kw = dict(tokenizer=str(demo / "tokenizers" / "qwen2"), image_size=56, num_image_tokens=4,
              max_tiles=8, progress=False)
    assert validate_dataset(tmp_path / "shards", cfg, seq_len=256, **kw).ok
    # A rejected answer too long for seq_len is reported, not only the chosen one.
    (demo / "bad").mkdir(exist_ok=True)
    long = dict(rows[0], rejected=" ".join(["word"] * 400))
    (demo / "bad" / "pairs.jsonl").write_text(json.dumps(long) + "\n")
    meta = json.loads((demo / "mpo_meta.json").read_text())
    meta["demo_pairs"]["annotation"] = "bad/pairs.jsonl"
    (demo / "bad_meta.json").write_text(json.dumps(meta))
    report = validate_dataset(demo / "bad_meta.json", cfg, seq_len=256, **kw)
    assert report.checked == 1 and (report.truncated or report.rejected)
