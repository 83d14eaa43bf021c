"""MathVista: answer extraction for multiple-choice and numeric answers, and accuracy.

Rules (MathVista's official `extract_answer.py` + `calculate_score.py`, which InternVL's
`eval/mathvista` copies):
  * extraction: an empty response gives ""; a multiple-choice response equal to one of the
    choices is taken as is; an integer (float) answer type takes the response if `int(...)`
    (`float(...)`) parses it; `The answer is "X".` gives X;
  * normalisation: multiple choice - a "(X)" letter is read first; an option letter becomes
    its choice text; anything else becomes the choice with the smallest edit distance;
    integer -> str(int(float(x))); float -> str(round(float(x), precision)); list -> str(x);
    an unparsable number gives no answer;
  * an item is right when the normalised extraction equals the answer string.

Where the references disagree: the official pipeline (and VLMEvalKit's) sends every response
the quick rules cannot read to GPT-4 for extraction. Without it we apply rules instead: for
multiple choice the option letter the response names (VLMEvalKit's `can_infer` letter rule,
also "A." and "(A)") or else the response itself (then the closest choice); for numbers the
last number in the response after an "answer is" / "answer:" marker if present, else in the
whole response (thousands commas removed). This agrees with GPT extraction on direct answers
and on "... The answer is 12." style reasoning; scores on long free-form reasoning can differ.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mini_internvl_jax.infer.scorers.anls import levenshtein
from mini_internvl_jax.infer.scorers.multiple_choice import LETTERS, extract_letter

_QUICK = re.compile(r'The answer is "(.*)"\.')
_MARKER = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")


def _last_number(text: str) -> str | None:
    m = list(_MARKER.finditer(text))
    tail = text[m[-1].end():] if m else text
    nums = _NUMBER.findall(tail.replace(",", "")) or _NUMBER.findall(text.replace(",", ""))
    return nums[-1] if nums else None


def extract_answer(response: str, question_type: str, answer_type: str,
                   choices: Sequence[str]) -> str:
    """The answer a response gives (official quick rules, then our rule fallback)."""
    response = response.strip()
    if not response:
        return ""
    if question_type == "multi_choice" and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    m = _QUICK.search(response)
    if m:
        return m.group(1)
    if question_type == "multi_choice":
        letter = extract_letter(response, list(choices))
        return letter if letter is not None else response
    if answer_type in ("integer", "float"):
        num = _last_number(response)
        return num if num is not None else response
    return response


def normalize_extracted(extraction: str, question_type: str, answer_type: str,
                        choices: Sequence[str], precision: int | None) -> str | None:
    """Official `normalize_extracted_answer`."""
    if question_type == "multi_choice":
        extraction = extraction.strip()
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        options = list(LETTERS[:len(choices)])
        if extraction in options:
            return choices[options.index(extraction)]
        dists = [levenshtein(extraction, c) for c in choices]
        return choices[dists.index(min(dists))]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision or 0)))
    except ValueError:
        return None
    return str(extraction)


def mathvista_correct(response: str, answer: str, question_type: str, answer_type: str,
                      choices: Sequence[str], precision: int | None) -> tuple[str | None, bool]:
    """(normalised extraction, right?) for one item."""
    ext = extract_answer(response, question_type, answer_type, choices)
    norm = normalize_extracted(ext, question_type, answer_type, choices, precision)
    return norm, norm is not None and norm == str(answer)
