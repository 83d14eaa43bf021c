"""OCRBench: substring hits per category, summed to the 1000-point score.

Rules (OCRBench's official evaluation, identical in VLMEvalKit's `OCRBench.evaluate`, which the
Mini-InternVL table used):
  * Handwritten Mathematical Expression Recognition (HME100k): an answer counts if, with
    newlines and then all spaces removed from both, it is a substring of the prediction
    (case kept);
  * every other category: an answer counts if, lowercased and stripped with newlines turned
    into spaces, it is a substring of the lowercased prediction;
  * one point per question (any of its answers); the 10 categories are reported as 5 groups
    (the six text-recognition categories summed) and a final score out of the number of
    questions (1000 for the full benchmark); `final_score_norm` = final / 10 is what the
    Mini-InternVL average uses.

Where the references disagree: none on the rule; note an empty prediction only hits an empty
answer, and short answers ("1") hit any prediction containing them ("10", "2021").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

HME = "Handwritten Mathematical Expression Recognition"
TEXT_RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition",
                    "Artistic Text Recognition", "Handwriting Recognition",
                    "Digit String Recognition", "Non-Semantic Text Recognition")
GROUPS = ("Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction", HME)
CATEGORIES = TEXT_RECOGNITION + GROUPS


def ocrbench_hit(prediction: str, answers: str | Sequence[str], category: str) -> bool:
    refs = [answers] if isinstance(answers, str) else list(answers)
    if category == HME:
        pred = prediction.strip().replace("\n", " ").replace(" ", "")
        return any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in refs)
    pred = prediction.lower().strip().replace("\n", " ")
    return any(a.lower().strip().replace("\n", " ") in pred for a in refs)


def ocrbench_scores(records: Iterable[Mapping]) -> dict:
    """records: {category, hit} -> points per category and group, final score."""
    points: Counter = Counter()
    counts: Counter = Counter()
    for r in records:
        if r["category"] not in CATEGORIES:
            raise ValueError(f"OCRBench category {r['category']!r} is none of {CATEGORIES}")
        counts[r["category"]] += 1
        points[r["category"]] += bool(r["hit"])
    groups = {"Text Recognition": sum(points[c] for c in TEXT_RECOGNITION)}
    groups.update({g: points[g] for g in GROUPS})
    final = sum(groups.values())
    return {"final_score": final, "final_score_norm": final / 10, "groups": groups,
            "categories": {c: {"points": points[c], "num_questions": counts[c]}
                           for c in CATEGORIES if counts[c]}}
