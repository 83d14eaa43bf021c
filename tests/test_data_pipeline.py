"""The Grain pipeline end to end: resume (Orbax), sharding, bad input, sources, demo, inference."""

import hashlib
import io
import json
import logging
import re
import time

import grain
import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.data import (
    DataConfig,
    DataError,
    build_train_iterator,
    data_config_from_dict,
    get_iterator_state,
    load_tokenizer,
    prepare_chat_inputs,
    set_iterator_state,
)
from mini_internvl_jax.data.pipeline import EpochPlan
from mini_internvl_jax.data.processing import SampleProcessor
from mini_internvl_jax.data.sources import (
    Mixture,
    encode_record,
    open_source,
    read_meta,
    write_array_record,
)
from mini_internvl_jax.data.templates import get_template, render
from mini_internvl_jax.tools.demo import write_demo
from tests.test_data_tiling import brute_grid, brute_tiles

GEOM = dict(num_image_tokens=4, image_size=56, seq_len=256, batch_size=2, max_tiles=24)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "d"
    write_demo(root, num_stage1=40, num_stage2=48)
    return root


def _iter(cfg, tok, seed=0, shard=(0, 1), **geom):
    """Iterator; the model's template (Hermes-2) fills in when the config has none."""
    g = dict(GEOM, **geom)
    return build_train_iterator(cfg, tokenizer=tok, seed=seed, shard_index=shard[0],
                                shard_count=shard[1], template="Hermes-2", **g)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_via_orbax_is_exact(demo, tmp_path):
    import orbax.checkpoint as ocp

    tok = load_tokenizer(demo / "tokenizers" / "qwen2")
    cfg = DataConfig(meta_path=str(demo / "stage2_meta.json"), template="Hermes-2",
                     num_threads=2, pack_lookahead=3)
    it = _iter(cfg, tok)
    for _ in range(5):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False))
    mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it),
                                         meta=ocp.args.JsonSave({"step": 5})))
    mngr.wait_until_finished()
    state = get_iterator_state(it)
    want = [next(it) for _ in range(4)]

    again = _iter(cfg, tok)
    r = mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(again),
                                                meta=ocp.args.JsonRestore()))
    assert r.meta == {"step": 5}
    for a in want:
        _assert_same(a, next(again))
    third = _iter(cfg, tok)
    set_iterator_state(third, state)
    _assert_same(want[0], next(third))


def test_resume_with_worker_processes(demo):
    tok = load_tokenizer(demo / "tokenizers" / "internlm2")
    cfg = DataConfig(meta_path=str(demo / "stage2_meta.json"), template="internlm2-chat",
                     num_workers=2, num_threads=1)
    it = _iter(cfg, tok)
    for _ in range(3):
        next(it)
    state = get_iterator_state(it)
    want = [next(it) for _ in range(3)]
    it.close()
    again = _iter(cfg, tok)
    set_iterator_state(again, state)
    got = [next(again) for _ in range(3)]
    again.close()
    for a, b in zip(want, got, strict=True):
        _assert_same(a, b)


def _text_dataset(folder, n):
    lines = [json.dumps({"conversations": [{"from": "human", "value": f"Item {k}: next?"},
                                           {"from": "gpt", "value": f"{k + 1}."}]})
             for k in range(n)]
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "meta.json").write_text(json.dumps({"items": {"annotation": "items.jsonl"}}))
    return folder / "meta.json"


def _items_in(batch, tok):
    out = []
    for b in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][b]
        for sid in range(1, seg.max() + 1):
            text = tok.decode(batch["input_ids"][b][seg == sid])
            out += [int(m) for m in re.findall(r"Item (\d+):", text)]
    return out


def test_two_shards_cover_each_sample_once_per_epoch(demo, tmp_path):
    meta = _text_dataset(tmp_path, 37)
    tok = load_tokenizer(demo / "tokenizers" / "qwen2")
    cfg = DataConfig(meta_path=str(meta), num_epochs=1)
    seen = [[k for batch in _iter(cfg, tok, seed=3, shard=(s, 2)) for k in _items_in(batch, tok)]
            for s in range(2)]
    assert sorted(seen[0] + seen[1]) == list(range(37))
    assert abs(len(seen[0]) - len(seen[1])) <= 1
    # Two epochs: the plan gives each shard its slice of a fresh permutation per epoch.
    plans = [EpochPlan(37, seed=3, shuffle=True, shard_index=s, shard_count=2, num_epochs=2)
             for s in range(2)]
    per_epoch = []
    for e in range(2):
        items = []
        for p in plans:
            n = len(p) // 2
            items += [p[i][1] for i in range(e * n, (e + 1) * n)]
        assert sorted(items) == list(range(37))
        per_epoch.append(items)
    assert per_epoch[0] != per_epoch[1]


