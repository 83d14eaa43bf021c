"""Task registry: per benchmark the prompt InternVL uses, `max_new_tokens`, the fields read
from a row (formats: `infer/eval_data.py`), the per-item scorer and the summary.

Prompts (InternVL's `eval/` scripts unless noted):
  * short answers (DocVQA, InfoVQA, TextVQA, ChartQA, OCRBench, generic VQA; MME and POPE
    after their own question text): question + " Answer the question using a single word or
    phrase." (`evaluate_vqa.py`, `mme/eval.py`, `evaluate_pope.py`; VLMEvalKit joins with a
    newline for OCRBench);
  * multiple choice (AI2D, SEED-Image, MMBench, MMMU): question, "X. option" lines, "Answer with
    the option's letter from the given choices directly.";
  * MME questions carry their own "Please answer yes or no."; HallusionBench gets
    " Please answer yes or no. Answer the question using a single word or phrase."
    (VLMEvalKit's InternVL wrapper);
  * MathVista: the dataset's `query` (its hint + question + choices), as InternVL does.
`max_new_tokens` follows the same scripts (10 for TextVQA / AI2D, 20 for MME, 100 for the
rest) except MathVista (512 here, room for short reasoning; InternVL allows more).

Every task reads several images a row (an `image` list, MMMU's `image_1`...; prompted
`Image-1: <image>`..., tile budget shared); only generic VQA reads `video` rows (`Frame1:
<image>`...), the other benchmarks being image benchmarks.

Scores are in percent (ANLS and accuracies x 100), MME and OCRBench in their points, as the
Mini-InternVL model cards print them.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mini_internvl_jax.infer.eval_data import ROW_ID_KEYS, EvalDataError, as_list, image_refs
from mini_internvl_jax.infer.scorers import (
    anls,
    chartqa,
    hallusion,
    mathvista,
    mmbench,
    mme,
    mmmu,
    multiple_choice,
    ocrbench,
    pope,
    vqa_accuracy,
)

SHORT = "Answer the question using a single word or phrase."
YES_NO = "Please answer yes or no."


@dataclass(frozen=True)
class Item:
    """One generation request: `ref` holds what the scorer needs (JSON-serialisable)."""

    id: str
    prompt: str
    images: tuple
    ref: dict


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # what the headline number is
    max_new_tokens: int
    formats: str
    build: Callable[[dict, str, Path, Mapping], list[Item]]
    score: Callable[[dict, str], dict]
    summarize: Callable[[list[dict]], dict]
    headline: str  # key of the headline metric in the summary's "metrics"
    # Settings read from the whole file before any row is built (e.g. MMBench: whether it
    # already holds the circular copies).
    scan: Callable[[list[dict]], dict] | None = None


# ------------------------------------------------------------------------- field helpers


def _get(row: dict, names: Sequence[str], where: str, *, required: bool = True):
    for n in names:
        v = row.get(n)
        if v is not None and not (isinstance(v, str) and v.strip() in ("", "nan")):
            return v
    if required:
        raise EvalDataError(f"{where}: missing field {' / '.join(repr(n) for n in names)}")
    return None


def _text(row: dict, names: Sequence[str], where: str) -> str:
    v = _get(row, names, where)
    if not isinstance(v, str):
        raise EvalDataError(f"{where}: field {names[0]!r} must be text, got {v!r}")
    return v


def _answers(row: dict, where: str, names=("answers", "answer")) -> list[str]:
    vals = as_list(_get(row, names, where), where, names[0])
    if not vals or not all(isinstance(v, (str, int, float)) for v in vals):
        raise EvalDataError(f"{where}: field {names[0]!r} must hold answer strings")
    return [str(v) for v in vals]


def _id(row: dict, where: str, names=ROW_ID_KEYS):
    v = _get(row, names, where, required=False)
    return str(v) if v is not None else where.rsplit(":", 1)[-1]


def _category(row: dict, names: Sequence[str]) -> str:
    v = _get(row, names, "", required=False)
    return str(v) if v is not None else "all"


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _by_category(records: list[dict], key: str, scale: float = 100.0) -> dict:
    groups: dict[str, list] = defaultdict(list)
    for r in records:
        groups[r.get("category", "all")].append(r[key])
    return {c: {key: scale * _mean(v), "num_questions": len(v)}
            for c, v in sorted(groups.items())}


def _options(row: dict, where: str) -> list[str]:
    """Options from `options` / `choices` (list, dict or literal), letter columns A, B, ...
    (VLMEvalKit TSV) or choice_a, choice_b, ... (SEED-Bench)."""
    raw = _get(row, ("options", "choices"), where, required=False)
    if raw is not None:
        if isinstance(raw, dict):
            opts = [raw[k] for k in sorted(raw) if raw[k] not in (None, "")]
        else:
            opts = as_list(raw, where, "options")
    else:
        opts = []
        for letter in multiple_choice.LETTERS:
            v = _get(row, (letter, f"choice_{letter.lower()}"), where, required=False)
            if v is None:
                break
            opts.append(v)
    if len(opts) < 2 or not all(isinstance(o, (str, int, float)) for o in opts):
        raise EvalDataError(f"{where}: expected 2 or more options ('options' list, or columns "
                            f"A, B, ... / choice_a, choice_b, ...), got {opts!r}")
    return [str(o).strip() for o in opts]


def _letter(row: dict, where: str, n: int) -> str:
    ans = str(_get(row, ("answer",), where)).strip()
    if ans.isdigit() and int(ans) < n:  # lmms-lab AI2D stores the option index
        ans = multiple_choice.LETTERS[int(ans)]
    ans = ans.upper()
    if ans not in multiple_choice.LETTERS[:n]:
        raise EvalDataError(f"{where}: answer {ans!r} is not one of the {n} option letters")
    return ans


# ------------------------------------------------------------------- short-answer tasks


def _short_build(category_keys=()):
    """Short-answer rows; also ChartQA's official JSON and HF parquet (`query`, `label`)."""
    def build(row, where, root, settings):
        q = _text(row, ("question", "query"), where)
        ref = {"answers": _answers(row, where, ("answers", "answer", "label")),
               "category": _category(row, category_keys)}
        return [Item(_id(row, where), f"{q} {SHORT}", image_refs(row, root, where,
                                                                  required=True), ref)]
    return build


