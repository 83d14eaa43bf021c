"""A few rows of each benchmark in the layouts it is published in (official JSON, Hugging Face
parquet, VLMEvalKit TSV) with canned predictions (no model): the layout is detected, every row
keeps its image, and the score equals the reference evaluator's rule re-implemented here in a
few lines (official script, else VLMEvalKit), independently of the scorer under test."""

import base64
import json
import re
from collections import defaultdict

import numpy as np
import pytest

from mini_internvl_jax.infer.eval_data import EvalDataError, MissingImageError
from mini_internvl_jax.infer.eval_runner import load_benchmark, score_all
from mini_internvl_jax.infer.scorers.tasks import TASKS
from tests.helpers.eval_assets import png_bytes

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def b64(i):
    return base64.b64encode(png_bytes(i)).decode()


def write_tsv(path, header, rows):
    path.write_text("\t".join(header) + "\n"
                    + "".join("\t".join(str(c) for c in r) + "\n" for r in rows))


def write_parquet(path, cols):
    pq.write_table(pa.table(cols), path)


def struct(i):
    return {"bytes": png_bytes(i), "path": None}


def run(task, path, predict, **kw):
    """(benchmark, summary) with `predict(item) -> text` as the model."""
    bench = load_benchmark(TASKS[task], path, **kw)
    preds = {it.id: predict(it) for it in bench.items}
    return bench, score_all(TASKS[task], bench.items, preds)[1]


def by_question(table):
    """predict(): the answer for the first key found in the prompt."""
    def predict(item):
        hits = [a for q, a in table.items() if q in item.prompt]
        assert len(hits) == 1, item.prompt
        return hits[0]
    return predict


# ------------------------------------------------------------------ reference rules


def lev(a, b):  # textbook DP, row by row
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1,
                          d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def ref_anls(pred, answers):
    """DocVQA's official evaluation script."""
    nls = []
    for gt in answers:
        g, p = " ".join(gt.strip().lower().split()), " ".join(pred.strip().lower().split())
        length = max(len(gt.upper()), len(pred.upper()))
        nls.append(0.0 if length == 0 else lev(g, p) / length)
    score = 1 - min(nls)
    return 0.0 if score < 0.5 else score


