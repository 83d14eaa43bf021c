"""Paths on an object store (an offline in-memory `gs://`, tests/helpers/object_store.py): staged
folder writes committed by a last marker, converted/exported model folders written to it, model
folders of every kind (Hugging Face, converted, a training run) and training data + tokenizer read
from it. Each result is checked against the same work done on local disk."""

import dataclasses
import json
import tempfile

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from mini_internvl_jax import fileio, load_pretrained
from mini_internvl_jax.checkpoints.checkpointer import Checkpointer, run_meta
from mini_internvl_jax.checkpoints.resolve import open_source
from mini_internvl_jax.configlib import read_preset
from mini_internvl_jax.convert.errors import CheckpointReadError
from mini_internvl_jax.convert.exporter import export_to_hf
from mini_internvl_jax.convert.importer import convert_hf_to_orbax
from mini_internvl_jax.data import DataConfig, build_train_iterator
from mini_internvl_jax.data.errors import DataError
from mini_internvl_jax.data.shards import build_shards, verify_shards
from mini_internvl_jax.data.sources import read_meta
from mini_internvl_jax.tools.demo import write_demo
from mini_internvl_jax.train.config import train_config_from_dict
from mini_internvl_jax.train.init_from import InitError, model_config
from mini_internvl_jax.train.metrics import MetricsLog
from mini_internvl_jax.train.resume import data_fingerprint
from tests.helpers import object_store
from tests.helpers.checkpoints import native_model, read_tensors, write_original
from tests.helpers.events import values


@pytest.fixture()
def gcs():
    object_store.install()
    yield
    object_store.MemoryGCS.store.clear()