def _chartqa_build(row, where, root, settings):
    """ChartQA's split (human / augmented): a `split`/`type`/`category` column, the HF
    dataset's `human_or_machine` (0 human, 1 machine-generated = augmented), or the official
    file name (test_human.json, test_augmented.json)."""
    (item,) = _short_build(("split", "type", "category"))(row, where, root, settings)
    split = item.ref["category"]
    if split == "all" and row.get("human_or_machine") not in (None, ""):
        split = ("human", "augmented")[int(row["human_or_machine"])]
    elif split == "all":
        name = settings.get("file", "")
        split = next((s for s in ("human", "augmented") if s in name), "all")
    return [Item(item.id, item.prompt, item.images, {**item.ref, "category": split})]


def _anls_score(ref, pred):
    return {"anls": anls.anls(pred, ref["answers"]), "category": ref["category"]}


def _anls_summary(records):
    return {"metrics": {"anls": 100 * _mean(r["anls"] for r in records)},
            "categories": _by_category(records, "anls")}


def _textvqa_build(row, where, root, settings):
    """TextVQA rows; the official JSON names its image by `image_id` only (train_images/
    ID.jpg: --image-root is that folder)."""
    if not any(row.get(k) not in (None, "") for k in ("image", "image_path")) and row.get(
            "image_id") not in (None, ""):
        row = {**row, "image_path": f"{row['image_id']}.jpg"}
    (item,) = _short_build()(row, where, root, settings)
    if len(item.ref["answers"]) < 2:
        raise EvalDataError(f"{where}: TextVQA needs the list of (10) human answers, got "
                            f"{item.ref['answers']!r}")
    return [item]


def _textvqa_score(ref, pred):
    return {"vqa_accuracy": vqa_accuracy.vqa_accuracy(pred, ref["answers"]),
            "category": ref["category"]}


def _textvqa_summary(records):
    return {"metrics": {"vqa_accuracy": 100 * _mean(r["vqa_accuracy"] for r in records)},
            "categories": _by_category(records, "vqa_accuracy")}


