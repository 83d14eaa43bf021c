"""The benchmark evaluation CLI (`mivl-eval`) end to end on a random tiny model and tiny
fixture datasets, one per task family and input format: it runs, writes results, a
per-category table and TensorBoard events, and resumes an interrupted run without generating
finished items again."""

import base64
import json

import pytest

from mini_internvl_jax.cli import evaluate
from mini_internvl_jax.infer import eval_runner
from mini_internvl_jax.infer.generate import Generator
from mini_internvl_jax.infer.scorers.tasks import TASKS
from tests.helpers import events
from tests.helpers.eval_assets import png_bytes, write_checkpoint


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    ckpt = write_checkpoint(root)
    for i in range(3):
        (root / f"im{i}.png").write_bytes(png_bytes(i, (40 + 8 * i, 30)))
    return root, ckpt


class CountingGenerate:
    """Wraps Generator.generate: counts prompts, optionally raises on the Nth call."""

    def __init__(self, monkeypatch, fail_on_call=None):
        self.prompts, self.calls, self.fail_on_call = 0, 0, fail_on_call
        real = Generator.generate

        def generate(gen_self, prompts, *a, **k):
            self.calls += 1
            if self.calls == self.fail_on_call:
                raise KeyboardInterrupt  # a preemption in the middle of the run
            self.prompts += len(prompts)
            return real(gen_self, prompts, *a, **k)

        monkeypatch.setattr(Generator, "generate", generate)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(ckpt, task, data, out, *extra):
    return evaluate.main(["--checkpoint", str(ckpt), "--task", task, "--data", str(data),
                         "--out", str(out), "--max-new-tokens", "3", "--max-num", "1",
                         *extra])


def test_short_answer_run_resumes_after_preemption(assets, tmp_path, monkeypatch, capsys):
    root, ckpt = assets
    data = tmp_path / "docvqa.jsonl"
    write_jsonl(data, [{"questionId": i, "question": f"What is field {i}?",
                        "answers": ["x", f"{i}"], "image": str(root / f"im{i % 3}.png")}
                       for i in range(4)])
    out = tmp_path / "res.json"
    preds = tmp_path / "res.predictions.jsonl"
    crash = CountingGenerate(monkeypatch, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, "docvqa", data, out, "--batch-size", "2")
    first = preds.read_text().splitlines()
    assert [json.loads(x)["id"] for x in first] == ["0", "1"] and crash.prompts == 2
    assert not out.exists()

    resumed = CountingGenerate(monkeypatch)
    assert run(ckpt, "docvqa", data, out, "--batch-size", "2") == 0
    assert resumed.prompts == 2  # only the unfinished items
    lines = preds.read_text().splitlines()
    assert lines[:2] == first and [json.loads(x)["id"] for x in lines] == list("0123")
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:2] == ["category", "anls"] and "overall" in table
    res = json.loads(out.read_text())
    assert res["task"] == "docvqa" and res["num_items"] == 4 and len(res["items"]) == 4
    rec = json.loads(lines[0])
    assert rec["prompt"] == "What is field 0? Answer the question using a single word or phrase."

    # the same answers in one go, batch rows sharded over 2 devices (batch 1 -> 2 rows)
    again = CountingGenerate(monkeypatch)
    out2 = tmp_path / "mesh.json"
    assert run(ckpt, "docvqa", data, out2, "--batch-size", "1", "mesh.data=2") == 0
    assert again.calls == 2 and again.prompts == 4
    mesh_preds = [json.loads(x)["prediction"]
                  for x in (tmp_path / "mesh.predictions.jsonl").read_text().splitlines()]
    assert mesh_preds == [json.loads(x)["prediction"] for x in lines]
    assert json.loads(out2.read_text())["metrics"] == res["metrics"]

    # everything done: no model call, same results, also logged to TensorBoard at step 5
    idle = CountingGenerate(monkeypatch)
    tb_dir = tmp_path / "tb"
    assert run(ckpt, "docvqa", data, out, "--batch-size", "2", "--tensorboard", str(tb_dir),
               "--tensorboard-step", "5") == 0
    assert idle.calls == 0 and json.loads(out.read_text())["metrics"] == res["metrics"]
    tb = events.values(tb_dir)
    assert tb["eval/docvqa/anls"] == [(5, pytest.approx(res["metrics"]["anls"]))]
    [(_, scores)] = next(v for k, v in tb.items() if k.startswith("eval/docvqa/scores"))
    anls = res["metrics"]["anls"]
    assert scores.splitlines() == ["| category | anls | num_questions |", "|---|---|---|",
                                   f"| overall | {anls} |  |", f"| all | {anls} | 4 |"]
    [(_, table)] = next(v for k, v in tb.items() if k.startswith("eval/docvqa/predictions"))
    rows = table.splitlines()
    assert len(rows) == 6 and rows[0] == "| id | prompt | prediction | anls | category |"
    first = json.loads(lines[0])
    cell = first["prediction"].replace("|", "\\|").replace("\n", " ")
    assert rows[2] == f"| 0 | {first['prompt']} | {cell} | {res['items'][0]['anls']} | all |"


