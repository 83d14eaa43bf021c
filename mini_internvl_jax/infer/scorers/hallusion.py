"""HallusionBench: yes/no extraction and question-, figure- and all-level accuracy.

References: the benchmark's own `utils.py` (`get_eval_all`, `get_eval_fig`,
`get_eval_pair_all`) for its JSON release, VLMEvalKit's `Hallusion_rating` for its TSV.
  * the answer is yes/no/unknown from the prediction's words (VLMEvalKit's `YOrN_Extraction`:
    lowercased, VQA punctuation processing, split on spaces; "yes" without "no" -> yes, "no"
    without "yes" -> no, else unknown, which is wrong);
  * aAcc = share of questions right; fAcc = share of figures (group, set_id, figure_id) with
    every question right; qAcc = share of questions (group, set_id, question_id) right on every
    figure they are asked about; all in percent, overall and per table row.
  * the group is category + subcategory for the official JSON (its scripts' keys) and
    `l2-category` alone for VLMEvalKit's TSV, whose ids come from its `index`; the per-category
    rows are category and category/subcategory (official) or category and l2-category
    (VLMEvalKit), as each prints them.

Where the references disagree: the benchmark's script judges answers with GPT-4 (not reproduced:
the yes/no word rule stands in, as in VLMEvalKit without a judge).
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
        base = (*r["group"], r["set_id"])
        figs[base + (r["figure_id"],)].append(bool(r["correct"]))
        qs[base + (r["question_id"],)].append(bool(r["correct"]))
    return {"aAcc": 100 * sum(bool(r["correct"]) for r in rows) / len(rows),
            "fAcc": 100 * sum(map(all, figs.values())) / len(figs),
            "qAcc": 100 * sum(map(all, qs.values())) / len(qs),
            "num_questions": len(rows)}


def hallusion_scores(records: Iterable[Mapping]) -> dict:
    """records: {group (list), tables (list of row names), set_id, figure_id, question_id,
    correct}."""
    rows = list(records)
    if not rows:
        raise ValueError("hallusion_scores: no records")
    groups: dict[str, list] = defaultdict(list)
    for r in rows:
        for name in r["tables"]:
            groups[str(name)].append(r)
    return {"overall": _accs(rows), "categories": {k: _accs(v) for k, v in sorted(groups.items())}}