def _ocrbench_score(ref, pred):
    return {"hit": ocrbench.ocrbench_hit(pred, ref["answers"], ref["category"]),
            "category": ref["category"]}


def _ocrbench_summary(records):
    s = ocrbench.ocrbench_scores(records)
    cats = {g: {"points": v} for g, v in s["groups"].items()}
    for c, v in s["categories"].items():
        cats[c] = dict(v)
    return {"metrics": {"final_score": s["final_score"],
                        "final_score_norm": s["final_score_norm"]}, "categories": cats}


def _chartqa_score(ref, pred):
    return {"relaxed_accuracy": chartqa.chartqa_score(pred, ref["answers"]),
            "relaxed_accuracy_internvl": chartqa.chartqa_score(pred, ref["answers"],
                                                               relative_to="prediction"),
            "category": ref["category"]}


def _chartqa_summary(records):
    cats = _by_category(records, "relaxed_accuracy")
    return {"metrics": {
        "relaxed_accuracy": 100 * _mean(r["relaxed_accuracy"] for r in records),
        "relaxed_accuracy_internvl": 100 * _mean(r["relaxed_accuracy_internvl"]
                                                 for r in records)},
        "categories": cats}


def _vqa_build(row, where, root, settings):
    q = _text(row, ("question",), where)
    ref = {"answers": _answers(row, where), "category": _category(row, ("category",))}
    return [Item(_id(row, where), f"{q} {SHORT}",
                 image_refs(row, root, where, required=False, videos=True), ref)]


def _vqa_score(ref, pred):
    answers = ref["answers"]
    em = vqa_accuracy.exact_match(pred, answers)
    soft = vqa_accuracy.vqa_accuracy(pred, answers) if len(answers) > 1 else em
    return {"exact_match": em, "vqa_accuracy": soft, "category": ref["category"]}


def _vqa_summary(records):
    return {"metrics": {"exact_match": 100 * _mean(r["exact_match"] for r in records),
                        "vqa_accuracy": 100 * _mean(r["vqa_accuracy"] for r in records)},
            "categories": _by_category(records, "vqa_accuracy")}


# ------------------------------------------------------------------ multiple-choice tasks


def _mc_build(category_keys):
    def build(row, where, root, settings):
        if str(row.get("data_type", "image")) != "image":
            return []  # SEED-Bench's video questions are not SEED-Image
        opts = _options(row, where)
        q = _text(row, ("question",), where)
        hint = _get(row, ("hint",), where, required=False)
        ref = {"options": opts, "answer": _letter(row, where, len(opts)),
               "category": _category(row, category_keys)}
        prompt = multiple_choice.mc_prompt(q, opts, str(hint) if hint else None)
        return [Item(_id(row, where), prompt, image_refs(row, root, where, required=True),
                     ref)]
    return build


def _mc_score(ref, pred):
    letter = multiple_choice.extract_letter(pred, ref["options"])
    return {"choice": letter, "correct": letter == ref["answer"],
            "correct_exact": multiple_choice.exact_letter(pred, ref["answer"]),
            "category": ref["category"]}


def _mc_summary(records):
    return {"metrics": {"accuracy": 100 * _mean(r["correct"] for r in records),
                        "accuracy_exact": 100 * _mean(r["correct_exact"] for r in records)},
            "categories": _by_category(records, "correct")}


COPY_STRIDE = 1_000_000  # MMBench / VLMEvalKit: copy k of question i has index i + k * 1e6


def _mmbench_scan(rows):
    """Whether the file already holds the circular copies (an index >= 1e6)."""
    def big(v):
        try:
            return int(float(v)) >= COPY_STRIDE
        except (TypeError, ValueError):
            return False
    return {"has_copies": any(big(r.get("index")) for r in rows)}