def test_repeat_time_mixing(tmp_path):
    for name, n in (("a", 10), ("b", 10)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"conversations": [{"from": "human", "value": f"{name}{k}"},
                                          {"from": "gpt", "value": "ok"}]}) + "\n"
            for k in range(n)))
    (tmp_path / "meta.json").write_text(json.dumps({
        "a": {"annotation": "a.jsonl", "repeat_time": 2},
        "b": {"annotation": "b.jsonl", "repeat_time": 0.5}}))
    mix = Mixture([open_source(s) for s in read_meta(tmp_path / "meta.json")])
    assert len(mix) == 25
    plan = EpochPlan(len(mix), seed=0, shuffle=True, shard_index=0, shard_count=1,
                     num_epochs=1)
    picks = [mix.locate(plan[i][1]) for i in range(len(plan))]
    assert sorted(picks) == sorted([(0, k) for k in range(10)] * 2 + [(1, k) for k in range(5)])


def _jpeg(rng, w, h):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


BAD_CASES = {
    "good_image": ('{"image": "ok.jpg", "conversations": [{"from": "human", "value": "Hi"}, '
                   '{"from": "gpt", "value": "Yes."}]}', None),
    "missing": ('{"image": "nope.jpg", "conversations": [{"from": "human", "value": "Hi"}, '
                '{"from": "gpt", "value": "Yes."}]}', "missing_image"),
    "corrupt": ('{"image": "junk.jpg", "conversations": [{"from": "human", "value": "Hi"}, '
                '{"from": "gpt", "value": "Yes."}]}', "corrupt_image"),
    "truncated": ('{"image": "cut.jpg", "conversations": [{"from": "human", "value": "Hi"}, '
                  '{"from": "gpt", "value": "Yes."}]}', "corrupt_image"),
    "malformed": ('{"image": "ok.jpg", "conversations": [{"from": "human"', "malformed_json"),
    "no_conversations": ('{"image": "ok.jpg"}', "malformed_json"),
    "role": ('{"conversations": [{"from": "human", "value": "Hi"}, '
             '{"from": "bot", "value": "Yes."}]}', "unknown_role"),
    "order": ('{"conversations": [{"from": "human", "value": "Hi"}, '
              '{"from": "human", "value": "Yes."}]}', "bad_turn_order"),
    "placeholders": ('{"image": "ok.jpg", "conversations": [{"from": "human", "value": '
                     '"<image> and <image>"}, {"from": "gpt", "value": "Yes."}]}',
                     "placeholder_mismatch"),
    "text_with_placeholder": ('{"conversations": [{"from": "human", "value": "<image> hi"}, '
                              '{"from": "gpt", "value": "Yes."}]}', "placeholder_mismatch"),
    "literal_context_token": ('{"conversations": [{"from": "human", "value": "<IMG_CONTEXT>"}, '
                              '{"from": "gpt", "value": "Yes."}]}', "placeholder_mismatch"),
    "good_text": ('{"conversations": [{"from": "human", "value": "Hi"}, '
                  '{"from": "gpt", "value": "Yes."}]}', None),
}


