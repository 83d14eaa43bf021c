"""Benchmark scoring: ChartQA relaxed accuracy, MMBench choice extraction + CircularEval, VQA.

ChartQA (pix2struct's definition): both strings are parsed with Python's `float` (a trailing
`%` divides by 100; thousands separators such as "1,234" are not numbers and fall back to string
comparison, as in the reference code); if both parse and the reference is nonzero, the answer
is correct when |prediction - reference| <= 5% of |reference|; otherwise a case-insensitive
exact match is required. The best score over the reference answers counts. InternVL's
`evaluate_vqa.py` swaps the arguments, measuring the 5% against the *prediction*;
`relative_to="prediction"` reproduces that.

MMBench: the prediction is mapped to an option letter (a bare letter, a letter followed by
punctuation such as "B." or "(B)", "The answer is B", or the one option whose text it
contains; "A cat" is read as text, not as option A). CircularEval asks
each question once per rotation of its options and counts it only if every rotation is right.

VQA: answers are normalised as in the official VQA evaluation (lowercase, punctuation rules,
number words to digits, articles dropped, unambiguous contractions restored); `exact_match` is 1 if
the prediction equals any reference, `vqa_accuracy` the official min(1, matches / 3) averaged
over the leave-one-out subsets of the human answers.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence

LETTERS = "ABCDEFGHIJ"

# ---------------------------------------------------------------------------------- ChartQA


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


# ---------------------------------------------------------------------------------- MMBench

MMBENCH_PROMPT = {"en": "Answer with the option's letter from the given choices directly.",
                  "cn": "请直接回答选项字母。"}


def mmbench_question(question: str, options: Sequence[str], hint: str | None = None,
                     lang: str = "en") -> str:
    """InternVL's MMBench prompt: hint, question, lettered options, instruction."""
    lines = ([hint] if hint else []) + [question]
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines + [MMBENCH_PROMPT[lang]])


def extract_choice(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter a free-form answer names, or None when it names none (or several)."""
    letters = LETTERS[:len(options)]
    text = prediction.strip()
    m = re.match(r"^[\(\[]?([A-J])(?:[\)\]\.:,]|$)", text)
    if m and m.group(1) in letters:
        return m.group(1)
    m = re.match(r"^(?:the )?(?:answer|option)(?: is)?\s*[:：]?\s*[\(\[]?([A-J])\b", text,
                 flags=re.IGNORECASE)
    if m and m.group(1) in letters:
        return m.group(1)
    found = [letters[i] for i, opt in enumerate(options)
             if opt and opt.strip().lower() in text.lower()]
    return found[0] if len(found) == 1 else None


def rotate_options(options: Sequence[str], answer: str, shift: int) -> tuple[list[str], str]:
    """Options moved `shift` places to the front (circularly) and the answer's new letter."""
    n = len(options)
    idx = LETTERS.index(answer)
    if idx >= n:
        raise ValueError(f"answer {answer!r} is not among {n} options")
    rotated = [options[(i + shift) % n] for i in range(n)]
    return rotated, LETTERS[(idx - shift) % n]


def circular_accuracy(results: Iterable[tuple[str, bool]]) -> float:
    """(question id, correct) per rotation -> share of questions right in every rotation."""
    by_question: dict[str, bool] = {}
    for qid, ok in results:
        by_question[qid] = by_question.get(qid, True) and bool(ok)
    if not by_question:
        return 0.0
    return sum(by_question.values()) / len(by_question)


# -------------------------------------------------------------------------------------- VQA

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "im": "i'm", "ive": "i've",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "shant": "shan't", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "thats": "that's", "thered": "there'd", "theres": "there's", "theyd": "they'd",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(text: str) -> str:
    original = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = original
    for p in _PUNCT:  # the rule looks at the original string, as the official code does
        if (p + " " in original or " " + p in original) or _COMMA_STRIP.search(original):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_exact_match(prediction: str, references: str | Sequence[str]) -> float:
    refs = [references] if isinstance(references, str) else list(references)
    pred = normalize_vqa_answer(prediction)
    return float(any(pred == normalize_vqa_answer(r) for r in refs))


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Official VQA accuracy: mean over leave-one-out subsets of min(1, matches / 3)."""
    refs = [normalize_vqa_answer(r) for r in references]
    if len(refs) < 2:
        return vqa_exact_match(prediction, references)
    pred = normalize_vqa_answer(prediction)
    scores = [min(1.0, sum(r == pred for r in others) / 3.0)
              for others in itertools.combinations(refs, len(refs) - 1)]
    return sum(scores) / len(scores)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def summarize(task: str, records: Sequence[Mapping]) -> dict:
    """Overall scores from per-item records written by the evaluator."""
    out = {"task": task, "num_items": len(records)}
    if task == "chartqa":
        out["relaxed_accuracy"] = mean(r["score"] for r in records)
        out["relaxed_accuracy_internvl"] = mean(r["score_internvl"] for r in records)
    elif task == "vqa":
        out["exact_match"] = mean(r["exact_match"] for r in records)
        out["vqa_accuracy"] = mean(r["vqa_accuracy"] for r in records)
    elif task == "mmbench":
        out["circular_accuracy"] = circular_accuracy((r["id"], r["correct"]) for r in records)
        out["accuracy_first_rotation"] = mean(r["correct"] for r in records
                                              if r["rotation"] == 0)
        out["num_questions"] = len({r["id"] for r in records})
    else:
        raise ValueError(f"unknown task {task!r}; expected chartqa, mmbench or vqa")
    return out