def _mmbench_build(row, where, root, settings):
    """MMBench rows. A file holding the circular copies (MMBench's TSV release, VLMEvalKit's
    TSV, lmms-lab/MMBench: indexes i + k * 1e6) is asked as it is, each copy scored under
    question i; VLMEvalKit's TSV without copies is asked once per row, as VLMEvalKit does;
    other files (JSON) get the rotations made here (unless --no-circular)."""
    opts = _options(row, where)
    if len(opts) > len(mmbench.LETTERS):
        raise EvalDataError(f"{where}: MMBench questions have at most {len(mmbench.LETTERS)} "
                            f"options, got {len(opts)}")
    q = _text(row, ("question",), where)
    answer = _letter(row, where, len(opts))
    lang = str(row.get("lang") or "en")
    if lang not in mmbench.MMBENCH_PROMPT:
        raise EvalDataError(f"{where}: lang must be one of {sorted(mmbench.MMBENCH_PROMPT)}")
    hint = _get(row, ("hint",), where, required=False)
    images = image_refs(row, root, where, required=False)
    qid = _id(row, where)
    category = _category(row, ("category", "l2-category"))
    if settings.get("has_copies") or settings.get("layout") == "VLMEvalKit TSV":
        index = int(float(qid)) if qid.replace(".", "", 1).isdigit() else None
        copy = 0 if index is None else index // COPY_STRIDE
        if copy and not settings.get("circular", True):
            return []
        prompt = mmbench.mmbench_question(q, opts, str(hint) if hint else None, lang)
        group = qid if index is None else str(index % COPY_STRIDE)
        return [Item(qid, prompt, images, {"options": opts, "answer": answer,
                                           "question": group, "rotation": copy,
                                           "category": category})]
    items = []
    for shift in range(len(opts) if settings.get("circular", True) else 1):
        rotated, letter = mmbench.rotate_options(opts, answer, shift)
        prompt = mmbench.mmbench_question(q, rotated, str(hint) if hint else None, lang)
        ref = {"options": rotated, "answer": letter, "question": qid, "rotation": shift,
               "category": category}
        items.append(Item(f"{qid}@{shift}", prompt, images, ref))
    return items


def _mmbench_score(ref, pred):
    choice = mmbench.extract_choice(pred, ref["options"])
    return {"choice": choice, "correct": choice == ref["answer"], "question": ref["question"],
            "rotation": ref["rotation"], "category": ref["category"]}


def _mmbench_summary(records):
    cats: dict[str, dict] = {}
    groups: dict[str, list] = defaultdict(list)
    for r in records:
        groups[r["category"]].append(r)
    for c, rs in sorted(groups.items()):
        cats[c] = {"circular_accuracy": 100 * mmbench.circular_accuracy(
            (r["question"], r["correct"]) for r in rs),
            "num_questions": len({r["question"] for r in rs})}
    return {"metrics": {
        "circular_accuracy": 100 * mmbench.circular_accuracy(
            (r["question"], r["correct"]) for r in records),
        "accuracy_first_rotation": 100 * _mean(r["correct"] for r in records
                                               if r["rotation"] == 0),
        "num_questions": len({r["question"] for r in records})}, "categories": cats}


def _mmmu_build(row, where, root, settings):
    q = _text(row, ("question",), where).strip()
    qtype = str(_get(row, ("question_type",), where, required=False) or "multiple-choice")
    raw = _get(row, ("options",), where, required=False)
    opts = [str(o).strip() for o in as_list(raw, where, "options")] if raw is not None else []
    item_id = _id(row, where, ("id", "index"))
    ref = {"question_type": qtype, "answer": _get(row, ("answer",), where),
           "category": _category(row, ("subject", "subfield")) if row.get("subject")
           else mmmu.subject_of(item_id)}
    if qtype == "multiple-choice":
        if len(opts) < 2:
            raise EvalDataError(f"{where}: a multiple-choice MMMU question needs options")
        ref["options"] = opts
        prompt = multiple_choice.mc_prompt(q, opts)
    elif qtype == "open":
        prompt = f"{q}\n{SHORT}"
    else:
        raise EvalDataError(f"{where}: question_type must be 'multiple-choice' or 'open', "
                            f"got {qtype!r}")
    return [Item(item_id, prompt, image_refs(row, root, where, required=True), ref)]


def _mmmu_score(ref, pred):
    if ref["question_type"] == "multiple-choice":
        index2ans = {multiple_choice.LETTERS[i]: o for i, o in enumerate(ref["options"])}
        parsed = mmmu.parse_multi_choice_response(pred, index2ans)
        gold = as_list(ref["answer"], "answer", "answer")
        return {"parsed": parsed, "correct": parsed in [str(g) for g in gold],
                "category": ref["category"]}
    cands = mmmu.parse_open_response(pred)
    gold = [str(g) for g in as_list(ref["answer"], "answer", "answer")]
    return {"parsed": [str(c) for c in cands], "correct": mmmu.eval_open(gold, cands),
            "category": ref["category"]}


