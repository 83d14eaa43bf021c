"""Multi-image and video inputs against InternVL2's rules, written out by hand from its code:
`get_index` / `load_video` (model card), `get_frame_indices` and `video_get_item` (training),
`multi_modal_multi_image_get_item` (tile budget max(1, max_num // n_images)), the model cards'
`Image-1: <image>\\n` and `Frame1: <image>\\n` prompts."""

import json

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from mini_internvl_jax.data import DataConfig, load_tokenizer, prepare_chat_inputs
from mini_internvl_jax.data.processing import SampleProcessor
from mini_internvl_jax.data.sources import Mixture, open_source, read_meta
from mini_internvl_jax.data.templates import DEFAULT_SYSTEM_MESSAGE
from mini_internvl_jax.data.video import (
    VideoRef,
    read_frames,
    segment_indices,
    train_frame_indices,
)
from mini_internvl_jax.infer.runtime import TextStream
from mini_internvl_jax.tools.demo import write_demo
from tests.helpers.video import decode_all, frame_index, write_video

SIZE, TOKENS = 56, 4  # tile size and tokens per tile of the tests' tiny geometry
MEAN = np.array([0.485, 0.456, 0.406])[:, None, None]
STD = np.array([0.229, 0.224, 0.225])[:, None, None]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_demo(root / "demo", num_stage1=2, num_stage2=2)
    write_video(root / "v16.mp4", 16)
    write_video(root / "v16.mkv", 16, container="mkv")
    rng = np.random.default_rng(0)
    for name, (w, h) in (("wide.png", (300, 100)), ("tall.png", (60, 200))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    return root


def normalized(tiles):
    return (np.asarray(tiles, np.float64).transpose(0, 3, 1, 2) / 255.0 - MEAN) / STD


def resized(rgb):
    return np.asarray(Image.fromarray(rgb).resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def phi3(assets):
    folder = assets / "demo" / "tokenizers" / "phi3"
    return load_tokenizer(folder), spm.SentencePieceProcessor(
        model_file=str(folder / "tokenizer.model"))


def expand(text, tiles_per_image):
    for n in tiles_per_image:
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (TOKENS * n) + "</img>", 1)
    return text


# ------------------------------------------------------------------ frame choice rules


def test_segment_indices_are_internvl_get_index():
    # int(start + seg/2 + round(seg*k)), seg = (end - start) / n, numpy's half-to-even round
    assert segment_indices(16, 8).tolist() == [0, 2, 4, 6, 8, 9, 11, 13]  # seg 15/8
    assert segment_indices(100, 8).tolist() == [6, 18, 31, 43, 56, 68, 80, 93]  # seg 99/8
    # bound (1 s, 3 s) at 10 fps: frames 10..30, seg 5
    assert segment_indices(100, 4, fps=10.0, bound=(1.0, 3.0)).tolist() == [12, 17, 22, 27]
    # a short video repeats frames rather than inventing any
    assert segment_indices(3, 8).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]  # seg 2/8


def test_train_frame_indices_are_internvl_get_frame_indices():
    rng = np.random.default_rng(0)
    # 20 frames, 4 intervals [0,4] [5,9] [10,14] [15,19]
    assert train_frame_indices(20, 4, rng, "middle") == [2, 7, 12, 17]
    seen = [set() for _ in range(4)]
    for _ in range(400):
        for k, i in enumerate(train_frame_indices(20, 4, rng, "rand")):
            seen[k].add(i)
    # choice(range(a, b)) with b the interval's last frame: a..b-1, never b
    assert seen == [set(range(5 * k, 5 * k + 4)) for k in range(4)]
    # fewer frames than asked: every frame once (intervals of one frame), then the last again
    assert train_frame_indices(3, 8, rng, "rand") == [0, 1, 2, 2, 2, 2, 2, 2]
    assert train_frame_indices(3, 8, rng, "middle") == [0, 1, 2, 2, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="'rand' or 'middle'"):
        train_frame_indices(3, 2, rng, "uniform")


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_read_frames_returns_the_chosen_frames(assets, container):
    """mp4 stores the frame count; Matroska does not (counted by decoding)."""
    path = assets / f"v16.{container}"
    seen = []

    def choose(n, fps):
        seen.append((n, fps))
        return [3, 0, 15, 15, 40]  # any order, repeats; 40 is past the end -> last frame

    frames = read_frames(str(path), choose)
    assert seen == [(16, 4.0)]
    assert [frame_index(np.asarray(f)) for f in frames.images] == [3, 0, 15, 15, 15]
    ref = decode_all(path)
    np.testing.assert_array_equal(np.asarray(frames.images[0]), ref[3])


