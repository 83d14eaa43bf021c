"""ArrayRecord shards (mivl-build-shards) and the dataset validator (mivl-validate-data).

Shards are read back and compared with the source JSONL lines and image files read directly;
the validator is run on hand-made rows whose faults are known in advance."""

import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from mini_internvl_jax.cli import build_shards as build_cli
from mini_internvl_jax.cli import validate_data as validate_cli
from mini_internvl_jax.data import DataConfig, DataError, build_train_iterator
from mini_internvl_jax.data.shards import build_shards, verify_shards
from mini_internvl_jax.data.sources import open_source, read_meta
from mini_internvl_jax.data.validate import validate_dataset
from mini_internvl_jax.tools.demo import write_demo

# The demo training preset's geometry (model tiny-qwen2): 56 px tiles of 4 image tokens.
GEOM = dict(image_size=56, num_image_tokens=4, seq_len=256, max_tiles=64)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "d"
    write_demo(root, num_stage1=4, num_stage2=24)
    return root


def _source_items(demo):
    """(dataset, JSONL object, image bytes) straight from the demo files, in file order."""
    out = []
    for name, entry in json.loads((demo / "stage2_meta.json").read_text()).items():
        for line in (demo / entry["annotation"]).read_text().splitlines():
            item = json.loads(line)
            names = item.get("image", [])
            names = [names] if isinstance(names, str) else names
            out.append((name, item, [(demo / "images" / n).read_bytes() for n in names]))
    return out


def _records(path):
    from array_record.python.array_record_module import ArrayRecordReader

    r = ArrayRecordReader(str(path))
    try:
        return r.read_all()
    finally:
        r.close()


def test_shards_hold_the_source_samples_and_train_the_same(demo, tmp_path):
    out = tmp_path / "shards"
    manifest = build_shards(demo / "stage2_meta.json", out, shard_bytes=12_000, progress=False)

    # Read back through the training reader: the same conversations and image bytes, in order.
    got = []
    for spec in read_meta(out / "meta.json"):
        assert spec.format == "array_record"
        src = open_source(spec)
        got += [(spec.name, src.read(i)) for i in range(len(src))]
    want = _source_items(demo)
    assert len(got) == len(want) == 24
    for (name, rec), (want_name, item, images) in zip(got, want, strict=True):
        assert name == want_name
        assert rec.conversations == item["conversations"]
        assert rec.images == images

    # Manifest: counts, sizes and hashes of the files on disk; shards balanced by bytes.
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["records"] == 24
    multi_shard = 0
    for name, d in manifest["datasets"].items():
        assert d["records"] == sum(1 for n, _, _ in want if n == name)
        assert d["skipped"] == []
        payload = []
        for s in d["shards"]:
            data = (out / s["file"]).read_bytes()
            assert s["sha256"] == hashlib.sha256(data).hexdigest()
            assert s["bytes"] == len(data)
            recs = _records(out / s["file"])
            assert s["records"] == len(recs) > 0
            payload.append([len(r) for r in recs])
        if len(payload) > 1:
            multi_shard += 1
            sums = [sum(p) for p in payload]
            assert max(sums) - min(sums) <= max(max(p) for p in payload)
    assert multi_shard >= 2

    # The built dataset trains: batches equal those of the JSONL dataset.
    def batches(meta):
        it = build_train_iterator(
            DataConfig(meta_path=str(meta), template="Hermes-2", num_threads=1,
                       batch_prefetch=0), tokenizer=str(demo / "tokenizers" / "qwen2"),
            num_image_tokens=4, image_size=56, seq_len=256, batch_size=2, max_tiles=24,
            seed=1, shard_index=0, shard_count=1)
        return [next(it) for _ in range(3)]

    for a, b in zip(batches(demo / "stage2_meta.json"), batches(out / "meta.json"),
                    strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_damaged_or_missing_shards_and_bad_sources_are_named(demo, tmp_path):
    out = tmp_path / "shards"
    m = build_shards(demo / "stage2_meta.json", out, shard_bytes=12_000, progress=False)
    verify_shards(out, progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        build_shards(demo / "stage2_meta.json", out, progress=False)

    text_shard = m["datasets"]["demo_text"]["shards"][0]["file"]
    (out / text_shard).write_bytes(b"truncated")
    [spec] = [s for s in read_meta(out / "meta.json") if s.name == "demo_text"]
    with pytest.raises(DataError, match=r"demo_text.*cannot open ArrayRecord"):
        open_source(spec)

    first, second = (s["file"] for s in m["datasets"]["demo_qa"]["shards"][:2])
    data = bytearray((out / first).read_bytes())
    data[len(data) // 3] ^= 0xFF
    (out / first).write_bytes(bytes(data))
    (out / second).unlink()
    with pytest.raises(DataError) as e:
        verify_shards(out / "manifest.json", progress=False)
    msg = str(e.value)
    assert msg.startswith("3 shard(s)")
    assert f"{first}: sha256" in msg and f"{second}: missing" in msg
    assert f"{text_shard}: 9 bytes" in msg
    with pytest.raises(DataError, match=r"demo_qa-00001-of-.*array_record"):
        read_meta(out / "meta.json")

    # A record whose image file is missing stops the build, naming the line and the file.
    src = tmp_path / "src"
    src.mkdir()
    lines = (demo / "stage2" / "qa.jsonl").read_text().splitlines()[:3]
    bad = json.loads(lines[1])
    bad["image"] = "gone.jpg"
    lines[1] = json.dumps(bad)
    (src / "qa.jsonl").write_text("\n".join(lines) + "\n")
    (src / "meta.json").write_text(json.dumps({"qa": {"root": str(demo / "images"),
                                                      "annotation": "qa.jsonl"}}))
    with pytest.raises(DataError, match=r"qa\.jsonl:2: missing_image: .*gone\.jpg"):
        build_shards(src / "meta.json", tmp_path / "o1", progress=False)
    assert not (tmp_path / "o1").exists()
    m = build_shards(src / "meta.json", tmp_path / "o1", skip_bad=True, progress=False)
    assert m["records"] == 2
    assert [(s["line"], s["reason"]) for s in m["datasets"]["qa"]["skipped"]] == [
        (2, "missing_image")]


def _jpeg(w, h, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


def _turns(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v}
            for k, v in enumerate(values)]


@pytest.fixture()
def bad_dataset(tmp_path):
    """A JSONL with one fault per line (None = a good line), and its meta."""
    (tmp_path / "ok.jpg").write_bytes(_jpeg(90, 60, 0))
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image" * 8)
    good = _jpeg(120, 80, 1)
    (tmp_path / "cut.jpg").write_bytes(good[:len(good) // 2])
    long_text = " ".join(f"word{k}" for k in range(400))
    rows = [
        ({"image": "ok.jpg", "conversations": _turns("<image>\nWhat?", "A picture.")}, None),
        ({"image": "nope.jpg", "conversations": _turns("<image>\nWhat?", "Nothing.")},
         "missing_image"),
        ({"image": "junk.jpg", "conversations": _turns("What?", "Junk.")}, "corrupt_image"),
        ({"image": "cut.jpg", "conversations": _turns("What?", "Half.")}, "corrupt_image"),
        ({"image": "ok.jpg", "conversations": _turns("<image> and <image>?", "One.")},
         "placeholder_mismatch"),
        ({"conversations": _turns("Hi", "Hello.")}, None),
        ({"image": "ok.jpg", "conversations": _turns(long_text + " <image>\nWhat?", "This.")},
         "too_long"),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]},
         "unknown_role"),
        ("{not json", "malformed_json"),
        ({"conversations": _turns("Say a lot.", long_text)}, "truncated"),
    ]
    lines = [r if isinstance(r, str) else json.dumps(r) for r, _ in rows]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"bad": {"annotation": "bad.jsonl"}}))
    return tmp_path / "meta.json", {k + 1: why for k, (_, why) in enumerate(rows)}


