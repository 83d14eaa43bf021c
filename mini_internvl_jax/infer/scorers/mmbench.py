"""MMBench: InternVL's prompt, its choice extraction and CircularEval.

Prompt (InternVL's `eval/mmbench`): the hint line (unprefixed) if any, the question, one
"X. option" line per option, then the instruction in the question's language.

Extraction: the prediction is mapped to an option letter when it is a bare letter, a letter
followed by punctuation ("B.", "(B)", "C)"), "The answer is B" / "Answer: A", or names exactly
one option's text. "A cat" is read as option text, not as option A, as InternVL's MMBench
post-processing does (AI2D / SEED use VLMEvalKit's word rule instead: `multiple_choice.py`).

CircularEval (MMBench's protocol; VLMEvalKit's `mcq_circular_eval`): each question is asked
once per rotation of its options and counts only if every rotation is answered right. MMBench's
TSV files (and VLMEvalKit's, lmms-lab's parquet) already hold the rotated copies, question i's
k-th copy at index i + k * 1e6 (VLMEvalKit groups by `g_index = index % 1e6`); those are asked as
they are, never rotated again. Files without copies (JSON) are rotated here.

Where the references disagree: VLMEvalKit extracts the choice with its `can_infer` and an LLM
judge for the rest; we use InternVL's rule above (no judge).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

LETTERS = "ABCDEFGHIJ"
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
