"""Real faults around shard folders: a read-only, full or size-limited destination for
mivl-build-shards, bad arguments and inputs for mivl-validate-data, and shards whose bytes
differ from their manifest at training time. Each gives a non-zero exit and one `error:` line
naming the path or field, with no traceback and nothing half-written. The commands run
in-process (`main(argv)`) on one small shard folder; training cases fail before a model is
built, so the whole module runs in seconds."""

import json
import shutil

import pytest

from mini_internvl_jax.cli import build_shards as build_cli
from mini_internvl_jax.cli import train as train_cli
from mini_internvl_jax.cli import validate_data as validate_cli
from mini_internvl_jax.data import DataConfig, DataError, build_train_iterator
from mini_internvl_jax.data.shards import build_shards
from mini_internvl_jax.tools.demo import write_demo
from tests.helpers.limited_disk import file_size_limit, limited_disk, read_only_folder


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "d"
    write_demo(root, num_stage1=2, num_stage2=24)
    return root


@pytest.fixture(scope="module")
def shards(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "shards"
    build_shards(demo / "stage2_meta.json", out, shard_bytes=12_000, progress=False)
    return out


def _one_error_line(capfd, *expect):
    err = capfd.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err[-3000:]
    for e in expect:
        assert e in err, err
    return err


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("case", ["read-only", "full disk", "ulimit -f", "shard-mb -5"])
def test_build_shards_write_failures_are_one_line(demo, tmp_path, capfd, case):
    meta = str(demo / "stage2_meta.json")
    capfd.readouterr()
    if case == "read-only":
        with read_only_folder(tmp_path / "ro") as ro:
            assert build_cli.main([meta, str(ro / "out"), "--no-progress"]) == 2
            _one_error_line(capfd, str(ro))
            assert not (ro / "out").exists() if ro.is_dir() else True
    elif case == "full disk":
        with limited_disk(tmp_path / "disk") as disk:
            with disk.full(16 << 10):
                assert build_cli.main([meta, str(disk.path / "out"), "--no-progress"]) == 2
            _one_error_line(capfd, f"{disk.message} writing {disk.path / 'out'}")
            assert list(disk.path.iterdir()) == []
    elif case == "ulimit -f":
        with file_size_limit(16 << 10):
            code = build_cli.main([meta, str(tmp_path / "out"), "--no-progress"])
        assert code == 2
        _one_error_line(capfd, f"file too large writing {tmp_path / 'out'}", "ulimit -f")
        assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    else:
        assert build_cli.main([meta, str(tmp_path / "out"), "--shard-mb", "-5"]) == 2
        _one_error_line(capfd, "--shard-mb must be between 1 and 65536", "got -5")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["manifest without datasets", "unwritable report",
                                  "folder as meta file", "report is a folder", "processes 0"])
def test_validate_data_refuses_bad_inputs_before_validating(demo, shards, tmp_path, capfd,
                                                            case):
    argv = ["--config", "demo", "--tokenizer", str(demo / "tokenizers" / "qwen2"),
            "--no-progress"]
    capfd.readouterr()
    if case == "manifest without datasets":
        copy = tmp_path / "copy"
        shutil.copytree(shards, copy)
        m = json.loads((copy / "manifest.json").read_text())
        del m["datasets"]
        (copy / "manifest.json").write_text(json.dumps(m))
        assert validate_cli.main([str(copy), *argv]) == 2
        _one_error_line(capfd, f"{copy / 'manifest.json'}: \"datasets\" must be")
    elif case == "unwritable report":
        with read_only_folder(tmp_path / "ro") as ro:
            report = ro / "report.jsonl"
            assert validate_cli.main([str(shards), *argv, "--report", str(report)]) == 2
            err = _one_error_line(capfd, str(ro))
        assert "checked" not in err  # refused before the samples were validated
    elif case == "folder as meta file":
        assert validate_cli.main([str(demo / "images"), *argv]) == 2
        _one_error_line(capfd, f"meta file {demo / 'images'} is a folder")
    elif case == "report is a folder":
        assert validate_cli.main([str(shards), *argv, "--report", str(tmp_path)]) == 2
        _one_error_line(capfd, str(tmp_path), "is a folder")
    else:
        assert validate_cli.main([str(shards), *argv, "--processes", "0"]) == 2
        _one_error_line(capfd, "--processes must be >= 1, got 0")
    assert "Traceback" not in capfd.readouterr().err


def _flip(path, where):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_shards_differing_from_their_manifest_are_refused_skipped_or_named(
        demo, shards, tmp_path, capfd):
    """A flipped byte: refused before reading by default (naming the shard), left out and
    counted with data.bad_shards=skip, and one line naming the dataset when unchecked."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    qa = manifest["datasets"]["demo_qa"]["shards"]
    assert len(qa) >= 2
    bad = copy / qa[0]["file"]
    _flip(bad, 0.4)
    tok = str(demo / "tokenizers" / "qwen2")
    argv = ["--config", "demo", f"tokenizer={tok}", f"data.meta_path={copy}/meta.json",
            f"checkpoint.dir={tmp_path}/run", "log.progress_bar=false"]
    capfd.readouterr()
    assert train_cli.main(argv) == 2
    _one_error_line(capfd, f"1 shard(s) of {copy} differ from manifest.json, so they are not "
                           "read", "data.bad_shards: skip", f"{bad}: sha256 ")
    assert not (tmp_path / "run").exists()  # refused before the model was built

    # skip: the other shards train; the one left out is named and counted
    cfg = DataConfig(meta_path=str(copy / "meta.json"), template="Hermes-2", bad_shards="skip",
                     shuffle=False, num_epochs=1)
    it = build_train_iterator(cfg, tokenizer=tok, image_size=56, num_image_tokens=4,
                              seq_len=256, batch_size=2, max_tiles=64, seed=0,
                              shard_index=0, shard_count=1)
    seen = sum(int((b["segment_ids"] > 0).any(-1).sum()) for b in it)
    err = capfd.readouterr().err
    assert f"warning: skipping 1 shard(s) ({qa[0]['records']} records) of {copy}" in err, err
    assert 0 < seen

    # unchecked: the damaged file is read, and its block checksum stops the run in one line
    _flip(bad, 0.5)
    cfg = DataConfig(meta_path=str(copy / "meta.json"), template="Hermes-2",
                     bad_shards="unchecked")
    with pytest.raises(DataError, match=r"dataset 'demo_qa': .*demo_qa-00000-of-.*Corrupted"):
        next(build_train_iterator(cfg, tokenizer=tok, image_size=56, num_image_tokens=4,
                                  seq_len=256, batch_size=2, max_tiles=64, seed=0,
                                  shard_index=0, shard_count=1))


def test_a_dataset_of_only_bad_records_says_so_not_seq_len(demo, tmp_path):
    """Every image missing: nothing can fit, and the advice is about the data, not the batch
    geometry (raising seq_len would not help)."""
    rows = [{"image": f"gone{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
        for i in range(3)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"annotation": "d.jsonl"}}))
    cfg = DataConfig(meta_path=str(tmp_path / "meta.json"), template="Hermes-2")
    with pytest.raises(DataError) as e:
        next(build_train_iterator(cfg, tokenizer=str(demo / "tokenizers" / "qwen2"),
                                  image_size=56, num_image_tokens=4, seq_len=256, batch_size=2,
                                  max_tiles=64, seed=0, shard_index=0, shard_count=1))
    assert "missing_image: 3" in str(e.value)
    assert "the records themselves are unusable" in str(e.value)
    assert "raise seq_len" not in str(e.value)