def _accuracy_summary(records):
    return {"metrics": {"accuracy": 100 * _mean(r["correct"] for r in records)},
            "categories": _by_category(records, "correct")}


# ------------------------------------------------------------------------- yes/no tasks


def _yes_no(value, where: str) -> str:
    v = str(value).strip().lower()
    v = {"1": "yes", "0": "no", "true": "yes", "false": "no"}.get(v, v)
    if v not in ("yes", "no"):
        raise EvalDataError(f"{where}: answer must be yes / no (or 1 / 0), got {value!r}")
    return v


def _mme_build(row, where, root, settings):
    q = _text(row, ("question",), where)
    images = image_refs(row, root, where, required=True)
    image_key = _get(row, ("image_path", "question_id"), where, required=False)
    if image_key is None:
        image_key = (images[0] if isinstance(images[0], str)
                     else "sha1:" + hashlib.sha1(images[0]).hexdigest())
    ref = {"answer": _yes_no(_get(row, ("answer",), where), where),
           "category": str(_get(row, ("category",), where)), "image": str(image_key)}
    return [Item(_id(row, where, ("index", "id")), f"{q} {SHORT}", images, ref)]


def _mme_score(ref, pred):
    parsed = mme.parse_yes_no(pred)
    return {"parsed": parsed, "correct": parsed == ref["answer"], "category": ref["category"],
            "image": ref["image"]}


def _mme_summary(records):
    s = mme.mme_scores(records)
    return {"metrics": {"perception": s["perception"], "cognition": s["cognition"],
                        "total": s["total"]}, "categories": s["categories"]}


POPE_SPLITS = ("adversarial", "popular", "random")


def _pope_build(row, where, root, settings):
    """POPE rows: lmms-lab/POPE parquet and VLMEvalKit's TSV (`category`, which may list
    several splits comma-separated: the row counts in each), or the official per-split files
    (coco_pope_random.json: `text`, `label`, `image`; the split from the file name)."""
    q = _text(row, ("question", "text"), where)
    cat = _get(row, ("category", "split"), where, required=False)
    if cat is not None:
        splits = sorted({c.strip() for c in str(cat).split(",") if c.strip()})
    else:
        name = settings.get("file", "")
        splits = [s for s in POPE_SPLITS if s in name][:1] or ["all"]
    ref = {"answer": _yes_no(_get(row, ("answer", "label"), where), where), "splits": splits}
    return [Item(_id(row, where, ("index", "question_id", "id")), f"{q} {SHORT}",
                 image_refs(row, root, where, required=True), ref)]


def _pope_score(ref, pred):
    return {"pred_yes": pope.parse_yes_no(pred) == "yes", "label_yes": ref["answer"] == "yes",
            "splits": ref["splits"]}


def _pope_summary(records):
    s = pope.pope_scores(records)
    cats = {k: {m: (100 * v if m != "num_questions" else v) for m, v in d.items()}
            for k, d in s["splits"].items()}
    return {"metrics": {"f1_mean": 100 * s["f1_mean"],
                        "accuracy_mean": 100 * s["accuracy_mean"],
                        "f1_overall": 100 * s["overall"]["f1"]}, "categories": cats}