def ref_relaxed(pred, target):
    """pix2struct's relaxed_correctness (ChartQA)."""
    def f(t):
        try:
            return float(t.rstrip("%")) / 100 if t.endswith("%") else float(t)
        except ValueError:
            return None
    p, t = f(pred), f(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= 0.05
    return pred.lower() == target.lower()


def ref_f1(pairs):
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    fn = sum(t and not p for p, t in pairs)
    prec = tp / (tp + fp) if tp + fp else 0
    rec = tp / (tp + fn) if tp + fn else 0
    return 2 * prec * rec / (prec + rec) if prec + rec else 0


# ------------------------------------------------------------------ DocVQA / InfoVQA

DOC_ROWS = [("What is the date?", ["1/2/1990", "Jan 2 1990"], "1/2/1990"),
            ("Who signed?", ["John Smith"], "  john   smiths "),  # raw lengths matter
            ("Total?", ["$45"], "45.00")]


def doc_expected():
    return 100 * np.mean([ref_anls(p, a) for _, a, p in DOC_ROWS])


@pytest.mark.parametrize("task,layout", [
    ("docvqa", "official JSON"), ("docvqa", "Hugging Face parquet"),
    ("docvqa", "VLMEvalKit TSV"), ("infovqa", "official JSON"), ("infovqa", "VLMEvalKit TSV"),
    ("infovqa", "Hugging Face parquet")])
def test_anls_tasks_in_every_layout(task, layout, tmp_path):
    if layout == "official JSON":
        key = "image" if task == "docvqa" else "image_local_name"
        (tmp_path / "documents").mkdir()
        data = []
        for i, (q, a, _) in enumerate(DOC_ROWS):
            (tmp_path / "documents" / f"d{i}.png").write_bytes(png_bytes(i))
            data.append({"questionId": 100 + i, "question": q, "answers": a,
                         key: f"d{i}.png" if task == "infovqa" else f"documents/d{i}.png"})
        path = tmp_path / "val_v1.0.json"
        path.write_text(json.dumps({"dataset_name": task, "data": data}))
        root = tmp_path / "documents" if task == "infovqa" else None
    elif layout == "VLMEvalKit TSV":
        path, root = tmp_path / "DocVQA_VAL.tsv", None
        write_tsv(path, ["index", "image", "question", "answer"],
                  [(i, b64(i), q, repr(a)) for i, (q, a, _) in enumerate(DOC_ROWS)])
    else:
        path, root = tmp_path / "val.parquet", None
        write_parquet(path, {"questionId": [str(i) for i in range(3)],
                             "question": [q for q, _, _ in DOC_ROWS],
                             "answers": [a for _, a, _ in DOC_ROWS],
                             "image": [struct(i) for i in range(3)]})
    bench, s = run(task, path, by_question({q: p for q, _, p in DOC_ROWS}), image_root=root)
    assert bench.layout == layout and len(bench.items) == 3
    assert all(len(it.images) == 1 for it in bench.items)
    assert s["metrics"]["anls"] == pytest.approx(doc_expected())


# ------------------------------------------------------------------------------ ChartQA

CHART = [("How many in 2010?", "12", "12.5", "human"), ("Peak value?", "100", "105", "human"),
         ("Share of A?", "95.2", "100", "augmented"), ("Is it rising?", "Yes", "yes", "augmented")]


@pytest.mark.parametrize("layout", ["official JSON", "Hugging Face parquet", "VLMEvalKit TSV"])
def test_chartqa_layouts_and_splits(layout, tmp_path):
    if layout == "official JSON":  # test/test_human.json + test/test_augmented.json, png/
        (tmp_path / "png").mkdir()
        paths = []
        for split in ("human", "augmented"):
            rows = []
            for i, (q, a, _, sp) in enumerate(CHART):
                if sp == split:
                    (tmp_path / "png" / f"c{i}.png").write_bytes(png_bytes(i))
                    rows.append({"imgname": f"c{i}.png", "query": q, "label": a})
            paths.append(tmp_path / f"test_{split}.json")
            paths[-1].write_text(json.dumps(rows))
        results = [run("chartqa", p, by_question({q: p_ for q, _, p_, _ in CHART}),
                       image_root=tmp_path / "png") for p in paths]
        for (bench, s), split in zip(results, ("human", "augmented"), strict=True):
            assert bench.layout == layout and list(s["categories"]) == [split]
            want = [ref_relaxed(p, a) for _, a, p, sp in CHART if sp == split]
            assert s["metrics"]["relaxed_accuracy"] == pytest.approx(100 * np.mean(want))
        return
    if layout == "Hugging Face parquet":
        path = tmp_path / "test-00000.parquet"
        write_parquet(path, {"image": [struct(i) for i in range(4)],
                             "query": [c[0] for c in CHART], "label": [[c[1]] for c in CHART],
                             "human_or_machine": [int(c[3] == "augmented") for c in CHART]})
    else:
        path = tmp_path / "ChartQA_TEST.tsv"
        write_tsv(path, ["index", "image", "question", "answer", "split"],
                  [(i, b64(i), c[0], c[1], c[3]) for i, c in enumerate(CHART)])
    bench, s = run("chartqa", path, by_question({c[0]: c[2] for c in CHART}))
    assert bench.layout == layout
    for split in ("human", "augmented"):  # VLMEvalKit prints each split, then Overall
        want = [ref_relaxed(p, a) for _, a, p, sp in CHART if sp == split]
        assert s["categories"][split]["relaxed_accuracy"] == pytest.approx(100 * np.mean(want))
    want = [ref_relaxed(p, a) for _, a, p, _ in CHART]
    assert s["metrics"]["relaxed_accuracy"] == pytest.approx(100 * np.mean(want))


# --------------------------------------------------------------------------------- POPE

# (question, label, categories as VLMEvalKit's TSV lists them, prediction)
POPE = [("Is there a dog?", "Yes", "adversarial,popular,random", "Yes, there is."),
        ("Is there a cat?", "No", "adversarial", "Yes"),
        ("Is there a car?", "No", "popular,random", "No."),
        ("Is there a cup?", "Yes", "random", "No, there is not."),
        ("Is there a bus?", "Yes", "popular", "yes")]


def ref_pope_parse(text):  # LLaVA / InternVL eval_pope.py
    text = text.split(".")[0] if "." in text else text
    words = text.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def test_pope_tsv_with_multi_split_categories_parquet_and_official_files(tmp_path):
    path = tmp_path / "POPE.tsv"
    write_tsv(path, ["index", "image", "question", "answer", "category"],
              [(i, b64(i), q, a, c) for i, (q, a, c, _) in enumerate(POPE)])
    bench, s = run("pope", path, by_question({q: p for q, _, _, p in POPE}))
    assert bench.layout == "VLMEvalKit TSV" and len(bench.items) == 5
    # VLMEvalKit: category.str.split(',').explode(); F1 per split, InternVL's mean over them
    rows = [(c, ref_pope_parse(p), a == "Yes") for _, a, cs, p in POPE for c in cs.split(",")]
    per = {sp: ref_f1([(p, t) for c, p, t in rows if c == sp]) for sp in
           ("adversarial", "popular", "random")}
    assert sorted(s["categories"]) == sorted(per)  # no fake "popular,random" split
    for sp, f1 in per.items():
        assert s["categories"][sp]["f1"] == pytest.approx(100 * f1)
    assert s["metrics"]["f1_mean"] == pytest.approx(100 * np.mean(list(per.values())))
    assert s["metrics"]["f1_overall"] == pytest.approx(100 * ref_f1([(p, t) for _, p, t in rows]))

    # lmms-lab/POPE parquet (one split a row) and the official per-split JSONL files
    path = tmp_path / "test.parquet"
    write_parquet(path, {"question_id": ["1", "2"], "question": ["Is there a dog?",
                                                                 "Is there a cat?"],
                         "answer": ["yes", "no"], "category": ["random", "random"],
                         "image": [struct(0), struct(1)]})
    bench, s = run("pope", path, lambda it: "yes")
    assert bench.layout == "Hugging Face parquet"
    assert s["metrics"]["f1_mean"] == pytest.approx(100 * ref_f1([(True, True), (True, False)]))
    (tmp_path / "im.jpg").write_bytes(png_bytes(3))
    path = tmp_path / "coco_pope_adversarial.json"
    path.write_text("".join(json.dumps({"question_id": i, "image": "im.jpg", "text": q,
                                        "label": a.lower()}) + "\n"
                            for i, (q, a, _, _) in enumerate(POPE)))
    bench, s = run("pope", path, by_question({q: p for q, _, _, p in POPE}))
    assert list(s["categories"]) == ["adversarial"]
    want = ref_f1([(ref_pope_parse(p), a == "Yes") for _, a, _, p in POPE])
    assert s["metrics"]["f1_mean"] == pytest.approx(100 * want)


# ---------------------------------------------------------------------- HallusionBench

# (category, subcategory, set, figure, question, visual_input, gt, prediction)
HB = [("VD", "chart", 0, 0, 0, "1", "1", "Yes, it is."),
      ("VD", "chart", 0, 1, 0, "2", "0", "Yes"),
      ("VD", "chart", 0, 0, 1, "1", "0", "No"),
      ("VD", "chart", 0, 1, 1, "2", "1", "yes"),
      ("VS", "chart", 0, 0, 0, "0", "1", "Yes"),  # asked without an image
      ("VS", "map", 1, 1, 0, "1", "0", "No, not at all")]


def ref_yorn(text):  # VLMEvalKit's YOrN_Extraction (punctuation here is only ",.")
    words = text.lower().replace(",", " ").replace(".", " ").split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


def ref_hallusion(rows, keyf):
    """aAcc, fAcc, qAcc as the benchmark's get_eval_* / VLMEvalKit's Hallusion_rating: a
    figure (question) counts when all its questions (figures) are right."""
    figs, qs = defaultdict(list), defaultdict(list)
    for r, ok in rows:
        figs[keyf(r) + (r[2], r[3])].append(ok)
        qs[keyf(r) + (r[2], r[4])].append(ok)
    return (100 * np.mean([ok for _, ok in rows]), 100 * np.mean([all(v) for v in figs.values()]),
            100 * np.mean([all(v) for v in qs.values()]))


def _hb_question(r):
    return f"Q{r[0]}{r[1]}{r[2]}{r[3]}{r[4]}?"


def test_hallusion_official_json_tsv_and_missing_images(tmp_path):
    predict = by_question({_hb_question(r): r[7] for r in HB})
    oks = [(r, ref_yorn(r[7]) == ("Yes" if r[6] == "1" else "No")) for r in HB]
    data = []
    for r in HB:
        fn = None if r[5] == "0" else f"./hallusion_bench/{r[0]}/{r[1]}/{r[2]}_{r[3]}.png"
        if fn:
            (tmp_path / fn).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / fn).write_bytes(png_bytes(r[3]))
        data.append({"category": r[0], "subcategory": r[1], "visual_input": r[5],
                     "set_id": str(r[2]), "figure_id": str(r[3]), "question_id": str(r[4]),
                     "question": _hb_question(r), "gt_answer": r[6], "filename": fn})
    path = tmp_path / "HallusionBench.json"
    path.write_text(json.dumps(data))
    bench, s = run("hallusion", path, predict)
    assert bench.layout == "official JSON"
    assert [len(it.images) for it in bench.items] == [int(r[5] != "0") for r in HB]
    want = ref_hallusion(oks, lambda r: (r[0], r[1]))
    assert [s["metrics"][k] for k in ("aAcc", "fAcc", "qAcc")] == pytest.approx(want)
    vd = ref_hallusion([x for x in oks if x[0][0] == "VD"], lambda r: (r[0], r[1]))
    assert [s["categories"]["VD"][k] for k in ("aAcc", "fAcc", "qAcc")] == pytest.approx(vd)
    assert "VS/map" in s["categories"]

    # a missing image: an error naming the row and field, or a counted skip under the flag
    (tmp_path / data[1]["filename"]).unlink()
    with pytest.raises(MissingImageError, match=r"HallusionBench.json:item 1: field "
                                                r"'filename' names image"):
        load_benchmark(TASKS["hallusion"], path)
    bench = load_benchmark(TASKS["hallusion"], path, skip_missing=True)
    # rows 1 and 3 share the missing figure
    assert len(bench.items) == 4 and [x.split(": ")[0][-6:] for x in bench.skipped] == [
        "item 1", "item 3"]

    # VLMEvalKit's TSV: ids only in `index` (parts 3, 4, 5), grouped by l2-category
    path = tmp_path / "HallusionBench.tsv"
    write_tsv(path, ["index", "image", "question", "answer", "category", "l2-category"],
              [(f"{r[0]}_{r[1]}_x_{r[2]}_{r[3]}_{r[4]}", b64(r[3]), _hb_question(r),
                "Yes" if r[6] == "1" else "No", r[0], r[1]) for r in HB])
    bench, s = run("hallusion", path, predict)
    assert bench.layout == "VLMEvalKit TSV" and all(it.images for it in bench.items)
    want = ref_hallusion(oks, lambda r: (r[1],))  # l2-category only: VD & VS chart merge
    assert [s["metrics"][k] for k in ("aAcc", "fAcc", "qAcc")] == pytest.approx(want)
    assert sorted(s["categories"]) == ["VD", "VS", "chart", "map"]
    path.write_text("index\timage\tquestion\tanswer\tcategory\tl2-category\n"
                    f"7\t{b64(0)}\tQ?\tYes\tVD\tchart\n")
    with pytest.raises(EvalDataError, match="field 'index' '7' does not hold the set"):
        load_benchmark(TASKS["hallusion"], path)


