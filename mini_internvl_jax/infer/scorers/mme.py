"""MME: yes/no parsing, per-category acc and acc+, perception and cognition scores.

Rules (MME's official `calculation.py`, after InternVL's `eval/mme/eval.py` post-processing):
  * post-processing (InternVL): newlines removed; the Chinese answers 不是 / 是 / 否 become
    No / Yes / No; lowercased; "true" -> "yes", "false" -> "no"; remaining CJK characters
    dropped;
  * parsing (official): "yes" / "no" as is; otherwise "yes" if "yes" occurs in the first four
    characters, else "no" if "no" does ("not sure" -> no, "nothing" -> no), else "other"
    (wrong);
  * per category: acc = share of questions right; acc+ = share of images whose questions
    (two per image) are all right; score = 100 * acc + 100 * acc+;
  * perception = sum of the 10 perception categories' scores (max 2000), cognition = sum of
    the 4 cognition ones (max 800); the card's "MME sum" is their total.

Where the references disagree: VLMEvalKit's MME uses its generic yes/no extraction (the
answer's words after VQA punctuation processing: "yes" without "no" -> Yes, the reverse -> No,
else Unknown), so "not sure" is Unknown there but "no" here, and "No, yes" is Unknown there but
"no" here. VLMEvalKit computes acc+ as val[0] * val[1] (first two questions of an image); we
require all questions of an image, which is the same for MME's two questions per image.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")
_CJK = re.compile(r"[\u4e00-\u9fa5]")


def post_process(response: str) -> str:
    """InternVL's MME answer clean-up."""
    text = response.replace("\n", "").replace("不是", "No").replace("是", "Yes")
    text = text.replace("否", "No").lower().replace("true", "yes").replace("false", "no")
    return _CJK.sub("", text)


def parse_yes_no(response: str) -> str:
    """'yes', 'no' or 'other' from a free-form answer (official MME rule)."""
    text = post_process(response)
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping]) -> dict:
    """records: {category, image, correct} per question -> per-category and summed scores."""
    by_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_cat[r["category"]][r["image"]].append(bool(r["correct"]))
    cats = {}
    for cat, images in by_cat.items():
        answers = [ok for oks in images.values() for ok in oks]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(oks) for oks in images.values()) / len(images)
        cats[cat] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus,
                     "score": 100 * acc + 100 * acc_plus, "num_questions": len(answers)}
    unknown = sorted(set(cats) - set(PERCEPTION) - set(COGNITION))
    if unknown:
        raise ValueError(f"MME categories {unknown} are none of {PERCEPTION + COGNITION}")
    perception = sum(cats[c]["score"] for c in PERCEPTION if c in cats)
    cognition = sum(cats[c]["score"] for c in COGNITION if c in cats)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition,
            "categories": cats}
