"""The benchmark evaluation CLI end to end on a random tiny model and tiny fixture datasets,
one per task family and input format: it runs, writes results and a per-category table, and
resumes an interrupted run without generating finished items again."""

import base64
import json

import pytest

from mini_internvl_jax.infer import eval_cli
from mini_internvl_jax.infer.generate import Generator
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
    return eval_cli.main(["--checkpoint", str(ckpt), "--task", task, "--data", str(data),
                          "--out", str(out), "--max-new-tokens", "3", "--max-num", "1",
                          *extra])


def test_short_answer_run_resumes_after_preemption(assets, tmp_path, monkeypatch, capsys):
    root, ckpt = assets
    data = tmp_path / "docvqa.jsonl"
    write_jsonl(data, [{"questionId": i, "question": f"What is field {i}?",
                        "answers": ["x", f"{i}"], "image": str(root / f"im{i % 3}.png")}
                       for i in range(5)])
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
    assert resumed.prompts == 3  # only the unfinished items
    lines = preds.read_text().splitlines()
    assert lines[:2] == first and [json.loads(x)["id"] for x in lines] == list("01234")
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:2] == ["category", "anls"] and "overall" in table
    res = json.loads(out.read_text())
    assert res["task"] == "docvqa" and res["num_items"] == 5 and len(res["items"]) == 5
    rec = json.loads(lines[0])
    assert rec["prompt"] == "What is field 0? Answer the question using a single word or phrase."

    # the same answers in one go, batch rows sharded over 2 devices (batch 3 -> 4 rows)
    again = CountingGenerate(monkeypatch)
    out2 = tmp_path / "mesh.json"
    assert run(ckpt, "docvqa", data, out2, "--batch-size", "3", "--mesh", "data=2") == 0
    assert again.calls == 2 and again.prompts == 5
    mesh_preds = [json.loads(x)["prediction"]
                  for x in (tmp_path / "mesh.predictions.jsonl").read_text().splitlines()]
    assert mesh_preds == [json.loads(x)["prediction"] for x in lines]
    assert json.loads(out2.read_text())["metrics"] == res["metrics"]

    # everything done: no model call, same results
    idle = CountingGenerate(monkeypatch)
    assert run(ckpt, "docvqa", data, out, "--batch-size", "2") == 0
    assert idle.calls == 0 and json.loads(out.read_text())["metrics"] == res["metrics"]


def _tsv(path, header, rows):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n"
                                                       for r in rows))


def _b64(i):
    return base64.b64encode(png_bytes(i)).decode()


def _fixture(task, root, tmp_path):
    """(data path, number of items, a category expected in the table) per task."""
    if task == "ai2d":  # VLMEvalKit TSV: base64 images, option columns A-D
        path = tmp_path / "ai2d.tsv"
        _tsv(path, ["index", "question", "A", "B", "C", "D", "answer", "image"],
             [[1, "Which part?", "leaf", "root", "stem", "seed", "B", _b64(0)],
              [2, "Which stage?", "egg", "larva", "pupa", "adult", "D", _b64(1)],
              [3, "Which one?", "x", "y", "z", "w", "A", "1"]])  # shares row 1's image
        return path, 3, "overall"
    if task == "ocrbench":
        path = tmp_path / "ocr.tsv"
        _tsv(path, ["index", "question", "answer", "category", "image"],
             [[1, "What is written?", "['hello']", "Regular Text Recognition", _b64(0)],
              [2, "What formula?", "['x^2']",
               "Handwritten Mathematical Expression Recognition", _b64(1)]])
        return path, 2, "Text Recognition"
    if task == "mme":  # lmms-lab/MME parquet: question_id names the image
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = tmp_path / "mme.parquet"
        img = [{"bytes": png_bytes(i), "path": None} for i in (0, 0, 1, 1)]
        pq.write_table(pa.table({
            "question_id": ["existence/1.png", "existence/1.png", "count/2.png",
                            "count/2.png"],
            "question": ["Is there a dog? Please answer yes or no."] * 4,
            "answer": ["Yes", "No", "Yes", "No"],
            "category": ["existence", "existence", "count", "count"], "image": img}), path)
        return path, 4, "existence"
    if task == "mmmu":  # MMMU parquet: two images, one open question
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = tmp_path / "mmmu.parquet"
        pq.write_table(pa.table({
            "id": ["validation_Art_1", "validation_Math_2"],
            "question": ["<image 1> <image 2> Which is older?", "<image 1> What is x?"],
            "options": ["['left', 'right']", "[]"], "answer": ["A", "4"],
            "question_type": ["multiple-choice", "open"],
            "image_1": [{"bytes": png_bytes(0), "path": None},
                        {"bytes": png_bytes(1), "path": None}],
            "image_2": [{"bytes": png_bytes(2), "path": None}, None]}), path)
        return path, 2, "Math"
    if task == "pope":
        path = tmp_path / "pope.jsonl"
        write_jsonl(path, [{"question_id": i, "question": "Is there a cat in the image?",
                            "answer": "yes" if i % 2 else "no", "image": f"im{i % 3}.png",
                            "category": "random" if i < 2 else "popular"} for i in range(4)])
        return path, 4, "popular"
    if task == "hallusion":  # one question without an image
        path = tmp_path / "hb.jsonl"
        write_jsonl(path, [{"question": "Is the line rising?", "gt_answer": str(i % 2),
                            "category": "VD", "subcategory": "chart", "set_id": "0",
                            "figure_id": str(i), "question_id": "0",
                            **({"image": "im0.png"} if i else {})} for i in range(3)])
        return path, 3, "VD/chart"
    if task == "mathvista":
        path = tmp_path / "mv.jsonl"
        write_jsonl(path, [
            {"pid": "1", "query": "Hint: answer with a number.\nQuestion: How many?",
             "question_type": "free_form", "answer_type": "integer", "answer": "3",
             "image": "im1.png", "metadata": {"task": "math word problem"}},
            {"pid": "2", "query": "Which? Choices: (A) 1 (B) 2", "choices": ["1", "2"],
             "question_type": "multi_choice", "answer_type": "text", "answer": "2",
             "image": "im2.png", "metadata": {"task": "figure question answering"}}])
        return path, 2, "math word problem"
    raise AssertionError(task)


@pytest.mark.parametrize("task", ["ai2d", "ocrbench", "mme", "mmmu", "pope", "hallusion",
                                  "mathvista"])
def test_task_runs_and_resumes_from_a_torn_write(task, assets, tmp_path, monkeypatch, capsys):
    root, ckpt = assets
    data, n, category = _fixture(task, root, tmp_path)
    out = tmp_path / "r.json"
    extra = ["--image-root", str(root), "--batch-size", "4"]
    assert run(ckpt, task, data, out, *extra) == 0
    table = capsys.readouterr().out
    assert category in table and "overall" in table
    res = json.loads(out.read_text())
    assert res["num_items"] == n and res["headline"] in res["metrics"]
    preds = tmp_path / "r.predictions.jsonl"
    lines = preds.read_text().splitlines(keepends=True)
    # a crash while writing the second record: one whole line and a torn one remain
    preds.write_text(lines[0] + lines[1][:10])
    counter = CountingGenerate(monkeypatch)
    assert run(ckpt, task, data, out, *extra) == 0
    assert counter.prompts == n - 1
    again = preds.read_text().splitlines(keepends=True)
    assert again[0] == lines[0] and len(again) == n
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