# ------------------------------------------------------------------------------ MMBench


def test_mmbench_tsv_copies_are_not_rotated_again(tmp_path):
    """MMBench's TSV holds question i's rotated copies at i + k * 1e6; VLMEvalKit groups them
    by index % 1e6 and a question counts only when every copy is right."""
    opts = ["red", "green", "blue"]
    rows, answers = [], {}
    for qi, ans in ((1, 0), (2, 2)):
        for k in range(3):
            rot = opts[k:] + opts[:k]
            idx = qi + k * 1_000_000
            rows.append((idx, b64(qi), f"Colour {qi}?", *rot, "ABC"[rot.index(opts[ans])],
                         "attribute"))
            # question 1 right in every copy; question 2 wrong in its last copy
            answers[idx] = rows[-1][6] if (qi, k) != (2, 2) else "A"
    path = tmp_path / "MMBench_DEV_EN.tsv"
    write_tsv(path, ["index", "image", "question", "A", "B", "C", "answer", "category"], rows)
    bench, s = run("mmbench", path, lambda it: answers[int(it.id)])
    assert len(bench.items) == 6  # not 18
    groups = defaultdict(list)
    for idx, ans in answers.items():
        groups[idx % 1_000_000].append(ans == next(r[6] for r in rows if r[0] == idx))
    assert s["metrics"]["circular_accuracy"] == pytest.approx(
        100 * np.mean([all(v) for v in groups.values()]))
    assert s["metrics"]["num_questions"] == 2
    assert len(load_benchmark(TASKS["mmbench"], path, settings={"circular": False}).items) == 2


