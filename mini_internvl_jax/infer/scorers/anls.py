"""ANLS (average normalised Levenshtein similarity) for DocVQA and InfographicVQA.

Rule (the official DocVQA / InfographicVQA evaluation script, which InternVL's
`eval/vqa/evaluate_vqa.py` calls): both strings are lowercased, stripped and their whitespace
runs collapsed to one space; NL = edit distance / max(len(gt), len(pred)) (0 when both are
empty); the item scores 1 - min NL over the reference answers, or 0 when that is below the
threshold 0.5. At NL exactly 0.5 the script keeps 0.5 (`score < threshold` is zeroed), while the
ST-VQA paper's formula (`NL < tau`) would give 0; we follow the script.

VLMEvalKit's `anls_compute` differs in one detail: the denominator uses the lengths of the
*unnormalised* strings, so extra spaces in a prediction lower its distance ratio there.
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
    p, a = _norm(prediction), _norm(answer)
    length = max(len(p), len(a))
    return 0.0 if length == 0 else levenshtein(a, p) / length


def anls(prediction: str, answers: str | Sequence[str], threshold: float = ANLS_THRESHOLD
         ) -> float:
    """ANLS of one prediction against its reference answers (best answer counts)."""
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise ValueError("anls: no reference answers")
    score = 1.0 - min(normalized_distance(prediction, a) for a in refs)
    return 0.0 if score < threshold else score