def test_staged_folder_is_committed_last_and_never_half_replaced(gcs, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where staging folders go
    out = "gs://bucket/runs/out"
    with fileio.atomic_folder(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_text("alpha")
        (tmp / "sub" / "b.bin").write_bytes(b"\x00\x01")
        assert not epath.Path(out).exists()  # nothing is visible before the block ends
    assert epath.Path(out, "a.txt").read_text() == "alpha"
    assert epath.Path(out, "sub", "b.bin").read_bytes() == b"\x00\x01"
    assert fileio.is_committed(out)
    assert not list(tmp_path.iterdir())  # the staging folder is gone

    with pytest.raises(FileExistsError, match="already exists"):
        with fileio.atomic_folder(out):
            pass
    with pytest.raises(RuntimeError, match="boom"), fileio.atomic_folder("gs://bucket/f") as tmp:
        (tmp / "x").write_text("x")
        raise RuntimeError("boom")
    assert not epath.Path("gs://bucket/f").exists()

    with fileio.atomic_folder(out, overwrite=True) as tmp:
        (tmp / "c.txt").write_text("gamma")
    assert not epath.Path(out, "a.txt").exists() and fileio.is_committed(out)

    # An upload cut off half way leaves a folder without the marker: readers can tell.
    real = fileio.upload_file
    monkeypatch.setattr(fileio, "upload_file", object_store.failing_at(real, 2))
    with pytest.raises(OSError, match="reset"), fileio.atomic_folder("gs://bucket/cut") as tmp:
        for k in range(3):
            (tmp / f"{k}.txt").write_text(str(k))
    assert epath.Path("gs://bucket/cut/0.txt").exists()
    assert not fileio.is_committed("gs://bucket/cut")
    with pytest.raises(fileio.IncompleteFolderError, match="gs://bucket/cut .*cut off"):
        fileio.check_complete("gs://bucket/cut")
    monkeypatch.setattr(fileio, "upload_file", real)
    fileio.check_complete(out)  # committed
    object_store.upload(tmp_path, "gs://bucket/copied")  # by another tool: no markers at all
    fileio.check_complete("gs://bucket/copied")

    fileio.write_atomic("gs://bucket/reports/score.json", '{"acc": 1}')
    assert epath.Path("gs://bucket/reports/score.json").read_text() == '{"acc": 1}'


def test_converted_and_exported_folders_written_to_the_store(gcs, tmp_path):
    model, hf_cfg = native_model("qwen2")
    write_original(tmp_path / "hf", model, hf_cfg, "qwen2")
    convert_hf_to_orbax(tmp_path / "hf", tmp_path / "local")
    convert_hf_to_orbax(tmp_path / "hf", "gs://bucket/conv")
    assert fileio.is_committed("gs://bucket/conv")
    names = object_store.download("gs://bucket/conv", tmp_path / "down")

    def layout(names):  # OCDBT data files are named by content and chunked differently per run
        return sorted(n for n in names if "/d/" not in n and n != fileio.COMMIT_MARKER)

    assert layout(names) == layout(object_store.local_names(tmp_path / "local"))
    a, b = load_pretrained(tmp_path / "local"), load_pretrained(tmp_path / "down")
    for (pa, va), (pb, vb) in zip(sorted(_params(a)), sorted(_params(b)), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(va, vb, err_msg=pa)

    export_to_hf(tmp_path / "local", "gs://bucket/hf-out")
    object_store.download("gs://bucket/hf-out", tmp_path / "hf-down")
    want, got = read_tensors(tmp_path / "hf"), read_tensors(tmp_path / "hf-down")
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _params(model):
    return [(".".join(map(str, p)), np.asarray(v.get_value()))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def _assert_same_params(model, want):
    got = dict(_params(model))
    assert got.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_model_folders_of_every_kind_read_from_the_store(gcs, tmp_path, monkeypatch, capsys):
    model, hf_cfg = native_model("qwen2")
    write_original(tmp_path / "hf", model, hf_cfg, "qwen2")
    local = load_pretrained(tmp_path / "hf")
    want = dict(_params(local))
    object_store.upload(tmp_path / "hf", "gs://bucket/hf")

    # Converter input and output on the store; then each folder read back from there.
    convert_hf_to_orbax("gs://bucket/hf", "gs://bucket/conv")
    info = json.loads(epath.Path("gs://bucket/conv/conversion.json").read_text())
    assert info["source"] == "gs://bucket/hf" and info["source_checkpoint"].startswith("gs://")
    convert_hf_to_orbax(tmp_path / "hf", tmp_path / "conv")
    object_store.upload(tmp_path / "conv", "gs://bucket/copied")  # gcloud storage cp: no marker
    for uri in ("gs://bucket/hf", "gs://bucket/conv", "gs://bucket/copied"):
        _assert_same_params(load_pretrained(uri), want)
    assert open_source("gs://bucket/conv").model_config.name == "hf"  # the folder's own name
    assert capsys.readouterr().err.count("copying gs://bucket/hf ") == 1  # once per process
    export_to_hf("gs://bucket/conv", tmp_path / "hf-again")
    expected, exported = read_tensors(tmp_path / "hf"), read_tensors(tmp_path / "hf-again")
    assert exported.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(exported[k], expected[k], err_msg=k)

    # A conversion whose upload was cut off is refused by every reader, naming it.
    real = fileio.upload_file
    monkeypatch.setattr(fileio, "upload_file", object_store.failing_at(real, 3))
    with pytest.raises(OSError, match="reset"):
        convert_hf_to_orbax("gs://bucket/hf", "gs://bucket/cut")
    monkeypatch.setattr(fileio, "upload_file", real)
    with pytest.raises(CheckpointReadError, match="gs://bucket/cut is incomplete"):
        load_pretrained("gs://bucket/cut")
    with pytest.raises(CheckpointReadError, match="gs://bucket/cut is incomplete"):
        export_to_hf("gs://bucket/cut", tmp_path / "never")
    with pytest.raises(CheckpointReadError, match="does not exist"):
        load_pretrained("gs://bucket/nothing-here")

    # A training run on the store. Orbax writes commit_success.txt last into each step folder
    # (on GCS that is what tells a finished save); step 5 (other weights) lost it, as a save
    # cut off by a preemption would, so the latest readable step is 3.
    cfg = train_config_from_dict({"init_from": "gs://bucket/run",
                                  "compute": {"dtype": "float32", "scan_layers": False}})
    params = nnx.state(local, nnx.Param)
    ckpt = Checkpointer(str(tmp_path / "run"), keep=2, async_save=False)
    for step, tree in ((3, params), (5, jax.tree.map(lambda x: x + 1, params))):
        ckpt.save(step, params=tree, train={"step": np.int32(step)}, iterator=None,
                  meta=run_meta(cfg, local.cfg, step))
    ckpt.close()
    object_store.upload(tmp_path / "run", "gs://bucket/run")
    epath.Path("gs://bucket/run/5/commit_success.txt").unlink()
    source = open_source("gs://bucket/run")
    assert source.kind == "training_run" and source.model_config == local.cfg
    _assert_same_params(source.load(), want)
    assert model_config(cfg).llm == local.cfg.llm  # init_from resolves the run on the store
    with pytest.raises(CheckpointReadError, match=r"no finished step 5 \(finished: \[3\]\)"):
        open_source("gs://bucket/run", step=5)
    with pytest.raises(InitError, match="init_from gs://bucket/cut: .*incomplete"):
        model_config(dataclasses.replace(cfg, init_from="gs://bucket/cut"))


def test_training_data_tokenizer_and_shards_on_the_store(gcs, tmp_path):
    demo = tmp_path / "demo"
    write_demo(demo, num_stage1=2, num_stage2=12)
    object_store.upload(demo, "gs://bucket/demo")

    def batches(root):
        it = build_train_iterator(
            DataConfig(meta_path=f"{root}/stage2_meta.json", template="Hermes-2",
                       num_threads=1, batch_prefetch=0), tokenizer=f"{root}/tokenizers/qwen2",
            num_image_tokens=4, image_size=56, seq_len=256, batch_size=2, max_tiles=24, seed=0,
            shard_index=0, shard_count=1)
        return [next(it) for _ in range(2)]

    for a, b in zip(batches(str(demo)), batches("gs://bucket/demo"), strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    fingerprints = [data_fingerprint(train_config_from_dict(
        {"data": {"meta_path": f"{root}/stage2_meta.json"}, "tokenizer": f"{root}/tokenizers"}))
        for root in (demo, "gs://bucket/demo")]
    assert fingerprints[0] is not None and fingerprints[0] == fingerprints[1]
    epath.Path("gs://bucket/cfg/run.yaml").write_text("total_steps: 7\nmodel: mini-internvl-2b\n")
    assert read_preset("train", "gs://bucket/cfg/run.yaml") == {"total_steps": 7,
                                                              "model": "mini-internvl-2b"}

    local = build_shards(demo / "stage2_meta.json", tmp_path / "shards", progress=False)
    remote = build_shards("gs://bucket/demo/stage2_meta.json", "gs://bucket/shards",
                          progress=False)
    assert fileio.is_committed("gs://bucket/shards")
    shard_hashes = [[s["sha256"] for s in d["shards"]] for d in local["datasets"].values()]
    assert [[s["sha256"] for s in d["shards"]] for d in remote["datasets"].values()] == \
        shard_hashes
    verify_shards("gs://bucket/shards", progress=False)
    epath.Path("gs://bucket/shards", remote["datasets"]["demo_qa"]["shards"][0]["file"]
               ).write_bytes(b"x")
    with pytest.raises(Exception, match="demo_qa-00000"):
        verify_shards("gs://bucket/shards", progress=False)

    # Shards whose upload was cut off before its commit marker are refused, not half-read.
    epath.Path("gs://bucket/shards", fileio.UPLOAD_MARKER).write_bytes(b"")
    epath.Path("gs://bucket/shards", fileio.COMMIT_MARKER).unlink()
    for read in (lambda: read_meta("gs://bucket/shards/meta.json"),
                 lambda: verify_shards("gs://bucket/shards", progress=False)):
        with pytest.raises(DataError, match="gs://bucket/shards is incomplete"):
            read()


def test_metrics_and_tensorboard_logs_on_the_store(gcs, tmp_path):
    log = MetricsLog("gs://bucket/run/logs", tensorboard=True)
    log.write(10, {"loss": 2.0, "lr": 0.5})
    # Visible on the store while the run goes on, not only at the end.
    first = epath.Path("gs://bucket/run/logs/metrics.jsonl").read_text()
    assert [json.loads(x)["loss"] for x in first.splitlines()] == [2.0]
    log.write(20, {"loss": 1.0})
    log.close()
    again = MetricsLog("gs://bucket/run/logs", tensorboard=False, start_step=20)  # resumed
    again.write(30, {"loss": 0.5})
    again.close()
    object_store.download("gs://bucket/run/logs", tmp_path / "logs")
    rows = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(10, 2.0), (20, 1.0), (30, 0.5)]
    assert values(tmp_path / "logs")["loss"] == [(10, 2.0), (20, 1.0)]
