"""A few rows of each benchmark in the layouts it is published in (official JSON, Hugging Face
parquet, VLMEvalKit TSV) with canned predictions (no model): the layout is detected, every row
keeps its image, and the score equals the reference evaluator's rule re-implemented here in a
few lines (official script, else VLMEvalKit), independently of the scorer under test."""

import base64
import json
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