def _tsv(path, header, rows):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n"
                                                       for r in rows))


def _b64(i):
    return base64.b64encode(png_bytes(i)).decode()


def _parquet(path, columns):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path)
    return path


def _struct(i):
    return {"bytes": png_bytes(i), "path": None}


MC = "Answer with the option's letter from the given choices directly."
SHORT = "Answer the question using a single word or phrase."

# Every fixture has 4 items with one image each (MMMU: two), so that runs with batch size 2
# share one compiled generation shape and the suite stays fast. `answers` maps a question to
# an oracle answer; `expected` is the headline score those answers earn, worked out by hand.
FIXTURES = {
    "ai2d": dict(  # VLMEvalKit TSV: base64 images (row 4 shares row 1's), option columns
        write=lambda p: _tsv(p / "ai2d.tsv", ["index", "question", "A", "B", "C", "D", "answer",
                                              "image"],
                             [[1, "Which part?", "leaf", "root", "stem", "seed", "B", _b64(0)],
                              [2, "Which stage?", "egg", "larva", "pupa", "adult", "D", _b64(1)],
                              [3, "Which one?", "x", "y", "z", "w", "A", _b64(2)],
                              [4, "Which end?", "top", "bottom", "left", "right", "C", "1"]]),
        file="ai2d.tsv", category="overall",
        prompt="Which part?\nA. leaf\nB. root\nC. stem\nD. seed\n" + MC,
        # B right, "(D)" right by extraction, "y" (option B) wrong, "left" text right -> 3/4
        answers={"Which part?": "B", "Which stage?": "(D)", "Which one?": "y",
                 "Which end?": "left"}, expected=75.0),
    "ocrbench": dict(
        write=lambda p: _tsv(p / "ocr.tsv", ["index", "question", "answer", "category", "image"],
                             [[1, "Text one?", "['hello']", "Regular Text Recognition", _b64(0)],
                              [2, "Formula?", "['x^{2}']",
                               "Handwritten Mathematical Expression Recognition", _b64(1)],
                              [3, "Text two?", "['World']", "Artistic Text Recognition", _b64(2)],
                              [4, "Key?", "['12 USD']", "Key Information Extraction", _b64(0)]]),
        file="ocr.tsv", category="Text Recognition",
        # "HELLO there" hits, "x ^ {2}" hits (HME ignores spaces), "word" misses, "12 usd" hits
        answers={"Text one?": "HELLO there", "Formula?": "x ^ {2}", "Text two?": "word",
                 "Key?": "total 12 usd"}, expected=3),
    "mme": dict(  # lmms-lab/MME parquet: question_id names the image (acc+ groups by it)
        write=lambda p: _parquet(p / "mme.parquet", {
            "question_id": ["existence/1.png", "existence/1.png", "count/2.png", "count/2.png"],
            "question": ["Is there a dog? Please answer yes or no.",
                         "Is there a cow? Please answer yes or no.",
                         "Are there two cats? Please answer yes or no.",
                         "Are there three cats? Please answer yes or no."],
            "answer": ["Yes", "No", "Yes", "No"],
            "category": ["existence", "existence", "count", "count"],
            "image": [_struct(0), _struct(0), _struct(1), _struct(1)]}),
        file="mme.parquet", category="existence",
        prompt="Is there a dog? Please answer yes or no. " + SHORT,
        # existence both right: 100 + 100; count one right: 50 + 0 -> 250
        answers={"Is there a dog?": "Yes", "Is there a cow?": "No", "two cats": "Yes",
                 "three cats": "Yes"}, expected=250.0),
    "pope": dict(
        write=lambda p: write_jsonl(p / "pope.jsonl", [
            {"question_id": i, "question": f"Is there a {a} in the image?", "answer": lab,
             "image": f"im{i % 3}.png", "category": "random" if i < 2 else "popular"}
            for i, (a, lab) in enumerate([("cat", "yes"), ("dog", "no"), ("cow", "yes"),
                                          ("owl", "no")])]),
        file="pope.jsonl", category="popular",
        prompt="Is there a cat in the image? " + SHORT,
        # random: cat yes/yes, dog no/no -> F1 1; popular: cow no/yes, owl no/no -> F1 0
        answers={"cat": "Yes", "dog": "No, there is not.", "cow": "No", "owl": "no"},
        expected=50.0),
    "hallusion": dict(
        write=lambda p: write_jsonl(p / "hb.jsonl", [
            {"question": f"Is line {i} rising?", "gt_answer": str(i % 2), "category": "VD",
             "subcategory": "chart", "set_id": "0", "figure_id": str(i // 2),
             "question_id": str(i % 2), "image": f"im{i % 3}.png"} for i in range(4)]),
        file="hb.jsonl", category="VD/chart",
        prompt="Is line 0 rising? Please answer yes or no. " + SHORT,
        # truth no,yes,no,yes; answers no,yes,yes,yes -> 3 of 4 right
        answers={"line 0": "No", "line 1": "Yes.", "line 2": "Yes", "line 3": "yes"},
        expected=75.0),
    "mathvista": dict(
        write=lambda p: write_jsonl(p / "mv.jsonl", [
            {"pid": str(i), "query": "Hint: Please answer the question requiring an integer "
             f"answer at the end.\nQuestion: Problem {i}?",
             "question_type": "free_form", "answer_type": "integer", "answer": str(i),
             "image": f"im{i % 3}.png", "metadata": {"task": "math word problem"}}
            for i in range(3)] + [
            {"pid": "3", "query": "Hint: Please answer the question with the correct option letter."
             "\nQuestion: Problem 3?\nChoices:\n(A) 1\n(B) 2",
             "choices": ["1", "2"],
             "question_type": "multi_choice", "answer_type": "text", "answer": "2",
             "image": "im2.png", "metadata": {"task": "figure question answering"}}]),
        file="mv.jsonl", category="math word problem",
        # 0 right, "The answer is 1 cm." right, "3" wrong, "(B)" -> "2" right -> 3/4
        answers={"Problem 0": "0", "Problem 1": "The answer is 1 cm.", "Problem 2": "3",
                 "Problem 3": "(B)"}, expected=75.0),
    "mmmu": dict(  # MMMU parquet: image_1 / image_2 columns, multiple-choice and open
        write=lambda p: _parquet(p / "mmmu.parquet", {
            "id": [f"validation_Art_{i}" for i in range(2)]
            + [f"validation_Math_{i}" for i in range(2)],
            "question": ["<image 1> <image 2> Older?", "<image 1> <image 2> Larger?",
                         "<image 1> <image 2> What is x?", "<image 1> <image 2> What is y?"],
            "options": ["['left', 'right']", "['left', 'right']", "[]", "[]"],
            "answer": ["A", "B", "4", "['2.5', '5/2']"],
            "question_type": ["multiple-choice"] * 2 + ["open"] * 2,
            "image_1": [_struct(i) for i in range(4)],
            "image_2": [_struct(3 - i) for i in range(4)]}),
        file="mmmu.parquet", category="Math",
        prompt="<image 1> <image 2> Older?\nA. left\nB. right\n" + MC,
        # "(A)" right, "A" wrong, "x = 4" right, "2.50" right -> 3/4
        answers={"Older?": "(A)", "Larger?": "A", "What is x?": "x = 4", "What is y?": "2.50"},
        expected=75.0),
    "mmbench": dict(  # JSONL; CircularEval asks each question once per rotation
        write=lambda p: write_jsonl(p / "mmb.jsonl", [
            {"id": "q1", "image": "im0.png", "question": "Which colour?", "hint": "Look.",
             "options": {"A": "red", "B": "green", "C": "blue"}, "answer": "C"},
            {"id": "q2", "image": "im1.png", "question": "Pick one.",
             "options": ["yes", "no"], "answer": "A"}]),
        file="mmb.jsonl", category="overall", n=5,
        prompt="Look.\nWhich colour?\nA. red\nB. green\nC. blue\n" + MC,
        # "blue" is right in all 3 rotations; "A" only in the first of q2's 2 -> 1 of 2
        answers={"Which colour?": "blue", "Pick one.": "A"}, expected=50.0),
    "chartqa": dict(
        write=lambda p: write_jsonl(p / "chart.jsonl", [
            {"question": f"Value {i}?", "answer": a, "image": f"im{i % 3}.png"}
            for i, a in enumerate(["12", "100", "95.2", "Yes"])]),
        file="chart.jsonl", category="overall",
        # 12.5 (4.2 % off) right, 105 (5 %) right, 100 vs 95.2 (5.04 % of the reference)
        # wrong, "yes" right -> 3/4
        answers={"Value 0?": "12.5", "Value 1?": "105", "Value 2?": "100", "Value 3?": "yes"},
        expected=75.0),
    "vqa": dict(  # images optional
        write=lambda p: write_jsonl(p / "vqa.jsonl", [
            {"question": "How many?", "answers": ["two"] * 3 + ["3"] * 7, "image": "im0.png"},
            {"question": "What animal?", "answer": "a cat"},
            {"question": "What colour?", "answer": "blue", "image": "im1.png"},
            {"question": "Is it?", "answers": ["yes", "no"], "image": "im2.png"}]),
        file="vqa.jsonl", category="overall", images=False,
        # 0.9 (3 of 10 say 2), 1 (one answer: exact match), 0, (0 + 1/3) / 2
        answers={"How many?": "2", "What animal?": "Cat", "What colour?": "red",
                 "Is it?": "yes"}, expected=100 * (0.9 + 1 + 0 + 1 / 6) / 4),
}


def _oracle(answers):
    def answer(items):
        out = []
        for it in items:
            hits = [a for q, a in answers.items() if q in it.prompt]
            assert len(hits) == 1, it.prompt
            out += hits
        return out
    return answer


@pytest.mark.parametrize("task", sorted(FIXTURES))
def test_each_task_reads_its_format_and_scores_known_answers(task, tmp_path):
    """Without the model: the task's fields, prompt and scorer on oracle answers."""
    fx = FIXTURES[task]
    for i in range(3):
        (tmp_path / f"im{i}.png").write_bytes(png_bytes(i, (40 + 8 * i, 30)))
    fx["write"](tmp_path)
    t = TASKS[task]
    items = eval_runner.build_items(t, tmp_path / fx["file"])
    assert len(items) == fx.get("n", 4)
    assert all(it.images for it in items) or not fx.get("images", True)
    if "prompt" in fx:
        assert items[0].prompt == fx["prompt"]
    eval_runner.check_images(items)
    preds = tmp_path / "p.jsonl"
    eval_runner.generate_all(t, items, preds, _oracle(fx["answers"]), batch_size=3)
    done = eval_runner.load_predictions(preds, t, items)
    _, summary = eval_runner.score_all(t, items, done)
    assert summary["metrics"][t.headline] == pytest.approx(fx["expected"])
    assert fx["category"] in eval_runner.format_table(summary)


class Oracle:
    """Answers from the item alone and records the batch sizes it was asked."""

    def __init__(self, fn):
        self.fn, self.batches = fn, []

    def __call__(self, batch):
        self.batches.append(len(batch))
        return [self.fn(it) for it in batch]


def test_mmbench_rotations_batches_and_vqa_scores(tmp_path):
    mmb = tmp_path / "m.jsonl"
    write_jsonl(mmb, [
        {"id": 1, "question": "Colour?", "options": ["red", "green", "blue", "white"],
         "answer": "C"},
        {"id": 2, "question": "Shape?", "options": {"A": "circle", "B": "square", "C": None},
         "answer": "B"}])
    t = TASKS["mmbench"]
    items = eval_runner.build_items(t, mmb)
    assert len(items) == 6  # 4 rotations + 2 (the empty option C is dropped)

    def knows_blue_guesses_a(it):
        if "Colour?" in it.prompt:  # always names the letter now holding "blue"
            return "ABCD"[it.ref["options"].index("blue")] + "."
        return "A"

    oracle = Oracle(knows_blue_guesses_a)
    preds = tmp_path / "m.predictions.jsonl"
    eval_runner.generate_all(t, items, preds, oracle, batch_size=4)
    assert oracle.batches == [4, 2]
    _, s = eval_runner.score_all(t, items, eval_runner.load_predictions(preds, t, items))
    assert s["metrics"]["circular_accuracy"] == 50.0  # q2 fails on the rotation where B moved
    assert s["metrics"]["accuracy_first_rotation"] == 50.0  # q2 rotation 0: "A", answer B
    assert s["metrics"]["num_questions"] == 2

    vqa = tmp_path / "v.jsonl"
    write_jsonl(vqa, [{"question": "How many?", "answers": ["two"] * 3 + ["3"] * 7},
                      {"question": "What?", "answer": "a cat"}])
    t = TASKS["vqa"]
    items = eval_runner.build_items(t, vqa)
    answers = dict(zip((it.id for it in items), ["2", "Cat"], strict=True))
    _, s = eval_runner.score_all(t, items, answers)
    assert s["metrics"]["exact_match"] == 100.0
    assert s["metrics"]["vqa_accuracy"] == pytest.approx(100 * ((7 * 1 + 3 * 2 / 3) / 10 + 1) / 2)


@pytest.mark.parametrize("task", [
    "ai2d", "mme", "mathvista", "pope",
    pytest.param("ocrbench", marks=pytest.mark.slow),   # same code path as docvqa/pope
    pytest.param("hallusion", marks=pytest.mark.slow),  # same code path as pope
    pytest.param("mmmu", marks=pytest.mark.slow),       # 2 images a row: another compile
])
def test_task_runs_and_resumes_from_a_torn_write(task, assets, tmp_path, monkeypatch, capsys):
    root, ckpt = assets
    fx = FIXTURES[task]
    fx["write"](tmp_path)
    data = tmp_path / fx["file"]
    out = tmp_path / "r.json"
    extra = ["--image-root", str(root), "--batch-size", "2"]
    assert run(ckpt, task, data, out, *extra) == 0
    table = capsys.readouterr().out
    assert fx["category"] in table and "overall" in table
    res = json.loads(out.read_text())
    assert res["num_items"] == 4 and res["headline"] in res["metrics"]
    preds = tmp_path / "r.predictions.jsonl"
    lines = preds.read_text().splitlines(keepends=True)
    # a crash while writing the third record: two whole lines and a torn one remain
    preds.write_text(lines[0] + lines[1] + lines[2][:10])
    counter = CountingGenerate(monkeypatch)
    assert run(ckpt, task, data, out, *extra) == 0
    assert counter.prompts == 2
    again = preds.read_text().splitlines(keepends=True)
    assert again[:2] == lines[:2] and len(again) == 4
    assert json.loads(out.read_text())["metrics"] == res["metrics"]


def test_bad_inputs_fail_before_generation_and_keep_finished_work(assets, tmp_path,
                                                                  monkeypatch, capsys):
    root, ckpt = assets
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = tmp_path / "pope.jsonl"
    write_jsonl(data, [{"question": "Cat?", "answer": "yes", "image": str(root / "im0.png")},
                       {"id": "b", "question": "Dog?", "answer": "no",
                        "image": str(tmp_path / "broken.png")}])
    counter = CountingGenerate(monkeypatch)
    assert run(ckpt, "pope", data, tmp_path / "r.json") == 2
    err = capsys.readouterr().err
    assert "1 item(s) have unreadable images" in err and "item 'b'" in err
    assert counter.calls == 0

    # predictions from another task are never overwritten
    preds = tmp_path / "x.predictions.jsonl"
    foreign = json.dumps({"id": "1", "task": "mme", "prompt": "p", "prediction": "yes"}) + "\n"
    preds.write_text(foreign)
    write_jsonl(data, [{"question": "Cat?", "answer": "yes", "image": str(root / "im0.png")}])
    assert run(ckpt, "pope", data, tmp_path / "x.json") == 2
    assert "of task 'mme' is not an item of this pope data" in capsys.readouterr().err
    assert preds.read_text() == foreign

    write_jsonl(data, [{"question": "Cat?", "answer": "maybe", "image": "im0.png"}])
    assert run(ckpt, "pope", data, tmp_path / "y.json") == 2
    assert "pope.jsonl:1: answer must be yes / no" in capsys.readouterr().err

    # evaluation files stay local (a store cannot append); said before anything is read
    assert run(ckpt, "pope", data, "gs://bucket/r.json") == 2
    assert "--out gs://bucket/r.json: evaluation reads and writes local files" in \
        capsys.readouterr().err
    assert counter.calls == 0


@pytest.mark.parametrize("task,row,message", [
    ("docvqa", {"image": "x.png"}, "missing field 'question'"),
    ("docvqa", {"question": "Q", "answers": ["a"]}, "no image"),
    ("vqa", {"question": "Q", "answer": "a", "image": 5}, "field 'image' must be an image path"),
    ("mmbench", {"question": "Q", "options": list("abcdefghijk"), "answer": "A"},
     "at most 10 options, got 11"),
    ("docvqa", {"question": "Q", "answers": [{"a": 1}], "image": "x.png"},
     "field 'answers' must hold answer strings"),
    ("textvqa", {"question": "Q", "answers": ["a"], "image": "x.png"},
     r"needs the list of \(10\) human answers"),
    ("ai2d", {"question": "Q", "options": ["a"], "answer": "A", "image": "x.png"},
     "expected 2 or more options"),
    ("ai2d", {"question": "Q", "options": ["a", "b"], "answer": "C", "image": "x.png"},
     "answer 'C' is not one of the 2 option letters"),
    ("mme", {"question": "Q", "answer": "maybe", "category": "OCR", "image": "x.png"},
     "answer must be yes / no"),
    ("mmmu", {"id": "validation_Art_1", "question": "Q", "question_type": "essay",
              "answer": "a", "image": "x.png"}, "question_type must be"),
    ("hallusion", {"question": "Q", "gt_answer": "1", "category": "VD",
                   "subcategory": "chart"}, "missing field 'set_id'"),
    ("mathvista", {"query": "Q", "question_type": "multi_choice", "answer_type": "text",
                   "answer": "a", "image": "x.png"}, "needs 'choices'"),
])
def test_bad_rows_name_the_file_line_and_field(task, row, message, tmp_path):
    (tmp_path / "x.png").write_bytes(png_bytes(0))
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [row])
    with pytest.raises(eval_runner.EvalDataError, match=f"d.jsonl:1: .*{message}"):
        eval_runner.build_items(TASKS[task], path)


