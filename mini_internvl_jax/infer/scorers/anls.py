"""ANLS (average normalised Levenshtein similarity) for DocVQA and InfographicVQA.

Reference: the official DocVQA / InfographicVQA evaluation script (RRC `evaluation.py`), which
VLMEvalKit's `anls_compute`, lmms-eval and InternVL's `eval/vqa/evaluate_vqa.py` follow: the
edit distance is taken between the normalised strings (lowercased, stripped, whitespace runs
collapsed to one space), but the denominator is max(len(gt.upper()), len(pred.upper())) of the
*raw* strings, so extra spaces in a prediction lower its distance ratio; NL = 0 when both are
empty. The item scores 1 - min NL over the reference answers, or 0 when that is below the
threshold 0.5 (`score < threshold` is zeroed: NL exactly 0.5 keeps 0.5, where the ST-VQA
paper's formula `NL < tau` would give 0; we follow the script).
"""

from __future__ import annotations

from collections.abc import Sequence

ANLS_THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().split())


def normalized_distance(prediction: str, answer: str) -> float:
    """Edit distance of the normalised strings over the longer raw length (as the script)."""
    length = max(len(answer.upper()), len(prediction.upper()))
    return 0.0 if length == 0 else levenshtein(_norm(answer), _norm(prediction)) / length


def anls(prediction: str, answers: str | Sequence[str], threshold: float = ANLS_THRESHOLD
         ) -> float:
    """ANLS of one prediction against its reference answers (best answer counts)."""
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise ValueError("anls: no reference answers")
    score = 1.0 - min(normalized_distance(prediction, a) for a in refs)
    return 0.0 if score < threshold else score