def _hallusion_build(row, where, root, settings):
    """HallusionBench rows. Official JSON / lmms-lab parquet: `gt_answer` 1/0, `category`,
    `subcategory`, `set_id`, `figure_id`, `question_id`, the image in `filename` (parquet:
    `image`); `visual_input` "0" marks the questions asked without an image, every other row
    needs its image. VLMEvalKit's TSV: `answer` Yes/No, `category`, `l2-category`, the ids in
    `index` ("_"-separated, parts 3, 4, 5 as its `Hallusion_rating` reads them)."""
    q = _text(row, ("question",), where)
    cat = str(_get(row, ("category",), where))
    vlmevalkit = settings.get("layout") == "VLMEvalKit TSV" or row.get("set_id") in (None, "")
    if vlmevalkit and row.get("l2-category") not in (None, ""):  # its evaluator reads `index`
        parts = str(_get(row, ("index",), where)).split("_")
        if len(parts) < 6:
            raise EvalDataError(f"{where}: field 'index' {row['index']!r} does not hold the "
                                "set, figure and question ids (VLMEvalKit: parts 3, 4, 5 of "
                                "its '_'-separated fields)")
        sub = str(row["l2-category"])
        ids = dict(zip(("set_id", "figure_id", "question_id"), parts[3:6], strict=True))
        group, tables = [sub], [cat, sub]
    else:
        sub = str(_get(row, ("subcategory", "l2-category"), where))
        ids = {k: str(_get(row, (k,), where)) for k in ("set_id", "figure_id", "question_id")}
        group, tables = [cat, sub], [cat, f"{cat}/{sub}"]
    ref = {"answer": _yes_no(_get(row, ("gt_answer", "answer"), where), where),
           "group": group, "tables": tables, **ids}
    no_image = str(row.get("visual_input", "")).strip() == "0"
    images = () if no_image else image_refs(row, root, where, required=True)
    return [Item(_id(row, where, ("index", "id")), f"{q} {YES_NO} {SHORT}", images, ref)]


def _hallusion_score(ref, pred):
    parsed = hallusion.yes_no_words(pred)
    return {"parsed": parsed, "correct": parsed == ref["answer"],
            **{k: ref[k] for k in ("group", "tables", "set_id", "figure_id", "question_id")}}


def _hallusion_summary(records):
    s = hallusion.hallusion_scores(records)
    return {"metrics": s["overall"], "categories": s["categories"]}


# ------------------------------------------------------------------------------ MathVista


# The benchmark's values (AI4Math/MathVista testmini); the scorer has a rule for each.
MATHVISTA_QUESTION_TYPES = ("multi_choice", "free_form")
MATHVISTA_ANSWER_TYPES = ("text", "integer", "float", "list")


def _mathvista_build(row, where, root, settings):
    prompt = _text(row, ("query", "question"), where)
    qtype = str(_get(row, ("question_type",), where))
    atype = str(_get(row, ("answer_type",), where))
    for field, value, allowed in (("question_type", qtype, MATHVISTA_QUESTION_TYPES),
                                  ("answer_type", atype, MATHVISTA_ANSWER_TYPES)):
        if value not in allowed:  # another value would be scored by a rule meant for neither
            raise EvalDataError(f"{where}: MathVista {field} must be one of "
                                f"{', '.join(allowed)}, got {value!r}")
    choices = _get(row, ("choices",), where, required=False)
    choices = [str(c) for c in as_list(choices, where, "choices")] if choices is not None else []
    if qtype == "multi_choice" and len(choices) < 2:
        raise EvalDataError(f"{where}: a multi_choice question needs 'choices'")
    precision = _get(row, ("precision",), where, required=False)
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    ref = {"answer": str(_get(row, ("answer",), where)), "question_type": qtype,
           "answer_type": atype, "choices": choices,
           "precision": int(float(precision)) if precision is not None else None,
           "category": str(meta.get("task") or _category(row, ("task", "category")))}
    return [Item(_id(row, where, ("pid", "index", "id")), prompt,
                 image_refs(row, root, where, required=True), ref)]


def _mathvista_score(ref, pred):
    ext, ok = mathvista.mathvista_correct(pred, ref["answer"], ref["question_type"],
                                          ref["answer_type"], ref["choices"], ref["precision"])
    return {"extraction": ext, "correct": ok, "category": ref["category"]}


# ------------------------------------------------------------------------------- registry