# ------------------------------------------------------------------ chat / eval prompts


def test_two_images_prompt_tiles_and_ids(assets):
    tok, sp = phi3(assets)
    wide, tall = assets / "wide.png", assets / "tall.png"
    out = prepare_chat_inputs([str(wide), str(tall)], "Compare.", tokenizer=tok,
                              template="phi3-chat", image_size=SIZE, num_image_tokens=TOKENS,
                              max_num=12)
    want_prompt = (f"<|system|>\n{DEFAULT_SYSTEM_MESSAGE}<|end|><|user|>\n"
                   "Image-1: <image>\nImage-2: <image>\nCompare.<|end|><|assistant|>\n")
    assert out.prompt == want_prompt
    # budget 12 // 2 = 6 each. 300x100 (ratio 3): grid 3x1 + thumbnail (alone it would take
    # 6x2 at budget 12: equal ratio, more than half the area). 60x200 (0.3): 1x3 + thumbnail.
    assert out.num_tiles == [4, 4]
    im_w = Image.open(wide).convert("RGB")
    im_t = Image.open(tall).convert("RGB")
    w = np.asarray(im_w.resize((3 * SIZE, SIZE), Image.Resampling.BICUBIC))
    t = np.asarray(im_t.resize((SIZE, 3 * SIZE), Image.Resampling.BICUBIC))
    want = [w[:, k * SIZE:(k + 1) * SIZE] for k in range(3)] + [resized(np.asarray(im_w))] + [
        t[k * SIZE:(k + 1) * SIZE] for k in range(3)] + [resized(np.asarray(im_t))]
    np.testing.assert_allclose(out.pixel_values, normalized(want), atol=1e-5)
    assert out.input_ids.tolist() == [1] + sp.encode(expand(want_prompt, [4, 4]))
    alone = prepare_chat_inputs(str(wide), "Q", tokenizer=tok, template="phi3-chat",
                                image_size=SIZE, num_image_tokens=TOKENS, max_num=12)
    assert alone.num_tiles == [13] and "<|user|>\n<image>\nQ" in alone.prompt


def test_eight_frame_video_prompt_tiles_and_ids(assets):
    tok, sp = phi3(assets)
    path = assets / "v16.mp4"
    out = prepare_chat_inputs(VideoRef(str(path), 8), "What happens?", tokenizer=tok,
                              template="phi3-chat", image_size=SIZE, num_image_tokens=TOKENS)
    lines = "".join(f"Frame{k}: <image>\n" for k in range(1, 9))
    want_prompt = (f"<|system|>\n{DEFAULT_SYSTEM_MESSAGE}<|end|><|user|>\n{lines}"
                   "What happens?<|end|><|assistant|>\n")
    assert out.prompt == want_prompt
    assert out.num_tiles == [1] * 8  # one tile per frame, no thumbnail
    ref = decode_all(path)
    picked = [0, 2, 4, 6, 8, 9, 11, 13]  # get_index(16 frames, 8 segments), by hand above
    assert [frame_index(f) for f in (ref[i] for i in picked)] == picked
    np.testing.assert_allclose(out.pixel_values, normalized([resized(ref[i]) for i in picked]),
                               atol=1e-5)
    ids = out.input_ids.tolist()
    assert ids == [1] + sp.encode(expand(want_prompt, [1] * 8))
    assert ids.count(tok.token_id("<img>")) == 8 and ids.count(tok.token_id("</img>")) == 8
    assert ids.count(tok.token_id("<IMG_CONTEXT>")) == 8 * TOKENS
    with pytest.raises(ValueError, match="one per image and per video frame"):
        prepare_chat_inputs(VideoRef(str(path), 8), "<image> Q", tokenizer=tok,
                            template="phi3-chat", image_size=SIZE, num_image_tokens=TOKENS)
    with pytest.raises(ValueError, match="cannot read video.*nope.mp4"):
        prepare_chat_inputs(VideoRef(str(assets / "nope.mp4"), 2), "Q", tokenizer=tok,
                            template="phi3-chat", image_size=SIZE, num_image_tokens=TOKENS)