# ------------------------------------------- the other tasks: one row set, every layout
# Each case: rows as the layout stores them, predictions by question, and the expected
# headline from the reference rule written out below.


def ref_vqa_soft(pred, answers):  # EvalAI / VLMEvalKit vqa_score on normalised strings
    return np.mean([min(1, sum(a == pred for j, a in enumerate(answers) if j != i) / 3)
                    for i in range(len(answers))])


def ref_letter(pred, n=4):  # VLMEvalKit can_infer's first step: one option letter as a word
    letters = set(re.findall(r"\b([A-Z])\b", re.sub(r"[.()\[\],:;!*#{}]", " ", pred)))
    letters &= set("ABCDEFGHIJ"[:n])
    return letters.pop() if len(letters) == 1 else None


def ref_mme(rows):  # MME calculation.py: per category acc + acc+ (both questions of an image)
    cats = defaultdict(lambda: defaultdict(list))
    for cat, img, ok in rows:
        cats[cat][img].append(ok)
    return sum(100 * np.mean([o for v in imgs.values() for o in v])
               + 100 * np.mean([all(v) for v in imgs.values()]) for imgs in cats.values())


TEXTVQA = [("What brand?", ["nokia"] * 7 + ["nokla"] * 3, "nokia"),
           ("What number?", ["12"] * 2 + ["21"] * 8, "12")]
