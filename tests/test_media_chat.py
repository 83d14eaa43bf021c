"""Several images and videos through the chat session, the chat CLI and the evaluate CLI on a
tiny random checkpoint (mechanics, not content), and streamed text against the plain decode."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from mini_internvl_jax.cli import chat, evaluate
from mini_internvl_jax.data.tokenizer import load_tokenizer
from mini_internvl_jax.infer.generate import Generator
from mini_internvl_jax.infer.runtime import Runtime
from mini_internvl_jax.infer.session import ChatSession
from mini_internvl_jax.tools.demo import write_demo
from tests.helpers.checkpoints import save_checkpoint
from tests.helpers.video import write_video
from tests.test_generate import random_model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("media_chat")
    write_demo(root / "demo", num_stage1=2, num_stage2=2)
    tok_dir = root / "demo" / "tokenizers" / "qwen2"
    rng = np.random.RandomState(1)
    for name, size in (("a.png", (120, 40)), ("b.png", (40, 90))):
        Image.fromarray(rng.randint(0, 255, size[::-1] + (3,)).astype(np.uint8)).save(
            root / name)
    write_video(root / "clip.mp4", 12)
    model = random_model("tiny-qwen2", seed=7)
    save_checkpoint(model, root / "ckpt", tok_dir)
    runtime = Runtime(Generator(model), load_tokenizer(tok_dir), "Hermes-2", max_num=4)
    return root, runtime


def test_session_labels_images_and_frames_across_turns(assets):
    root, rt = assets
    per_tile = rt.generator.cfg.num_image_tokens
    ctx = rt.tokenizer.token_id("<IMG_CONTEXT>")
    s = ChatSession(rt, max_new_tokens=2)
    s.add_image(str(root / "a.png"))
    s.add_image(str(root / "b.png"))
    s.ask("Compare.")
    assert s.history[0][0] == "Image-1: <image>\nImage-2: <image>\nCompare."
    s.add_video(str(root / "clip.mp4"), num_frames=3)
    s.ask("And this?")
    assert s.history[1][0] == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nAnd this?"
    s.add_image(str(root / "a.png"))
    prompt, _ = rt.prompt(s.images, s._with_placeholders("Last."), s.history)
    # three images share max_num 4: 4 // 3 = 1 tile each; the video: 3 frames x 1 tile
    assert len(prompt.pixel_values) == 3 + 3
    assert int((np.asarray(prompt.input_ids) == ctx).sum()) == 6 * per_tile
    text = rt.tokenizer.decode(prompt.input_ids)
    assert text.count("Image-3: <img>") == 1 and text.count("Frame3: <img>") == 1


def test_a_prompt_past_the_models_positions_is_refused(assets):
    """tiny-qwen2 has 256 positions: 64 frames x 4 image tokens no longer fit (the answer
    would come from positions the model never saw); the turn's video is dropped."""
    root, rt = assets
    s = ChatSession(rt, max_new_tokens=2)
    s.add_video(str(root / "clip.mp4"), num_frames=64)
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens \(64 image tiles x 4 "
                                         r"tokens\), at least the model's 256 positions"):
        s.ask("What happens?")
    assert s.images == []


def test_streamed_text_equals_the_plain_decode(assets):
    """What `ask` writes piece by piece is the decode of the generated ids (the ids themselves
    equal `Generator.generate`'s, see test_generate)."""
    root, rt = assets
    s = ChatSession(rt, max_new_tokens=24)
    s.add_video(str(root / "clip.mp4"), num_frames=2)
    pieces = []
    reply = s.ask("Describe.", pieces.append)
    stops = rt.prompt([], "x")[1]
    assert len(reply.token_ids) == 24 or reply.token_ids[-1] in stops
    assert "".join(pieces) == rt.tokenizer.decode([i for i in reply.token_ids
                                                   if i not in stops])
    assert len(pieces) > 1


def test_chat_cli_video_and_images(assets, monkeypatch, capsys):
    root, _ = assets
    ckpt = str(root / "ckpt")
    lines = (f"What happens?\n/image {root / 'a.png'}\n/image {root / 'b.png'}\nCompare.\n"
             f"/video\n/video {root / 'clip.mp4'} x\n/video {root / 'gone.mp4'}\nBroken?\n"
             "/exit\nnever asked\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert chat.main(["--checkpoint", ckpt, "--video", str(root / "clip.mp4"), "--num-frames",
                      "2", "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.count("assistant> ") == 3  # the third fails on the missing video
    assert err.count("usage: /video PATH [N]") == 2
    assert err.count("error:") == 1 and "gone.mp4" in err
    assert chat.main(["--checkpoint", ckpt, "--num-frames", "0", "Q"]) == 2
    assert "--num-frames must be >= 1" in capsys.readouterr().err


def test_evaluate_cli_reads_multi_image_and_video_rows(assets, tmp_path, capsys):
    root, _ = assets
    data = tmp_path / "v.jsonl"
    rows = [{"id": "two", "image": [str(root / "a.png"), str(root / "b.png")],
             "question": "Same?", "answer": "no"},
            {"id": "vid", "video": str(root / "clip.mp4"), "num_frames": 3,
             "question": "Moving?", "answer": "yes"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    assert evaluate.main(["--checkpoint", str(root / "ckpt"), "--task", "vqa", "--data",
                          str(data), "--out", str(out), "--max-new-tokens", "2"]) == 0
    preds = [json.loads(x) for x in (tmp_path / "r.predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == ["two", "vid"]
    assert [p["media"] for p in preds] == [["a.png", "b.png"], ["video clip.mp4 x3"]]
    assert all(isinstance(p["prediction"], str) for p in preds)
    res = json.loads(out.read_text())
    assert res["num_items"] == 2 and [r["id"] for r in res["items"]] == ["two", "vid"]
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"video": "x.mp4", "num_frames": 0, "question": "Q",
                               "answer": "a"}) + "\n")
    assert evaluate.main(["--checkpoint", str(root / "ckpt"), "--task", "vqa", "--data",
                          str(bad), "--out", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: field 'num_frames' must be a positive integer" in err
