"""The chat CLI runs in-process on a tiny converted checkpoint (mechanics, not content: the
model is random). The evaluation CLI's tests are in test_eval_tasks_cli.py."""

import io

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mini_internvl_jax.cli import chat
from mini_internvl_jax.data.tokenizer import load_tokenizer
from mini_internvl_jax.infer.generate import Generator
from mini_internvl_jax.infer.runtime import Runtime
from mini_internvl_jax.infer.session import ChatSession
from mini_internvl_jax.tools.demo import write_demo
from tests.helpers.checkpoints import save_checkpoint
from tests.test_generate import random_model

QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_demo(root / "demo", num_stage1=2, num_stage2=4)
    tok_dir = root / "demo" / "tokenizers" / "qwen2"
    rng = np.random.RandomState(0)
    for name, size in (("wide.png", (100, 60)), ("small.png", (40, 40))):
        Image.fromarray(rng.randint(0, 255, size[::-1] + (3,)).astype(np.uint8)).save(
            root / name)
    model = random_model("tiny-qwen2", seed=5)
    save_checkpoint(model, root / "ckpt", tok_dir)
    runtime = Runtime(Generator(model), load_tokenizer(tok_dir), "Hermes-2", max_num=12)
    return root, tok_dir, model, runtime


def test_chat_streams_the_answer_and_stops_at_the_end_token(assets, capsys):
    """Greedy tokens t0 t1 t2 ... of the random model; with the output columns of t2 and
    <|im_end|> swapped, greedy decoding must print decode(t0 t1) and stop there."""
    root, tok_dir, model, runtime = assets
    image = str(root / "wide.png")
    session = ChatSession(runtime, max_new_tokens=10)
    session.add_image(image)
    free = session.ask(QUESTION).token_ids
    im_end = runtime.tokenizer.find_token("<|im_end|>")
    k = free.index(free[2])
    assert im_end not in free[:k + 1] and len(free) == 10

    head = np.asarray(model.llm.lm_head[...]).copy()
    head[:, [free[k], im_end]] = head[:, [im_end, free[k]]]
    swapped = nnx.clone(model)
    swapped.llm.lm_head[...] = head
    ckpt = root / "ckpt_swapped"
    save_checkpoint(swapped, ckpt, tok_dir)
    expected = runtime.tokenizer.decode(free[:k]) + "\n"

    argv = ["--checkpoint", str(ckpt), "--image", image, "--max-new-tokens", "10", QUESTION]
    assert chat.main(argv) == 0
    assert capsys.readouterr().out == expected
    # the same through parameters sharded over two devices
    assert chat.main(["mesh.tensor=2"] + argv) == 0
    assert capsys.readouterr().out == expected


def test_interactive_multi_turn(assets, monkeypatch, capsys):
    root, _, _, _ = assets
    ckpt = root / "ckpt"
    lines = (f"/image {root / 'small.png'}\n{QUESTION}\nAnd the colour?\n/bogus\n"
             f"/image {root / 'nope.png'}\nStill there?\nAgain?\n/reset\nHi\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert chat.main(["--checkpoint", str(ckpt), "--max-new-tokens", "4", "--temperature",
                      "0.8", "--top-k", "20"]) == 0
    out, err = capsys.readouterr()
    # 5 turns; the one with the unreadable image fails and that image is dropped
    assert out.count("assistant> ") == 5
    assert err.count("error:") == 1 and "nope.png" in err
    assert "unknown command /bogus" in err and "cleared" in err

    bad = chat.main(["--checkpoint", str(ckpt), "--image", str(root / "missing.png"), "Q"])
    assert bad == 2 and "missing.png" in capsys.readouterr().err