_JSONL = "JSONL / JSON"
_VQA_FIELDS = "question, answers (list) or answer, image"
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("docvqa", "ANLS", 100, f"{_JSONL} ({_VQA_FIELDS}), official JSON ({{'data': [...]}}: "
         "questionId, question, answers, image), TSV (VLMEvalKit), parquet (lmms-lab/DocVQA)",
         _short_build(("question_types",)), _anls_score, _anls_summary,
         "anls"),
    Task("infovqa", "ANLS", 100, f"{_JSONL} ({_VQA_FIELDS}), official JSON ({{'data': [...]}}: "
         "questionId, question, answers, image_local_name), TSV (VLMEvalKit), parquet "
         "(lmms-lab/InfographicVQA)", _short_build(()), _anls_score, _anls_summary, "anls"),
    Task("textvqa", "VQA accuracy", 10, f"{_JSONL} (question, answers: 10 strings, image), "
         "TSV, parquet (lmms-lab/textvqa)", _textvqa_build, _textvqa_score, _textvqa_summary,
         "vqa_accuracy"),
    Task("chartqa", "relaxed accuracy", 100, f"{_JSONL} ({_VQA_FIELDS}; optional split), "
         "official JSON (test_human.json: imgname, query, label), TSV, parquet "
         "(HuggingFaceM4/ChartQA: query, label, human_or_machine)", _chartqa_build,
         _chartqa_score, _chartqa_summary, "relaxed_accuracy"),
    Task("vqa", "VQA accuracy / exact match", 100, f"{_JSONL} ({_VQA_FIELDS}; image optional, "
         "a list of images, or video + num_frames)",
         _vqa_build, _vqa_score, _vqa_summary, "vqa_accuracy"),
    Task("ocrbench", "OCRBench score (of 1000)", 100, f"{_JSONL} (question, answer list, "
         "category, image), TSV (VLMEvalKit OCRBench.tsv), parquet (echo840/OCRBench)",
         _short_build(("category", "question_type", "type")), _ocrbench_score, _ocrbench_summary,
         "final_score"),
    Task("ai2d", "accuracy", 10, f"{_JSONL} (question, options list, answer letter or index, "
         "image), TSV (VLMEvalKit AI2D_TEST: columns A-D), parquet (lmms-lab/ai2d)",
         _mc_build(("category",)), _mc_score, _mc_summary, "accuracy"),
    Task("seed", "accuracy per question type", 100, f"{_JSONL} / TSV (VLMEvalKit SEEDBench_IMG)"
         " / parquet (lmms-lab/SEED-Bench: choice_a-d, question_type_id; video rows skipped)",
         _mc_build(("category", "question_type_id", "question_type")), _mc_score, _mc_summary,
         "accuracy"),
    Task("mmbench", "CircularEval accuracy", 100, f"{_JSONL} (question, options, answer, hint, "
         "lang), TSV (MMBench / VLMEvalKit MMBench_DEV_EN: columns A-D, hint, category; "
         "circular copies at index + k * 1e6), parquet (lmms-lab/MMBench)",
         _mmbench_build, _mmbench_score, _mmbench_summary, "circular_accuracy",
         _mmbench_scan),
    Task("mmmu", "accuracy", 100, f"{_JSONL} / parquet (MMMU/MMMU: id, question, options, "
         "answer, question_type, image_1..image_7)", _mmmu_build, _mmmu_score,
         _accuracy_summary, "accuracy"),
    Task("mme", "perception + cognition score", 20, f"{_JSONL} / TSV (VLMEvalKit MME) / "
         "parquet (lmms-lab/MME): question, answer Yes/No, category, image (image_path or "
         "question_id names the image for acc+)", _mme_build, _mme_score, _mme_summary,
         "total"),
    Task("pope", "F1 (mean over splits)", 100, f"{_JSONL} / TSV / parquet (lmms-lab/POPE): "
         "question, answer yes/no, category (adversarial/popular/random), image", _pope_build,
         _pope_score, _pope_summary, "f1_mean"),
    Task("hallusion", "aAcc / fAcc / qAcc", 64, "official JSON (HallusionBench.json: "
         "question, gt_answer 1/0, category, subcategory, set_id, figure_id, question_id, "
         "visual_input, filename), TSV (VLMEvalKit: index, answer, category, l2-category), "
         "parquet (lmms-lab/HallusionBench)", _hallusion_build, _hallusion_score,
         _hallusion_summary, "aAcc"),
    Task("mathvista", "accuracy", 512, f"{_JSONL} / parquet (AI4Math/MathVista testmini: pid, "
         "query, question_type, answer_type, choices, precision, answer, decoded_image)",
         _mathvista_build, _mathvista_score, _accuracy_summary, "accuracy"),
)}
