"""HallusionBench: yes/no extraction and question-, figure- and all-level accuracy.

Rules (HallusionBench's metric definitions, as computed by VLMEvalKit's `Hallusion_rating`):
  * the answer is yes/no/unknown from the prediction's words (VLMEvalKit's `YOrN_Extraction`:
    lowercased, VQA punctuation processing, split on spaces; "yes" without "no" -> yes, "no"
    without "yes" -> no, else unknown, which is wrong);
  * aAcc = share of questions right; fAcc = share of figures (category, subcategory, set_id,
    figure_id) with every question right; qAcc = share of questions (category, subcategory,
    set_id, question_id) right on every figure they are asked about; all in percent, overall
    and per category (VD / VS) and subcategory.

Where the references disagree: the benchmark's own script judges answers with GPT-4 (not
reproduced here) and groups as above; VLMEvalKit derives set/figure/question ids by splitting
its TSV `index` on "_" and groups by `l2-category` instead of category + subcategory. We read
explicit `set_id`, `figure_id`, `question_id` fields (as in the benchmark's JSON).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from mini_internvl_jax.infer.scorers.vqa_accuracy import _punctuation


def yes_no_words(prediction: str) -> str:
    """'yes', 'no' or 'unknown' (VLMEvalKit's word-level rule)."""
    words = _punctuation(prediction.lower()).split()
    if "yes" in words and "no" not in words:
        return "yes"
    if "no" in words and "yes" not in words:
        return "no"
    return "unknown"


def _accs(rows: list[Mapping]) -> dict:
    figs: dict[tuple, list[bool]] = defaultdict(list)
    qs: dict[tuple, list[bool]] = defaultdict(list)
    for r in rows:
        base = (r["category"], r["subcategory"], r["set_id"])
        figs[base + (r["figure_id"],)].append(bool(r["correct"]))
        qs[base + (r["question_id"],)].append(bool(r["correct"]))
    return {"aAcc": 100 * sum(bool(r["correct"]) for r in rows) / len(rows),
            "fAcc": 100 * sum(map(all, figs.values())) / len(figs),
            "qAcc": 100 * sum(map(all, qs.values())) / len(qs),
            "num_questions": len(rows)}


def hallusion_scores(records: Iterable[Mapping]) -> dict:
    """records: {category, subcategory, set_id, figure_id, question_id, correct}."""
    rows = list(records)
    if not rows:
        raise ValueError("hallusion_scores: no records")
    groups: dict[str, list] = defaultdict(list)
    for r in rows:
        groups[str(r["category"])].append(r)
        groups[f"{r['category']}/{r['subcategory']}"].append(r)
    return {"overall": _accs(rows), "categories": {k: _accs(v) for k, v in sorted(groups.items())}}