# ------------------------------------------------------------------ training samples


def _video_processor(root, rows, **cfg_kw):
    (root / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "meta.json").write_text(json.dumps({"vid": {"root": str(root / "clips"),
                                                        "annotation": "v.jsonl"}}))
    cfg = DataConfig(meta_path=str(root / "meta.json"), template="phi3-chat", **cfg_kw)
    mix = Mixture([open_source(s) for s in read_meta(root / "meta.json")])
    tok = load_tokenizer(root / "demo" / "tokenizers" / "phi3")
    return SampleProcessor(cfg, mix, tok, image_size=SIZE, num_image_tokens=TOKENS,
                           seq_len=512, max_tiles=40, seed=3)


@pytest.fixture()
def video_root(assets, tmp_path):
    (tmp_path / "clips").mkdir()
    write_video(tmp_path / "clips" / "a.mp4", 16)
    (tmp_path / "clips" / "junk.mp4").write_bytes(b"not a video" * 50)
    (tmp_path / "demo").symlink_to(assets / "demo")
    return tmp_path


def conv(question, answer="It moves."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_training_sample_from_a_jsonl_video_row(assets, video_root):
    proc = _video_processor(video_root, [
        {"video": "a.mp4", "conversations": conv("<video>\nWhat happens?")},
        {"video": "a.mp4", "conversations": conv("What happens?")},
        {"video": "a.mp4", "clip": [1.0, 3.0], "conversations": conv("Q")},
    ], min_num_frames=4, max_num_frames=4, frame_sampling="middle")
    s = proc((0, 0))
    # 16 frames, 4 intervals [0,3] [4,7] [8,11] [12,15], middles (a + b) // 2
    picked = [1, 5, 9, 13]
    ref = decode_all(video_root / "clips" / "a.mp4")
    np.testing.assert_array_equal(s.tiles, np.stack([resized(ref[i]) for i in picked]))
    assert [frame_index(t) for t in s.tiles] == picked and s.tile_flags.tolist() == [1] * 4
    lines = "".join(f"Frame{k}: <image>\n" for k in range(1, 5))
    text = expand(f"<|system|>\n{DEFAULT_SYSTEM_MESSAGE}<|end|><|user|>\n{lines}What happens?"
                  "<|end|><|assistant|>\nIt moves.<|end|>", [1] * 4)
    _, sp = phi3(assets)
    assert s.input_ids.tolist() == [1] + sp.encode(text)
    targets = s.labels[s.labels != -100]
    assert sp.decode(targets.tolist()) == "It moves.<|end|>"
    # without <video> the frames go in front of the first question: the same sample
    np.testing.assert_array_equal(proc((1, 1)).input_ids, s.input_ids)
    # clip [1 s, 3 s) at 4 fps: frames 4..11, intervals of 2 -> middles 0, 2, 4, 6 after 4
    assert [frame_index(t) for t in proc((2, 2)).tiles] == [4, 6, 8, 10]


def test_random_frame_sampling_is_seeded_and_follows_the_rule(video_root):
    proc = _video_processor(video_root, [
        {"video": "a.mp4", "conversations": conv("What happens?")}],
        min_num_frames=2, max_num_frames=6)
    counts, picks = set(), {}
    for plan in range(12):
        s = proc((plan, 0))
        n = len(s.tiles)
        counts.add(n)
        idx = [frame_index(t) for t in s.tiles]
        edges = np.linspace(0, 16, n + 1).astype(int)
        assert all(edges[k] <= i <= edges[k + 1] - 2 for k, i in enumerate(idx)), (n, idx)
        assert (s.input_ids == proc.ctx_id).sum() == TOKENS * n
        picks[plan] = idx
    assert counts <= set(range(2, 7)) and len(counts) > 1
    assert [frame_index(t) for t in proc((5, 0)).tiles] == picks[5]  # same draw again


@pytest.mark.parametrize("row,reason", [
    ({"video": "nope.mp4", "conversations": conv("Q")}, "missing_video"),
    ({"video": "junk.mp4", "conversations": conv("Q")}, "corrupt_video"),
    ({"video": "a.mp4", "conversations": conv("<image>\nQ")}, "placeholder_mismatch"),
    ({"video": "a.mp4", "conversations": conv("<video><video> Q")}, "placeholder_mismatch"),
    ({"video": "a.mp4", "image": "x.png", "conversations": conv("Q")}, "malformed_json"),
    ({"video": "a.mp4", "clip": [3, 1], "conversations": conv("Q")}, "malformed_json"),
    ({"video": 5, "conversations": conv("Q")}, "malformed_json"),
])
def test_bad_video_rows_are_skipped_with_a_reason(video_root, row, reason):
    proc = _video_processor(video_root, [row], min_num_frames=2, max_num_frames=2)
    out = proc((0, 0))
    assert out.reason == reason, out


def test_multi_image_row_without_placeholders_gets_image_labels(assets, video_root):
    (video_root / "clips" / "w.png").symlink_to(assets / "wide.png")
    (video_root / "clips" / "t.png").symlink_to(assets / "tall.png")
    proc = _video_processor(video_root, [
        {"image": ["w.png", "t.png"], "conversations": conv("Compare.")},
        {"image": ["w.png", "t.png"],
         "conversations": conv("Image-1: <image>\nImage-2: <image>\nCompare.")}],
        max_dynamic_patch=12)
    a, b = proc((0, 0)), proc((1, 1))
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert len(a.tiles) == 8  # 4 + 4: budget 12 // 2 per image, as in chat


# ------------------------------------------------------------------ streaming text


@pytest.mark.parametrize("kind", ["qwen2", "phi3"])
def test_text_stream_never_prints_partial_characters(assets, kind):
    tok = load_tokenizer(assets / "demo" / "tokenizers" / kind)
    text = "Grüße, 世界! 🙂 naïve café — ok.\n第二行"
    ids = tok.encode(text)
    # the tiny vocabularies split these characters into byte pieces
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    end = tok.token_id("<|im_end|>" if kind == "qwen2" else "<|end|>")
    stream = TextStream(tok, [end])
    pieces = [stream.push(i) for i in ids] + [stream.push(end), stream.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text
    assert sum(bool(p) for p in pieces) > 5  # it did stream, not print all at the end


@pytest.mark.parametrize("kind", ["qwen2", "phi3", "internlm2"])
def test_text_stream_adds_up_to_the_decode_of_any_ids(assets, kind):
    """Random ids (broken byte sequences, special tokens, leading-space pieces at every window
    start) still stream to exactly the full decode."""
    tok = load_tokenizer(assets / "demo" / "tokenizers" / kind)
    rng = np.random.default_rng(1)
    for _ in range(100):
        ids = rng.integers(0, tok.vocab_size, 30).tolist()
        stream = TextStream(tok, [])
        assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == tok.decode(ids)
