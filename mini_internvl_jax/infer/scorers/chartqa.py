"""ChartQA relaxed accuracy.

Rule (pix2struct's `relaxed_correctness`, which ChartQA results are reported with): both strings
are parsed with Python's `float` (a trailing `%` divides by 100; thousands separators such as
"1,234" are not numbers and fall back to string comparison, as in the reference code); if both
parse and the reference is nonzero, the answer is correct when |prediction - reference| <= 5% of
|reference|; otherwise a case-insensitive exact match is required. The best score over the
reference answers counts.

Where the references disagree: InternVL's `evaluate_vqa.py` swaps the arguments, measuring the
5% against the *prediction*; `relative_to="prediction"` reproduces that, and the task reports
both numbers.
"""

from __future__ import annotations

from collections.abc import Sequence


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, reference: str, tolerance: float = 0.05, *,
                        relative_to: str = "reference") -> bool:
    if relative_to not in ("reference", "prediction"):
        raise ValueError(f"relative_to must be 'reference' or 'prediction', got {relative_to!r}")
    prediction, reference = prediction.strip(), reference.strip()
    p, r = _to_float(prediction), _to_float(reference)
    base = r if relative_to == "reference" else p
    if p is not None and r is not None and base:
        return abs(p - r) / abs(base) <= tolerance
    return prediction.lower() == reference.lower()


def chartqa_score(prediction: str, references: str | Sequence[str], *,
                  relative_to: str = "reference") -> float:
    refs = [references] if isinstance(references, str) else list(references)
    return float(max(relaxed_correctness(prediction, r, relative_to=relative_to) for r in refs))
