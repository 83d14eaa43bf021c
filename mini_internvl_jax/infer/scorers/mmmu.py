"""MMMU: answer extraction for multiple-choice and open questions, and accuracy per subject.

Rules (MMMU's official `eval_utils.py`, which InternVL's `eval/mmmu/main_eval_only.py` runs):
  * multiple choice (`parse_multi_choice_response`): ",.!?;:'" stripped from both ends, the
    text padded with spaces; candidates are the letters written "(X)"; if none, letters
    written " X " (standalone); if none and the answer has more than 5 words, options whose
    text occurs in it; with several candidates the one occurring last wins; with none the
    official code draws a random letter (seeded) - here the item gets no answer, which
    counts wrong (so an unparsable answer scores 0 instead of 1/N in expectation);
  * open (`parse_open_response`): the lowercased answer is split into lines; from each the
    shortest tail after an indicator ("could be ", "so ", "is ", "thus ", "therefore ",
    "final ", "answer ", "result ", and "=" on the last line) is kept; numbers in those
    tails are extracted (with thousands commas, scientific, simple); every candidate is
    normalised (numbers -> float rounded to 2 places, text lowercased, one-character text
    padded to avoid trivial matches);
  * open scoring (`eval_open`): a number candidate must equal a normalised gold number; a text
    candidate is right if a normalised gold string occurs in it.

Where the references disagree: InternVL's `evaluate_mmmu.py` first maps a multiple-choice
answer with its own `post_process` (a one-character answer as is, else its first character
if that is an option letter - "Because ..." becomes B - else the first option whose text it
contains) before the official parsing; we apply the official parsing to the raw answer.
The official sentence split `\\.\\s(?=[A-Z])` runs after lowercasing and so never fires; only
newlines split (reproduced). Later copies (lmms-eval) also accept "X." before "(X)".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_STRIP = ",.!?;:'"
_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}


def parse_multi_choice_response(response: str, index2ans: Mapping[str, str]) -> str | None:
    """The option letter an answer picks (rules in the module docstring), or None."""
    for ch in _STRIP:
        response = response.strip(ch)
    response = f" {response} "
    letters = list(index2ans)
    cands = [c for c in letters if f"({c})" in response]
    bracket = bool(cands)
    if not cands:
        cands = [c for c in letters if f" {c} " in response]
    by_text = False
    if not cands and len(response.split()) > 5:
        cands = [c for c, ans in index2ans.items() if ans.lower() in response.lower()]
        by_text = bool(cands)
    if not cands:
        return None
    if len(cands) == 1:
        return cands[0]
    if by_text:
        pos = [response.lower().rfind(index2ans[c].lower()) for c in cands]
    elif bracket:
        pos = [response.rfind(f"({c})") for c in cands]
    else:
        pos = [response.rfind(f" {c} ") for c in cands]
    return cands[pos.index(max(pos))]


def extract_numbers(text: str) -> list[str]:
    commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])", text)
    return commas + scientific + simple


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_str(text: str) -> list[str | float]:
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _key_responses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, part in enumerate(parts):
        indicators = _INDICATORS + (("=",) if i == len(parts) - 1 else ())
        shortest = ""
        for ind in indicators:  # an empty tail is replaced by any later one, as in the reference
            if ind in part:
                tail = part.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list[str | float]:
    """Normalised candidate answers of an open question's response."""
    keys = _key_responses(response)
    cands: list[str] = keys + [n for k in keys for n in extract_numbers(k)]
    out: list[str | float] = []
    for c in cands:
        for v in normalize_str(c):
            if v not in out:
                out.append(v)
    return out


def eval_open(gold: str | Sequence[str], candidates: Sequence[str | float]) -> bool:
    golds = [gold] if isinstance(gold, str) else list(gold)
    norm = [v for g in golds for v in normalize_str(g)]
    for c in candidates:
        if isinstance(c, str):
            if any(isinstance(n, str) and n in c for n in norm):
                return True
        elif c in norm:
            return True
    return False


def subject_of(item_id: str) -> str:
    """'validation_Art_Theory_12' -> 'Art_Theory' (MMMU ids are split_subject_number)."""
    parts = item_id.split("_")
    return "_".join(parts[1:-1]) if len(parts) >= 3 else "all"