def test_validator_names_every_bad_sample(demo, bad_dataset, tmp_path, capsys):
    meta, expected = bad_dataset
    tok = str(demo / "tokenizers" / "qwen2")
    cfg = DataConfig(meta_path="unused", max_dynamic_patch=4)
    report = validate_dataset(meta, cfg, tokenizer=tok, template="Hermes-2", progress=False,
                              **GEOM)
    jsonl = str(meta.parent / "bad.jsonl")
    assert report.checked == len(expected)
    assert {(f.where, f.reason) for f in report.rejected} == {
        (f"{jsonl}:{line}", why) for line, why in expected.items()
        if why not in (None, "truncated")}
    assert [(f.where, f.reason) for f in report.truncated] == [
        (f"{jsonl}:{line}", "truncated") for line, why in expected.items() if why == "truncated"]
    assert not report.ok and report.counts()["corrupt_image"] == 2

    # The CLI: the demo preset's settings, every rejection printed, a JSONL report, exit 1.
    rc = validate_cli.main([str(meta), "--config", "demo", "--tokenizer", tok, "--no-progress",
                            "--report", str(tmp_path / "report.jsonl")])
    printed = capsys.readouterr().out
    assert rc == 1
    for line, why in expected.items():
        if why not in (None, "truncated"):
            assert f"REJECT {jsonl}:{line}: {why}: " in printed
    assert f"TRUNCATE {jsonl}:10: truncated" in printed
    assert "checked 10 samples: 7 rejected" in printed
    found = [json.loads(x) for x in (tmp_path / "report.jsonl").read_text().splitlines()]
    assert len(found) == 8 and {f["dataset"] for f in found} == {"bad"}


def test_validator_checks_shards_and_their_embedded_images(demo, bad_dataset, tmp_path,
                                                           capsys):
    meta, _ = bad_dataset
    # Keep the rows the builder can embed (it does not decode images): lines 1, 3, 6.
    lines = (meta.parent / "bad.jsonl").read_text().splitlines()
    (meta.parent / "few.jsonl").write_text("\n".join(lines[k] for k in (0, 2, 5)) + "\n")
    (meta.parent / "few.json").write_text(json.dumps({"few": {"annotation": "few.jsonl"}}))
    out = tmp_path / "shards"
    assert build_cli.main([str(meta.parent / "few.json"), str(out), "--no-progress"]) == 0
    assert "few: 3 records in 1 shard(s)" in capsys.readouterr().out
    assert build_cli.main([str(meta.parent / "few.json"), str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err

    tok = str(demo / "tokenizers" / "qwen2")
    report = validate_dataset(out, DataConfig(meta_path="unused"), tokenizer=tok,
                              template="Hermes-2", progress=False, **GEOM)
    shard = out / "few" / "few-00000-of-00001.array_record"
    assert [(f.where, f.reason) for f in report.rejected] == [
        (f"{shard} record 2", "corrupt_image")]

    os.truncate(shard, os.path.getsize(shard) - 1)
    rc = validate_cli.main([str(out / "manifest.json"), "--config", "demo", "--tokenizer", tok,
                            "--no-progress"])
    assert rc == 2 and "few-00000-of-00001.array_record: " in capsys.readouterr().err
