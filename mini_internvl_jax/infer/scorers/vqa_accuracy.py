"""TextVQA accuracy: EvalAI answer normalisation and the 10-annotator soft score.

Rules (TextVQA's EvalAI evaluator, the m4c/LLaVA `TextVQAAccuracyEvaluator` that InternVL's
`eval/vqa/textvqa_eval.py` uses):
  * every answer (prediction and references) is normalised the same way: lowercased; ","
    and "?" deleted; "'s" split off as " 's"; newlines and tabs to spaces; punctuation from
    `PUNCTUATIONS` deleted when it touches a space (or when the text holds a digit,comma,digit
    group), else replaced by a space; periods not next to a digit deleted; number words
    ("none", "zero" ... "ten") become digits; articles (a, an, the) dropped; missing
    apostrophes restored from the contraction table ("dont" -> "don't");
  * the score is min(1, matches / 3) averaged over the leave-one-out subsets of the (10)
    human answers: a prediction three annotators gave scores 0.9 (= (7 * 1 + 3 * 2/3) / 10).

The generic `vqa` task (your own data, any number of answers) normalises the same way and
reports the exact match against any answer too; with a single answer its soft score is that
exact match.

Where the references disagree:
  * the official VQA v2 script (`vqaEval.py`) normalises only when the 10 answers are not all
    equal, and strips no commas or "?" before its punctuation step; EvalAI (TextVQA)
    normalises always. We follow EvalAI.
  * Both tables list capitalised keys ("Im", "Ive", "Id've"), which never match the
    lowercased text, so "im" stays "im"; we keep that behaviour (and leave those keys out).
  * The period rule's regex `(?!<=\\d)` is a typo for a lookbehind in every copy; it acts as
    "not followed by a digit" only ("1.5" keeps its period, "3." loses it). Reproduced.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
              "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(,)+(?=\d)")

# Canonical forms of the EvalAI contraction table. A form with one apostrophe is restored from
# its apostrophe-free spelling; a form with two or more from each spelling missing exactly one
# of them ("couldnt've" and "couldn'tve" -> "couldn't've"), as the table lists them.
_SINGLE = (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's "
    "how'd how'll how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've "
    "o'clock oughtn't shan't should've shouldn't somebody'll somebody's someone'd someone'll "
    "someone's something'd something'll that's there'd there're there's they'd they'll they're "
    "they've 'twas wasn't we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all you'd "
    "you'll you're you've").split()
_MULTI = (
    "couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've somebody'd've "
    "someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've you'd've "
    "y'all'll y'all'd've 'ow's'at").split()


def _contractions() -> dict[str, str]:
    table = {form.replace("'", ""): form for form in _SINGLE}
    for form in _MULTI:
        cuts = [i for i, c in enumerate(form) if c == "'"]
        for i in cuts:
            table[form[:i] + form[i + 1:]] = form
    table["somebody'd"] = "somebodyd"  # sic: the reference table maps this one backwards
    return table


CONTRACTIONS = _contractions()


def _punctuation(text: str) -> str:
    out = text
    strip_all = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATIONS:  # the test looks at the input text, not the running output
        if strip_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """EvalAI's answer processing (see the module docstring)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """min(1, #matches / 3) averaged over the leave-one-out subsets of `answers`."""
    if isinstance(answers, str) or len(answers) < 2:
        raise ValueError("vqa_accuracy needs the list of human answers (10 for TextVQA), got "
                         f"{answers!r}")
    refs = [normalize_answer(a) for a in answers]
    pred = normalize_answer(prediction)
    hits = sum(r == pred for r in refs)
    # leaving out a matching answer leaves hits - 1 matches, any other leaves hits
    total = sum(min(1.0, (hits - (r == pred)) / 3.0) for r in refs)
    return total / len(refs)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))