OCR = [("what is written in the image?", ["Cancer"], "CANCER!", "Regular Text Recognition"),
       ("what is the total?", ["$12"], "12", "Doc-oriented VQA"),
       ("Read the formula", ["x ^ 2"], "x^2", "Handwritten Mathematical Expression Recognition")]
MC = [("Which shape?", ["circle", "square", "star", "line"], "B", "B"),
      ("Which colour?", ["red", "blue", "green", "grey"], "C", "(C) green"),
      ("How many?", ["1", "2", "3", "4"], "A", "D")]
MME = [("Is there a dog? Please answer yes or no.", "Yes", "existence", "e/1.png", "Yes"),
       ("Is there a cat? Please answer yes or no.", "No", "existence", "e/1.png", "No"),
       ("Are there two? Please answer yes or no.", "Yes", "count", "c/2.png", "Yes"),
       ("Are there three? Please answer yes or no.", "No", "count", "c/2.png", "Yes")]


def _textvqa(layout, tmp):
    if layout == "official JSON":
        for i in range(2):
            (tmp / f"img{i}.jpg").write_bytes(png_bytes(i))
        path = tmp / "TextVQA_0.5.1_val.json"
        path.write_text(json.dumps({"dataset_name": "textvqa", "data": [
            {"question_id": i, "image_id": f"img{i}", "question": q, "answers": a}
            for i, (q, a, _) in enumerate(TEXTVQA)]}))
    elif layout == "Hugging Face parquet":
        path = tmp / "validation.parquet"
        write_parquet(path, {"question_id": [0, 1], "question": [t[0] for t in TEXTVQA],
                             "answers": [t[1] for t in TEXTVQA], "image": [struct(0), struct(1)]})
    else:
        path = tmp / "TextVQA_VAL.tsv"
        write_tsv(path, ["index", "image", "question", "answer"],
                  [(i, b64(i), q, repr(a)) for i, (q, a, _) in enumerate(TEXTVQA)])
    return path, {q: p for q, _, p in TEXTVQA}, 100 * np.mean(
        [ref_vqa_soft(p, a) for _, a, p in TEXTVQA])


