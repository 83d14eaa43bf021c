"""Chat and evaluation CLIs run in-process on a tiny converted checkpoint (mechanics, not
content: the model is random)."""

import io
import json
import shutil

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mini_internvl_jax.cli import chat, evaluate
from mini_internvl_jax.convert.orbax_io import save_params, write_model_config
from mini_internvl_jax.data.demo import write_demo
from mini_internvl_jax.data.tokenizer import load_tokenizer
from mini_internvl_jax.infer import evaluation
from mini_internvl_jax.infer.generate import Generator
from mini_internvl_jax.infer.runtime import Runtime
from mini_internvl_jax.infer.session import ChatSession
from tests.helpers import events
from tests.test_generate import random_model

QUESTION = "What is in the image?"


def save_checkpoint(model, folder, tokenizer_dir):
    flat = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    folder.mkdir()
    save_params(folder / "params", flat)
    write_model_config(folder, model.cfg)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)


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
    assert chat.main(["--mesh", "tensor=2"] + argv) == 0
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


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(x) + "\n" for x in items))


def test_evaluate_cli_writes_predictions_and_scores(assets, tmp_path, capsys):
    root = assets[0]
    ckpt = root / "ckpt"
    data = tmp_path / "mmb.jsonl"
    write_jsonl(data, [
        {"id": "q1", "image": str(root / "small.png"), "question": "Which colour?",
         "options": {"A": "red", "B": "green", "C": "blue"}, "answer": "C", "hint": "Look."},
        {"id": "q2", "question": "Pick one.", "options": ["yes", "no"], "answer": "A"}])
    out = tmp_path / "preds.jsonl"
    assert evaluate.main(["--checkpoint", str(ckpt), "--task", "mmbench", "--data", str(data),
                          "--out", str(out), "--batch-size", "2", "--max-new-tokens", "3"]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["id"], r["rotation"]) for r in records] == [
        ("q1", 0), ("q1", 1), ("q1", 2), ("q2", 0), ("q2", 1)]
    assert [r["answer"] for r in records] == ["C", "B", "A", "A", "B"]
    summary = json.loads((tmp_path / "preds.score.json").read_text())
    assert summary == json.loads(capsys.readouterr().out)
    assert summary["num_items"] == 5 and summary["num_questions"] == 2
    per_q = {q: all(r["correct"] for r in records if r["id"] == q) for q in ("q1", "q2")}
    assert summary["circular_accuracy"] == sum(per_q.values()) / 2

    chart = tmp_path / "chart.jsonl"
    write_jsonl(chart, [{"image": str(root / "wide.png"), "question": "Max?", "answer": "12"},
                        {"question": "Min?", "answer": ["3%", "0.03"]}])
    assert evaluate.main(["--checkpoint", str(ckpt), "--task", "chartqa", "--data", str(chart),
                          "--out", str(tmp_path / "c.jsonl"), "--max-new-tokens", "2",
                          "--tensorboard", str(tmp_path / "tb"), "--tensorboard-step", "5"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["answers"] for r in recs] == [["12"], ["3%", "0.03"]]
    assert recs[0]["question"] == ("Max? Answer the question using a single word or phrase.")
    scores = json.loads((tmp_path / "c.score.json").read_text())
    tb = events.values(tmp_path / "tb")
    assert tb["eval/chartqa/relaxed_accuracy"] == [(5, pytest.approx(scores["relaxed_accuracy"]))]
    [(_, table)] = next(v for k, v in tb.items() if k.startswith("eval/chartqa/predictions"))
    assert table.count("\n") == 3 and "Max? Answer the question" in table  # header, rule, 2 rows


def test_evaluate_cli_reports_bad_input(assets, tmp_path, capsys):
    root = assets[0]
    data = tmp_path / "bad.jsonl"
    write_jsonl(data, [{"question": "Q", "options": ["a", "b"], "answer": "C"}])
    assert evaluate.main(["--checkpoint", str(root), "--task", "mmbench",
                          "--data", str(data)]) == 2
    assert "bad.jsonl:1: answer 'C' is not one of the 2 option letters" in capsys.readouterr().err


class Oracle:
    """Answers from the request alone, to check the scoring plumbing with known outcomes."""

    def __init__(self, fn):
        self.fn, self.batches = fn, []

    def __call__(self, batch):
        self.batches.append(len(batch))
        return [self.fn(r) for r in batch]


def test_run_evaluation_scores_known_answers(tmp_path):
    mmb = tmp_path / "m.jsonl"
    write_jsonl(mmb, [
        {"id": 1, "question": "Colour?", "options": ["red", "green", "blue", "white"],
         "answer": "C"},
        {"id": 2, "question": "Shape?", "options": {"A": "circle", "B": "square", "C": None},
         "answer": "B"}])
    reqs = evaluation.build_requests("mmbench", mmb)
    assert len(reqs) == 6  # 4 rotations + 2 (the empty option C is dropped)

    def knows_blue_guesses_a(r):
        if "Colour?" in r.question:  # always names the letter now holding "blue"
            return "ABCD"[list(r.options).index("blue")] + "."
        return "A"

    oracle = Oracle(knows_blue_guesses_a)
    records, summary = evaluation.run_evaluation("mmbench", reqs, oracle, batch_size=4)
    assert oracle.batches == [4, 2]
    assert summary["circular_accuracy"] == 0.5  # q2 fails on the rotation where B moved
    assert summary["accuracy_first_rotation"] == 0.5  # q2 rotation 0: "A" but answer is B

    vqa = tmp_path / "v.jsonl"
    write_jsonl(vqa, [{"question": "How many?", "answers": ["two"] * 3 + ["3"] * 7},
                      {"question": "What?", "answer": "a cat"}])
    answers = iter(["2", "Cat"])
    _, s = evaluation.run_evaluation("vqa", evaluation.build_requests("vqa", vqa),
                                     lambda b: [next(answers) for _ in b], batch_size=8)
    assert s["exact_match"] == 1.0
    assert s["vqa_accuracy"] == pytest.approx(((7 * 1 + 3 * 2 / 3) / 10 + 1.0) / 2)


@pytest.mark.parametrize("line,message", [
    ("not json", "not valid JSON"),
    ('{"image": "x.png"}', "missing field 'question'"),
    ('{"question": "Q", "answer": 3}', "field 'answer' must be a non-empty str or list"),
    ('{"question": "Q", "answer": "a", "image": 5}', "field 'image' must be a path"),
])
def test_bad_eval_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "ok", "answer": "a"}\n' + line + "\n")
    with pytest.raises(evaluation.EvalDataError, match=f"d.jsonl:2: .*{message}"):
        evaluation.build_requests("vqa", path)