@pytest.fixture()
def bad_data(tmp_path):
    rng = np.random.default_rng(0)
    good = _jpeg(rng, 120, 80)
    (tmp_path / "ok.jpg").write_bytes(good)
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all" * 10)
    (tmp_path / "cut.jpg").write_bytes(good[:len(good) // 2])
    (tmp_path / "bad.jsonl").write_text("\n".join(v[0] for v in BAD_CASES.values()) + "\n")
    (tmp_path / "meta.json").write_text(json.dumps({"bad": {"annotation": "bad.jsonl",
                                                            "root": "."}}))
    return tmp_path / "meta.json"


def test_bad_input_is_skipped_counted_and_logged(demo, bad_data, caplog):
    tok = load_tokenizer(demo / "tokenizers" / "qwen2")
    cfg = DataConfig(meta_path=str(bad_data), num_epochs=1, shuffle=False,
                     max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="mini_internvl_jax.data"):
        it = _iter(cfg, tok)
        batches = list(it)
    assert sum(int(b["stats_num_samples"]) for b in batches) == 2
    stats = it.get_state()["stats"]
    want = {}
    for _, reason in BAD_CASES.values():
        if reason:
            want[f"bad/{reason}"] = want.get(f"bad/{reason}", 0) + 1
    assert {k: v for k, v in stats.items() if k.startswith("bad/")} == want
    assert stats["bad"] == sum(int(b["stats_num_bad"]) for b in batches) == 10
    for line, (_, reason) in enumerate(BAD_CASES.values(), start=1):
        if reason:
            assert any(f"bad:{line} ({reason})" in r.getMessage() for r in caplog.records), (
                line, reason)


def test_bad_fraction_limit_stops(demo, bad_data):
    tok = load_tokenizer(demo / "tokenizers" / "qwen2")
    cfg = DataConfig(meta_path=str(bad_data), num_epochs=1, shuffle=False,
                     max_bad_fraction=0.5, bad_check_min_samples=4)
    with pytest.raises(DataError, match=r"records were bad .* > max_bad_fraction 0.5"):
        list(_iter(cfg, tok))


def _processor(meta, tok, template="Hermes-2", **cfg_kw):
    cfg = DataConfig(meta_path=str(meta), template=template, **cfg_kw)
    mix = Mixture([open_source(s) for s in read_meta(meta)])
    return mix, SampleProcessor(cfg, mix, tok, image_size=56, num_image_tokens=4, seq_len=256,
                                max_tiles=24, seed=0)


def _all_samples(meta, tok, **kw):
    mix, proc = _processor(meta, tok, **kw)
    out = {}
    for i in range(len(mix)):
        s = proc((i, i))
        out[s.input_ids.tobytes()] = s
    return out


def test_array_record_and_tfds_sources_match_jsonl(demo, tmp_path):
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    src = demo / "stage2"
    items = [json.loads(x) for f in ("qa.jsonl", "multi_image.jsonl", "text_only.jsonl")
             for x in (src / f).read_text().splitlines()[:4]]
    (tmp_path / "sub.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))

    def blobs(item):
        names = item.get("image", [])
        names = [names] if isinstance(names, str) else names
        return [(demo / "images" / n).read_bytes() for n in names]

    recs = []
    for k, item in enumerate(items):
        bare = {key: v for key, v in item.items() if key != "image"}
        # half embed their images, half keep paths
        recs.append(encode_record(bare, blobs(item)) if k % 2 else encode_record(item))
    write_array_record(tmp_path / "sub.array_record", recs)

    class DemoSub(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None  # defined in a test, not in a dataset package

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Sequence(tfds.features.Tensor(shape=(),
                                                                     dtype=np.object_)),
                "conversations": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for k, item in enumerate(items):
                yield k, {"image": blobs(item), "conversations": json.dumps(
                    item["conversations"])}

    DemoSub(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    root = str(demo / "images")
    (tmp_path / "meta.json").write_text(json.dumps({
        "j": {"root": root, "annotation": "sub.jsonl"},
        "a": {"root": root, "annotation": "sub.array_record"},
        "t": {"format": "tfds", "tfds_name": "demo_sub", "data_dir": "tfds"}}))
    specs = read_meta(tmp_path / "meta.json")
    assert [s.format for s in specs] == ["jsonl", "array_record", "tfds"]
    tok = load_tokenizer(demo / "tokenizers" / "phi3")
    per_source = []
    for spec in specs:
        (tmp_path / f"m_{spec.name}.json").write_text(json.dumps({spec.name: json.loads(
            (tmp_path / "meta.json").read_text())[spec.name]}))
        per_source.append(_all_samples(tmp_path / f"m_{spec.name}.json", tok,
                                       template="phi3-chat"))
    assert len(per_source[0]) == len(items)
    for other in per_source[1:]:
        assert other.keys() == per_source[0].keys()
        for key, s in per_source[0].items():
            np.testing.assert_array_equal(other[key].tiles, s.tiles)
            np.testing.assert_array_equal(other[key].labels, s.labels)


def test_processing_rules(demo, tmp_path):
    rng = np.random.default_rng(5)
    (tmp_path / "wide.jpg").write_bytes(_jpeg(rng, 300, 100))
    (tmp_path / "tall.jpg").write_bytes(_jpeg(rng, 60, 200))
    long_answer = " ".join(["word"] * 400)
    lines = [
        {"image": "wide.jpg", "conversations": [{"from": "human", "value": "  What?  "},
                                                 {"from": "gpt", "value": " A. "}]},
        {"image": ["wide.jpg", "tall.jpg"], "conversations": [
            {"from": "human", "value": "Compare."}, {"from": "gpt", "value": "B."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo."}]},
        {"conversations": [{"from": "system", "value": "Be terse."},
                           {"from": "gpt", "value": "dropped leading gpt turn"},
                           {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo."}]},
        {"image": "wide.jpg", "conversations": [{"from": "human", "value": "Long?"},
                                                 {"from": "gpt", "value": long_answer}]},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "meta.json").write_text(json.dumps({"p": {"annotation": "p.jsonl",
                                                          "max_dynamic_patch": 4}}))
    tok = load_tokenizer(demo / "tokenizers" / "internlm2")
    t = get_template("internlm2-chat")
    mix, proc = _processor(tmp_path / "meta.json", tok, template="internlm2-chat",
                           text_only_dummy_tile=True)
    s0, s1, s2, s3, s4 = (proc((i, i)) for i in range(5))
    wide = Image.open(tmp_path / "wide.jpg").convert("RGB")
    tall = Image.open(tmp_path / "tall.jpg").convert("RGB")
    # single image: budget 4 (the meta override); <image>\n is added first and InternLM2's
    # strip() runs after it (as in InternVL), so inner spaces after the newline stay
    np.testing.assert_array_equal(s0.tiles, brute_tiles(wide, brute_grid(300, 100, 1, 4, 56),
                                                        56, True))
    n0 = len(s0.tiles)
    text = render(t, [("human", "<image>\n  What?"), ("gpt", "A.")],
                  image_token_counts=[4 * n0])
    sp = spm.SentencePieceProcessor(model_file=str(demo / "tokenizers/internlm2/tokenizer.model"))
    assert s0.input_ids.tolist() == [1] + sp.encode(text)
    # two images: 4 // 2 = 2 tiles each at most, thumbnails included, in placeholder order
    want = np.concatenate([brute_tiles(wide, brute_grid(300, 100, 1, 2, 56), 56, True),
                           brute_tiles(tall, brute_grid(60, 200, 1, 2, 56), 56, True)])
    np.testing.assert_array_equal(s1.tiles, want)
    assert (s1.input_ids == 5).sum() == 4 * len(want)
    # text-only: one white dummy tile with flag 0 when configured
    assert s2.tiles.shape == (1, 56, 56, 3) and s2.tile_flags.tolist() == [0]
    assert (s2.tiles == 255).all() and (s2.input_ids != 5).all()
    # a leading system turn replaces the system message; a leading gpt turn is dropped
    assert "Be terse." in tok.decode(s3.input_ids)
    assert "dropped leading" not in tok.decode(s3.input_ids)
    # too long: truncated to seq_len after the image, last label -100
    assert s4.truncated and len(s4) == 256 and s4.labels[-1] == -100
    _, drop = _processor(tmp_path / "meta.json", tok, template="internlm2-chat",
                         overlong="drop")
    assert drop((4, 4)).reason == "too_long"


def test_jpeg_augmentation_is_deterministic_per_sample(demo, tmp_path):
    meta = json.loads((demo / "stage1_meta.json").read_text())
    meta["demo_captions"].update(root=str(demo / "images"), data_augment=True,
                                 annotation=str(demo / "stage1" / "captions.jsonl"))
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    tok = load_tokenizer(demo / "tokenizers" / "qwen2")
    _, proc = _processor(tmp_path / "meta.json", tok)
    _, plain = _processor(demo / "stage1_meta.json", tok)
    a, b, c = proc((7, 3)), proc((7, 3)), proc((8, 3))
    np.testing.assert_array_equal(a.tiles, b.tiles)
    assert not np.array_equal(a.tiles, plain((7, 3)).tiles)
    assert not np.array_equal(a.tiles, c.tiles)


def test_prepare_chat_inputs(demo):
    tok = load_tokenizer(demo / "tokenizers" / "phi3")
    path = sorted((demo / "images").glob("*.jpg"))[0]
    img = Image.open(path).convert("RGB")
    out = prepare_chat_inputs([img, str(path)], "Same?", [("Image-1: <image>\nImage-2: <image>",
                                                           "Hello.")],
                              tokenizer=tok, template="phi3-chat", image_size=56,
                              num_image_tokens=4, max_num=6)
    # two images share the budget: max(1, 6 // 2) tiles each (InternVL's multi-image rule)
    tiles = brute_tiles(img, brute_grid(*img.size, 1, 3, 56), 56, True)
    assert out.num_tiles == [len(tiles)] * 2
    want = (np.concatenate([tiles, tiles]).transpose(0, 3, 1, 2) / 255.0
            - np.array([0.485, 0.456, 0.406])[:, None, None]) / np.array(
                [0.229, 0.224, 0.225])[:, None, None]
    np.testing.assert_allclose(out.pixel_values, want, atol=1e-5)
    t = get_template("phi3-chat")
    msgs = [("human", "Image-1: <image>\nImage-2: <image>"), ("gpt", "Hello."),
            ("human", "Same?")]
    text = render(t, msgs, add_generation_prompt=True, image_token_counts=out.num_tiles and [
        4 * n for n in out.num_tiles])
    sp = spm.SentencePieceProcessor(model_file=str(demo / "tokenizers/phi3/tokenizer.model"))
    assert out.input_ids.tolist() == [1] + sp.encode(text)
    assert text.endswith("<|assistant|>\n")
    assert out.stop_token_ids[0] == tok.token_id("<|end|>")
    one = prepare_chat_inputs(img, "What?", tokenizer=tok, template="phi3-chat",
                              image_size=56, num_image_tokens=4)
    assert one.prompt.startswith("<|system|>") and "<|user|>\n<image>\nWhat?" in one.prompt
    with pytest.raises(ValueError, match="placeholder"):
        prepare_chat_inputs([img], "<image><image>", tokenizer=tok, template="phi3-chat")


def _tree_hash(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_and_quick(tmp_path):
    t = time.process_time()  # CPU time: robust to other load on a shared machine
    m = write_demo(tmp_path / "a", seed=1)
    assert time.process_time() - t < 10
    assert m["stage1"]["samples"] == 160 and m["stage2"]["samples"] == 160
    write_demo(tmp_path / "b", seed=1, num_stage1=160, num_stage2=160)
    assert _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "b")
    with pytest.raises(FileExistsError):
        write_demo(tmp_path / "a", seed=2)
    write_demo(tmp_path / "a", seed=2, num_stage1=8, num_stage2=8, force=True)
    assert _tree_hash(tmp_path / "a") != _tree_hash(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="not a demo folder"):
        write_demo(tmp_path / "c", force=True)
    assert not list(tmp_path.glob(".*tmp-*"))


def test_demo_images_and_meta(demo):
    specs = read_meta(demo / "stage2_meta.json")
    assert [s.name for s in specs] == ["demo_qa", "demo_multi_image", "demo_text"]
    sizes = [Image.open(p).size for p in (demo / "images").iterdir()]
    assert all(64 <= min(s) and max(s) <= 300 for s in sizes)
    assert len({round(w / h, 1) for w, h in sizes}) >= 4


def test_template_must_come_from_config_or_model(demo):
    cfg = DataConfig(meta_path=str(demo / "stage2_meta.json"))
    with pytest.raises(DataError, match="no chat template"):
        build_train_iterator(cfg, tokenizer=str(demo / "tokenizers" / "qwen2"), seed=0,
                             shard_index=0, shard_count=1, **GEOM)


def test_data_config_from_dict():
    cfg = data_config_from_dict({"meta_path": "m.json", "template": "phi3-chat"},
                                ["max_dynamic_patch=12", "loss_reduction=square"])
    assert cfg.max_dynamic_patch == 12 and cfg.loss_reduction == "square"
    with pytest.raises(ConfigError, match="unknown key"):
        data_config_from_dict({"meta_path": "m.json", "max_patch": 3})
    with pytest.raises(ConfigError, match="min_dynamic_patch"):
        data_config_from_dict({"meta_path": "m.json", "min_dynamic_patch": 7})
    with pytest.raises(ConfigError, match="template"):
        data_config_from_dict({"meta_path": "m.json", "template": "llama3"})


def test_meta_errors_name_the_problem(tmp_path):
    (tmp_path / "m.json").write_text('{"x": {"annotation": "nope.jsonl"}}')
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        open_source(read_meta(tmp_path / "m.json")[0])
    (tmp_path / "m.json").write_text('{"x": {"annotation": "a.txt"}}')
    with pytest.raises(DataError, match="cannot tell the format"):
        read_meta(tmp_path / "m.json")
    (tmp_path / "m.json").write_text('{"x": {"annotation": "a.jsonl", "repeat_time": 0}}')
    with pytest.raises(DataError, match="repeat_time"):
        read_meta(tmp_path / "m.json")
    with pytest.raises(DataError, match="does not exist"):
        read_meta(tmp_path / "none.json")
