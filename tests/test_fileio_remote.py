"""Paths on an object store (an offline in-memory `gs://`, tests/helpers/object_store.py): staged
folder writes committed by a last marker, converted/exported model folders, shards, and training
data + tokenizer read from it. Each result is checked against the same work done on local disk."""

import json
import tempfile

import numpy as np
import pytest
from etils import epath

from mini_internvl_jax import fileio, load_pretrained
from mini_internvl_jax.convert.exporter import export_to_hf
from mini_internvl_jax.convert.importer import convert_hf_to_orbax
from mini_internvl_jax.data import DataConfig, build_train_iterator
from mini_internvl_jax.data.demo import write_demo
from mini_internvl_jax.data.shards import build_shards, verify_shards
from mini_internvl_jax.train.metrics import MetricsLog
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
    calls = []

    def flaky(src, dest):
        calls.append(dest)
        if len(calls) == 2:
            raise OSError("connection reset")
        real(src, dest)

    monkeypatch.setattr(fileio, "upload_file", flaky)
    with pytest.raises(OSError, match="reset"), fileio.atomic_folder("gs://bucket/cut") as tmp:
        for k in range(3):
            (tmp / f"{k}.txt").write_text(str(k))
    assert epath.Path("gs://bucket/cut/0.txt").exists()
    assert not fileio.is_committed("gs://bucket/cut")
    monkeypatch.setattr(fileio, "upload_file", real)

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
    from flax import nnx

    return [(".".join(map(str, p)), np.asarray(v.get_value()))
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


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