def test_duplicate_ids_are_rejected(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"id": 7, "question": "Q", "answer": "a"}] * 2)
    with pytest.raises(eval_runner.EvalDataError, match=r"d.jsonl:2: duplicate id '7'"):
        eval_runner.build_items(TASKS["vqa"], path)


def test_task_all_runs_a_folder_beside_the_published_numbers(tmp_path, monkeypatch, capsys):
    """--task all on a folder of released files (no model: the runtime and its answers are
    stubbed; the model path is covered above): one results file each, suite.json, one table
    with the card's numbers for the checkpoint's architecture, TensorBoard scalars."""
    from types import SimpleNamespace

    from mini_internvl_jax.config import load_model_config

    img = base64.b64encode(png_bytes(0)).decode()
    data = tmp_path / "bench"
    data.mkdir()
    (data / "DocVQA_VAL.tsv").write_text(
        f"index\timage\tquestion\tanswer\n1\t{img}\tDate?\t['1990']\n2\t1\tWho?\t['Ann']\n")
    (data / "MMBench_DEV_CN.tsv").write_text(
        f"index\timage\tquestion\tA\tB\tanswer\tcategory\n1\t{img}\tQ?\tx\ty\tA\tc\n"
        f"1000001\t1\tQ?\ty\tx\tB\tc\n")
    (data / "POPE.tsv").write_text(f"index\timage\tquestion\tanswer\tcategory\n"
                                   f"1\t{img}\tDog?\tYes\tpopular,random\n")
    (data / "README.txt").write_text("notes")
    stub = SimpleNamespace(generator=SimpleNamespace(
        mesh=None, cfg=load_model_config("mini-internvl-2b")))
    loads = []
    monkeypatch.setattr(evaluate, "load_runtime", lambda *a, **k: loads.append(1) or stub)
    monkeypatch.setattr(evaluate, "make_answer_fn", lambda rt, n, b: lambda items: [
        "1990" if "Date" in it.prompt else "A" for it in items])
    out = tmp_path / "res"
    argv = ["--checkpoint", "unused", "--task", "all", "--data-dir", str(data), "--out",
            str(out), "--tensorboard", str(tmp_path / "tb")]
    assert evaluate.main(argv) == 0
    stdout, stderr = capsys.readouterr()
    assert loads == [1] and "README.txt is no benchmark file" in stderr
    assert "published numbers: mini-internvl-2b" in stdout
    rows = {r["file"]: r for r in json.loads((out / "suite.json").read_text())["benchmarks"]}
    assert rows["DocVQA_VAL.tsv"]["score"] == pytest.approx(50.0)  # one of two right
    assert rows["DocVQA_VAL.tsv"]["published"] == 86.9
    assert rows["MMBench_DEV_CN.tsv"]["published"] == 70.9  # the CN number, not EN
    assert rows["MMBench_DEV_CN.tsv"]["score"] == 0.0  # "A" is wrong on the second copy
    assert rows["POPE.tsv"]["published"] is None and rows["POPE.tsv"]["layout"] == (
        "VLMEvalKit TSV")
    assert {p.name for p in out.iterdir()} >= {"DocVQA_VAL.docvqa.json", "POPE.pope.json",
                                               "MMBench_DEV_CN.mmbench.json", "suite.json"}
    table = stdout.splitlines()
    assert table[-5].split()[:2] == ["task", "file"] and len(table) == 6
    tb = events.values(tmp_path / "tb")
    assert tb["eval/DocVQA_VAL/anls"] == [(0, pytest.approx(50.0))]
    assert tb["eval/DocVQA_VAL/published"] == [(0, pytest.approx(86.9))]
    # rerun: everything is done, nothing is loaded (the card named: no config to read)
    assert evaluate.main(argv + ["--published", "mini-internvl-2b"]) == 0 and loads == [1]
    assert json.loads((out / "suite.json").read_text())["benchmarks"] == list(rows.values())
