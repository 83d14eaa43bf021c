"""POPE: yes/no reading and accuracy, precision, recall, F1 and yes-ratio per split.

Rules (InternVL's `eval/pope/eval_pope.py`, itself LLaVA's `eval_pope.py`):
  * only the text before the first "." counts; commas are deleted; the text is split on single
    spaces; if the words include "No", "no" or "not" the answer is no, otherwise yes (an empty
    or off-topic answer counts as yes; "NO" is yes, "No." and "no, it is not" are no);
  * "yes" is the positive class; per split (adversarial, popular, random): accuracy,
    precision = TP / (TP + FP), recall = TP / (TP + FN), F1, yes-ratio = share answered yes;
  * the reported POPE number is the mean F1 over the splits (`f1_mean`).

A row may belong to several splits (VLMEvalKit's POPE TSV lists them comma-separated in
`category`): it counts once in each, as VLMEvalKit's `POPE_rating` does after splitting the
category on ","; `overall` pools those per-split rows (VLMEvalKit's "Overall" F1).

Where the references disagree: the script divides by zero when a split has no positive
prediction; we report precision (and F1) 0 there. VLMEvalKit's POPE uses its word-level yes/no
extraction (both or neither of yes/no -> Unknown, counted wrong) and headlines the pooled
"Overall" F1 rather than the mean over splits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping


def parse_yes_no(response: str) -> str:
    text = response.split(".")[0] if "." in response else response
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(preds: Iterable[bool], labels: Iterable[bool]) -> dict:
    """preds / labels: True for yes. Accuracy, precision, recall, F1, yes-ratio (fractions)."""
    tp = fp = tn = fn = 0
    for p, t in zip(preds, labels, strict=True):
        tp += p and t
        fp += p and not t
        tn += not p and not t
        fn += not p and t
    n = tp + fp + tn + fn
    if n == 0:
        raise ValueError("binary_metrics: no predictions")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "num_questions": n}


def pope_scores(records: Iterable[Mapping]) -> dict:
    """records: {splits (list), pred_yes, label_yes} -> per-split metrics, the mean F1 over
    splits and the metrics of all per-split rows pooled."""
    by_split: dict[str, list] = defaultdict(list)
    for r in records:
        for s in r["splits"]:
            by_split[s].append((bool(r["pred_yes"]), bool(r["label_yes"])))
    splits = {s: binary_metrics([p for p, _ in v], [t for _, t in v])
              for s, v in sorted(by_split.items())}
    pooled = [x for v in by_split.values() for x in v]
    return {"f1_mean": sum(m["f1"] for m in splits.values()) / len(splits),
            "accuracy_mean": sum(m["accuracy"] for m in splits.values()) / len(splits),
            "overall": binary_metrics([p for p, _ in pooled], [t for _, t in pooled]),
            "splits": splits}