def _ocrbench(layout, tmp):
    if layout == "official JSON":
        (tmp / "IIIT5K").mkdir()
        for i in range(3):
            (tmp / "IIIT5K" / f"{i}.jpg").write_bytes(png_bytes(i))
        path = tmp / "OCRBench.json"
        path.write_text(json.dumps([{"dataset_name": "IIIT5K", "id": i, "question": q,
                                     "image_path": f"IIIT5K/{i}.jpg", "answers": a, "type": c}
                                    for i, (q, a, _, c) in enumerate(OCR)]))
    elif layout == "Hugging Face parquet":
        path = tmp / "test.parquet"
        write_parquet(path, {"question": [o[0] for o in OCR], "answer": [o[1] for o in OCR],
                             "question_type": [o[3] for o in OCR],
                             "image": [struct(i) for i in range(3)]})
    else:
        path = tmp / "OCRBench.tsv"
        write_tsv(path, ["index", "image", "question", "answer", "category"],
                  [(i, b64(i), q, repr(a), c) for i, (q, a, _, c) in enumerate(OCR)])

    def hit(p, answers, cat):  # OCRBench's official rule
        if cat.startswith("Handwritten Mathematical"):
            return any(a.strip().replace("\n", " ").replace(" ", "")
                       in p.strip().replace("\n", " ").replace(" ", "") for a in answers)
        return any(a.lower().strip().replace("\n", " ") in p.lower().strip().replace("\n", " ")
                   for a in answers)
    return path, {q: p for q, _, p, _ in OCR}, sum(hit(p, a, c) for _, a, p, c in OCR)


def _mc(task):
    def build(layout, tmp):
        if layout == "VLMEvalKit TSV":
            path = tmp / ("AI2D_TEST.tsv" if task == "ai2d" else "SEEDBench_IMG.tsv")
            write_tsv(path, ["index", "image", "question", "A", "B", "C", "D", "answer",
                             "category"],
                      [(i, b64(i), q, *o, a, "c") for i, (q, o, a, _) in enumerate(MC)])
        elif layout == "Hugging Face parquet" and task == "ai2d":  # lmms-lab/ai2d
            path = tmp / "test.parquet"
            write_parquet(path, {"question": [m[0] for m in MC], "options": [m[1] for m in MC],
                                 "answer": [str("ABCD".index(m[2])) for m in MC],
                                 "image": [struct(i) for i in range(3)]})
        elif layout == "Hugging Face parquet":  # lmms-lab/SEED-Bench: a list of images
            path = tmp / "test.parquet"
            cols = {"question_id": ["0", "1", "2"], "question": [m[0] for m in MC],
                    "answer": [m[2] for m in MC], "question_type_id": [1, 1, 2],
                    "data_type": ["image"] * 3, "image": [[struct(i)] for i in range(3)]}
            cols.update({f"choice_{x}": [m[1][j] for m in MC] for j, x in enumerate("abcd")})
            write_parquet(path, cols)
        else:  # SEED-Bench.json: {"questions": [...]}, images by data_id; video rows skipped
            for i in range(3):
                (tmp / f"{i}.jpg").write_bytes(png_bytes(i))
            qs = [{"question_id": str(i), "question": q, "answer": a, "question_type_id": 1,
                   "data_type": "image", "data_id": f"{i}.jpg",
                   **{f"choice_{x}": o[j] for j, x in enumerate("abcd")}}
                  for i, (q, o, a, _) in enumerate(MC)]
            qs.append({**qs[0], "question_id": "v", "data_type": "video", "data_id": "v.mp4"})
            path = tmp / "SEED-Bench.json"
            path.write_text(json.dumps({"questions": qs, "question_type": {"Scene": 1}}))
        return path, {q: p for q, _, _, p in MC}, 100 * np.mean(
            [ref_letter(p) == a for _, _, a, p in MC])
    return build


