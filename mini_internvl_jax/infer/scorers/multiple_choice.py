"""Multiple-choice answer matching for AI2D and SEED-Image (and the MMBench-style prompt).

Prompt (InternVL's multiple-choice prompt, eval/mmbench and VLMEvalKit's InternVL wrapper):
the hint line if any, the question, one "X. option" line per option, then "Answer with the
option's letter from the given choices directly."

Extraction (VLMEvalKit's `can_infer`, without its LLM-judge fallback):
  1. the characters .()[],:;!*#{} become spaces and the text is split into words; if exactly
     one option letter occurs as a whole word, that letter is the answer ("A.", "(A)",
     "Answer: A", "A cat" all give A; "A or B" gives none);
  2. otherwise, if exactly one option's text occurs in the lowercased prediction, its letter;
  3. otherwise no answer (counted wrong).

Where the references disagree: InternVL's own AI2D score compares the stripped, lowercased
prediction to the answer letter exactly, and its SEED script compares `prediction == answer`,
so "A." or "(A)" count wrong there; we report that strict rate too (`accuracy_exact`).
VLMEvalKit would send unmatched answers to an LLM judge (not reproduced). The MMBench scorer
(`mmbench.py`) reads "A cat" as option text, as InternVL's MMBench post-processing does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
_SPACED = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def mc_prompt(question: str, options: Sequence[str], hint: str | None = None,
              suffix: str = MC_SUFFIX) -> str:
    lines = ([f"Hint: {hint}"] if hint else []) + [question]
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines + [suffix] if suffix else lines)


def extract_letter(prediction: str, options: Mapping[str, str] | Sequence[str]) -> str | None:
    """The option letter `prediction` names (rules in the module docstring), or None."""
    choices = (dict(options) if isinstance(options, Mapping)
               else {LETTERS[i]: o for i, o in enumerate(options)})
    words = prediction.translate(_SPACED).split()
    named = [c for c in choices if c in words]
    if len(named) == 1:
        return named[0]
    text = prediction.lower()
    found = [c for c, opt in choices.items() if str(opt).lower() in text]
    return found[0] if len(found) == 1 else None


def exact_letter(prediction: str, answer: str) -> bool:
    """InternVL's strict rule: the whole answer is the letter (case-insensitive)."""
    return prediction.strip().lower() == answer.strip().lower()