def _mme(layout, tmp):
    if layout == "Hugging Face parquet":
        path = tmp / "test.parquet"
        write_parquet(path, {"question_id": [m[3] for m in MME], "question": [m[0] for m in MME],
                             "answer": [m[1] for m in MME], "category": [m[2] for m in MME],
                             "image": [struct(int(m[3][2])) for m in MME]})
    else:
        path = tmp / "MME.tsv"
        write_tsv(path, ["index", "image", "question", "answer", "category", "image_path"],
                  [(i, b64(int(m[3][2])), m[0], m[1], m[2], m[3]) for i, m in enumerate(MME)])

    def parse(p):  # MME's official rule
        p = p.lower()
        return p if p in ("yes", "no") else "yes" if "yes" in p[:4] else (
            "no" if "no" in p[:4] else "other")
    return path, {m[0]: m[4] for m in MME}, ref_mme(
        [(c, img, parse(p) == a.lower()) for _, a, c, img, p in MME])


def _mmmu(layout, tmp):
    path = tmp / "validation-00000.parquet"
    write_parquet(path, {"id": [f"validation_Art_{i}" for i in range(3)],
                         "question": [f"<image 1> {m[0]}" for m in MC],
                         "options": [repr(m[1]) for m in MC], "answer": [m[2] for m in MC],
                         "question_type": ["multiple-choice"] * 3,
                         "image_1": [struct(i) for i in range(3)]})
    return path, {q: p for q, _, _, p in MC}, 100 * np.mean(
        [ref_letter(p) == a for _, _, a, p in MC])


def _mathvista(layout, tmp):
    probs = {"1": {"question": "How many cubes?", "query": "Hint: integer.\nHow many cubes?",
                   "choices": None, "precision": None, "answer": "5",
                   "question_type": "free_form", "answer_type": "integer"},
             "2": {"question": "Which is larger?", "query": "Which is larger?\nChoices:\n"
                   "(A) left\n(B) right", "choices": ["left", "right"], "precision": None,
                   "answer": "right", "question_type": "multi_choice", "answer_type": "text"}}
    preds = {"How many cubes?": "6", "Which is larger?": "right"}
    if layout == "official JSON":
        (tmp / "images").mkdir()
        for pid in probs:
            (tmp / "images" / f"{pid}.jpg").write_bytes(png_bytes(int(pid)))
        path = tmp / "testmini.json"
        path.write_text(json.dumps({pid: {**p, "pid": pid, "image": f"images/{pid}.jpg",
                                          "metadata": {"task": "math word problem"}}
                                    for pid, p in probs.items()}))
    else:
        path = tmp / "testmini-00000.parquet"
        cols = {k: [p[k] for p in probs.values()] for k in probs["1"]}
        cols.update(pid=list(probs), decoded_image=[struct(1), struct(2)],
                    image=["images/1.jpg", "images/2.jpg"])
        write_parquet(path, cols)
    # exact answer for these canned predictions: 6 != 5, "right" == "right"
    return path, preds, 50.0


OTHER = {("textvqa", lay): _textvqa for lay in ("official JSON", "Hugging Face parquet",
                                                  "VLMEvalKit TSV")}
OTHER.update({("ocrbench", lay): _ocrbench for lay in ("official JSON", "Hugging Face parquet",
                                                         "VLMEvalKit TSV")})
OTHER.update({("ai2d", lay): _mc("ai2d") for lay in ("Hugging Face parquet", "VLMEvalKit TSV")})
OTHER.update({("seed", lay): _mc("seed") for lay in ("official JSON", "Hugging Face parquet",
                                                       "VLMEvalKit TSV")})
OTHER.update({("mme", lay): _mme for lay in ("Hugging Face parquet", "VLMEvalKit TSV")})
OTHER[("mmmu", "Hugging Face parquet")] = _mmmu
OTHER.update({("mathvista", lay): _mathvista for lay in ("official JSON",
                                                         "Hugging Face parquet")})


@pytest.mark.parametrize("task,layout", sorted(OTHER))
def test_other_tasks_in_their_published_layouts(task, layout, tmp_path):
    path, preds, expected = OTHER[(task, layout)](layout, tmp_path)
    bench, s = run(task, path, by_question(preds))
    assert bench.layout == layout
    assert all(it.images for it in bench.items) and len(bench.items) == len(preds)
    assert s["metrics"][TASKS[task].headline] == pytest.approx(expected)
