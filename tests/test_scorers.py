"""Benchmark scorers on hand-made predictions with hand-computed expected scores.

Each case names the rule it pins; the expected numbers are worked out in the comments from
the reference rules (official scripts / VLMEvalKit / InternVL eval code), not from the code.
"""

import pytest

from mini_internvl_jax.infer.scorers import (
    anls,
    chartqa,
    hallusion,
    mathvista,
    mmbench,
    mme,
    mmmu,
    multiple_choice,
    ocrbench,
    pope,
    vqa_accuracy,
)
from mini_internvl_jax.infer.scorers.tasks import TASKS

# ------------------------------------------------------------------------------- ANLS


@pytest.mark.parametrize("pred,answers,expected", [
    ("Hello World", ["hello world"], 1.0),           # casing ignored
    ("  hello   world ", ["hello world"], 1.0),      # whitespace runs collapsed
    ("hello", ["hallo"], 0.8),                        # 1 edit / 5
    ("ab", ["ax"], 0.5),                              # NL exactly 0.5 is kept (script rule)
    ("abc", ["axy"], 0.0),                            # NL 2/3: 1/3 < 0.5 -> 0
    ("cat", ["dog", "cat"], 1.0),                     # best reference counts
    ("Dr. Smith", ["dr smith"], 1 - 1 / 9),           # punctuation is not stripped
    ("", ["abc"], 0.0),                               # empty prediction
    ("", [""], 1.0),                                  # both empty: NL 0
    ("$12.50", ["12.50"], 1 - 1 / 6),                 # units/symbols count as edits
    ("  hello   world ", ["hello word"], 1 - 1 / 16),   # raw lengths: 1 edit / len(pred) 16
    ("ab ", ["abcd"], 0.5),                           # 2 edits / max(3, 4) raw chars
])
def test_anls(pred, answers, expected):
    assert anls.anls(pred, answers) == pytest.approx(expected)


def test_anls_levenshtein_and_errors():
    assert anls.levenshtein("kitten", "sitting") == 3
    assert anls.levenshtein("", "abc") == 3
    with pytest.raises(ValueError, match="no reference"):
        anls.anls("x", [])


# ------------------------------------------------------------------------- TextVQA


@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"),                       # number words
    ("The Cat", "cat"),                 # articles dropped, lowercased
    ("dont", "don't"),                  # contraction restored
    ("couldnt've", "couldn't've"),      # double contraction, either apostrophe missing
    ("couldn'tve", "couldn't've"),
    ("im", "im"),                       # capitalised table keys never match
    ("yes.", "yes"),                    # period not before a digit dropped
    ("3.5", "3.5"),                     # period before a digit kept
    ("1,000", "1000"),                  # commas deleted first
    ("coca-cola", "coca cola"),         # "-" not touching a space -> space
    ("hi - there", "hi there"),         # "-" touching a space -> deleted
    ("it's", "it 's"),                  # "'s" split off
    ("What?", "what"),
    ("a\tb\nc", "b c"),                 # tabs/newlines to spaces; "a" is an article
    ("  Ten\tapples\n", "10 apples"),
    ("none", "0"),
    ("yes!", "yes"),                    # "!" at the end -> space, stripped by the split
    ("The cat.", "cat"),
])
def test_textvqa_normalisation(raw, norm):
    assert vqa_accuracy.normalize_answer(raw) == norm


@pytest.mark.parametrize("pred,answers,expected", [
    # 3 of 10 match: leaving out a match leaves 2 (2/3), any other leaves 3 (1): (3*2/3+7)/10
    ("two", ["2"] * 3 + ["3"] * 7, (3 * 2 / 3 + 7 * 1) / 10),
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10
    ("2", ["2"] * 2 + ["x"] * 8, (2 / 3 + 16 / 3) / 10),
    # 1 of 10 after normalisation ("The Cat!" -> "cat"): (1 * 0 + 9 * 1/3) / 10
    ("The Cat!", ["cat"] + ["dog"] * 9, 0.3),
    ("", ["yes"] * 10, 0.0),                     # empty answer
    ("Yes", ["yes"] * 10, 1.0),
    ("10 cm", ["10"] * 10, 0.0),                 # units are not stripped
])
def test_textvqa_accuracy(pred, answers, expected):
    assert vqa_accuracy.vqa_accuracy(pred, answers) == pytest.approx(expected)


def test_textvqa_needs_answer_list():
    with pytest.raises(ValueError, match="list of human answers"):
        vqa_accuracy.vqa_accuracy("a", "a")


def test_generic_vqa_exact_match_and_single_answers():
    task = TASKS["vqa"]
    assert vqa_accuracy.exact_match("Two dogs", ["2 dogs", "dogs"]) == 1.0
    assert vqa_accuracy.exact_match("three", ["2"]) == 0.0
    # one answer: the soft score is the exact match (the 10-answer score needs 2+ answers)
    assert task.score({"answers": ["cat"], "category": "all"}, "a Cat") == {
        "exact_match": 1.0, "vqa_accuracy": 1.0, "category": "all"}
    # ["yes", "no"], "yes": leaving out "yes" -> 0, leaving out "no" -> 1/3; mean 1/6
    rec = task.score({"answers": ["yes", "no"], "category": "all"}, "yes")
    assert rec["exact_match"] == 1.0 and rec["vqa_accuracy"] == pytest.approx(1 / 6)


# -------------------------------------------------------------------------- ChartQA


@pytest.mark.parametrize("pred,ref,ok", [
    ("12%", "0.12", True),          # trailing % divides by 100
    ("0.12", "12%", True),
    ("105", "100", True),           # exactly 5% off
    ("95", "100", True),
    ("105.1", "100", False),        # just over 5%
    ("94.9", "100", False),
    (" 12 ", "12", True),           # surrounding whitespace
    ("1,234", "1234", False),       # thousands separator: not a number, strings differ
    ("1,234", "1,234", True),
    ("0", "0", True),               # zero reference: exact match
    ("0.01", "0", False),
    ("Yes", "yes", True),           # case-insensitive string match
    ("Yes.", "yes", False),
    ("2019", "2018", True),         # 1 / 2018 < 5%: years count as numbers too
    ("-10", "-10.4", True),
])
def test_chartqa_relaxed_correctness(pred, ref, ok):
    assert chartqa.relaxed_correctness(pred, ref) is ok


def test_chartqa_tolerance_relative_to_prediction_reproduces_internvl():
    # |100 - 95.2| = 4.8: 5.04% of the reference, 4.8% of the prediction
    assert not chartqa.relaxed_correctness("100", "95.2")
    assert chartqa.relaxed_correctness("100", "95.2", relative_to="prediction")
    with pytest.raises(ValueError, match="relative_to"):
        chartqa.relaxed_correctness("1", "1", relative_to="both")


def test_chartqa_best_over_references_and_summary():
    assert chartqa.chartqa_score("5", ["7", "5.1"]) == 1.0
    assert chartqa.chartqa_score("5", ["7", "8"]) == 0.0
    assert chartqa.chartqa_score("blue", "Blue") == 1.0
    task = TASKS["chartqa"]
    recs = [task.score({"answers": ["95.2"], "category": c}, p)
            for p, c in (("100", "human"), ("95", "augmented"))]
    s = task.summarize(recs)
    # "100": wrong against the reference, right against the prediction; "95": right in both
    assert s["metrics"] == {"relaxed_accuracy": 50.0, "relaxed_accuracy_internvl": 100.0}
    assert s["categories"]["human"] == {"relaxed_accuracy": 0.0, "num_questions": 1}


# -------------------------------------------------------------------------- MMBench


def test_mmbench_prompt_layout():
    q = mmbench.mmbench_question("What is shown?", ["a dog", "a cat"], hint="Look closely.")
    assert q == ("Look closely.\nWhat is shown?\nA. a dog\nB. a cat\n"
                 "Answer with the option's letter from the given choices directly.")
    assert (mmbench.mmbench_question("Q?", ["x", "y"], lang="cn")
            == "Q?\nA. x\nB. y\n请直接回答选项字母。")


@pytest.mark.parametrize("pred,expected", [
    ("B", "B"), (" C\n", "C"), ("B. a cat", "B"), ("(D)", "D"), ("[A]", "A"), ("C)", "C"),
    ("The answer is D", "D"), ("Answer: A", "A"),
    ("a cat", "B"),            # option text
    ("A cat.", "B"),           # a leading article is not option A
    ("a cat and a dog", None),  # two options named
    ("E", None),               # not one of the 4 options
    ("I am not sure", None),
])
def test_mmbench_choice_extraction(pred, expected):
    assert mmbench.extract_choice(pred, ["a dog", "a cat", "a bird", "a fish"]) == expected


def test_mmbench_rotations_track_the_answer():
    opts = ["red", "green", "blue", "white"]
    assert mmbench.rotate_options(opts, "C", 0) == (opts, "C")
    assert mmbench.rotate_options(opts, "C", 1) == (["green", "blue", "white", "red"], "B")
    assert mmbench.rotate_options(opts, "C", 3) == (["white", "red", "green", "blue"], "D")
    for shift in range(4):
        rotated, ans = mmbench.rotate_options(opts, "C", shift)
        assert rotated["ABCD".index(ans)] == "blue"
    assert len({tuple(mmbench.rotate_options(opts, "A", s)[0]) for s in range(4)}) == 4
    with pytest.raises(ValueError, match="not among 4 options"):
        mmbench.rotate_options(opts, "E", 0)


def test_circular_accuracy_needs_every_rotation():
    results = [("q1", True)] * 4 + [("q2", True), ("q2", False), ("q2", True), ("q2", True),
                                    ("q3", True), ("q3", True)]
    assert mmbench.circular_accuracy(results) == pytest.approx(2 / 3)
    assert mmbench.circular_accuracy([]) == 0.0


def test_mmbench_summary_per_category():
    task = TASKS["mmbench"]

    def rec(question, rotation, category, right):
        ref = {"options": ["x", "y"], "answer": "A", "question": question,
               "rotation": rotation, "category": category}
        return task.score(ref, "A" if right else "B")

    recs = [rec("1", 0, "ocr", True), rec("1", 1, "ocr", True),
            rec("2", 0, "ocr", True), rec("2", 1, "ocr", False),
            rec("3", 0, "count", False), rec("3", 1, "count", True)]
    s = task.summarize(recs)
    # only question 1 is right in both rotations; rotation 0 right for 1 and 2
    assert s["metrics"]["circular_accuracy"] == pytest.approx(100 / 3)
    assert s["metrics"]["accuracy_first_rotation"] == pytest.approx(200 / 3)
    assert s["metrics"]["num_questions"] == 3
    assert s["categories"] == {"count": {"circular_accuracy": 0.0, "num_questions": 1},
                               "ocr": {"circular_accuracy": 50.0, "num_questions": 2}}


# ----------------------------------------------------------------- multiple choice


@pytest.mark.parametrize("pred,expected", [
    ("A", "A"), ("A.", "A"), ("(B)", "B"), ("Answer: C", "C"), ("The answer is D", "D"),
    ("B. a dog", "B"),                     # letter wins over text
    ("a dog", "B"),                        # option text (lowercase "a" is not a letter)
    ("A DOG", "A"),                        # a capital "A" word reads as option A
    ("IT IS a DOG", "B"),                  # text match is case-insensitive
    ("A or B", None),                      # two letters
    ("an animal", None),                   # no letter, no option text
    ("a cat or a dog", None),              # two option texts
    ("", None),
    ("E", None),                           # not an option
])
def test_extract_letter(pred, expected):
    opts = ["a cat", "a dog", "a bird", "a fish"]
    assert multiple_choice.extract_letter(pred, opts) == expected


def test_mc_prompt_and_exact_rule():
    assert multiple_choice.mc_prompt("Which?", ["x", "y"], hint="Look.") == (
        "Hint: Look.\nWhich?\nA. x\nB. y\n"
        "Answer with the option's letter from the given choices directly.")
    assert multiple_choice.exact_letter(" a ", "A")
    assert not multiple_choice.exact_letter("A.", "A")


# ------------------------------------------------------------------------------ MME


@pytest.mark.parametrize("pred,parsed", [
    ("Yes", "yes"), ("No.", "no"), ("yes, it is", "yes"), ("Not sure", "no"),
    ("The answer is yes", "other"),        # only the first four characters are read
    ("", "other"), ("是", "yes"), ("不是", "no"), ("True", "yes"), ("FALSE", "no"),
    ("\nYes", "yes"),                       # newlines removed first
])
def test_mme_parse(pred, parsed):
    assert mme.parse_yes_no(pred) == parsed


def test_mme_scores():
    def q(cat, img, ok):
        return {"category": cat, "image": img, "correct": ok}

    recs = [q("existence", "1", True), q("existence", "1", True),     # image 1 both right
            q("existence", "2", True), q("existence", "2", False),    # image 2 one right
            q("OCR", "3", False), q("OCR", "3", False),
            q("OCR", "4", True), q("OCR", "4", False),
            q("code_reasoning", "5", True), q("code_reasoning", "5", True)]
    s = mme.mme_scores(recs)
    # existence: acc 3/4, acc+ 1/2 -> 125; OCR: acc 1/4, acc+ 0 -> 25; code: 200
    assert s["categories"]["existence"]["score"] == pytest.approx(125)
    assert s["categories"]["existence"]["acc_plus"] == pytest.approx(50)
    assert s["categories"]["OCR"]["score"] == pytest.approx(25)
    assert s["perception"] == pytest.approx(150)
    assert s["cognition"] == pytest.approx(200)
    assert s["total"] == pytest.approx(350)
    with pytest.raises(ValueError, match="none of"):
        mme.mme_scores([q("colour", "1", True)])


# ----------------------------------------------------------------------------- POPE


@pytest.mark.parametrize("pred,parsed", [
    ("Yes, there is a dog.", "yes"), ("No, there is not.", "no"), ("There is not a cat", "no"),
    ("", "yes"), ("NO", "yes"), ("Yes. But no.", "yes"), ("no", "no"), ("No.", "no"),
])
def test_pope_parse(pred, parsed):
    assert pope.parse_yes_no(pred) == parsed


def test_pope_metrics():
    preds = [True, True, False, False, True]
    labels = [True, False, False, True, True]
    m = pope.binary_metrics(preds, labels)  # TP 2, FP 1, TN 1, FN 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)
    # all answered no: precision undefined -> 0, recall 0, F1 0, accuracy 1/2
    m = pope.binary_metrics([False, False], [True, False])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.5)
    recs = ([{"splits": ["random"], "pred_yes": p, "label_yes": t}
             for p, t in zip(preds, labels, strict=True)]
            + [{"splits": ["popular"], "pred_yes": True, "label_yes": True}] * 2)
    s = pope.pope_scores(recs)
    assert s["f1_mean"] == pytest.approx((2 / 3 + 1.0) / 2)


# ------------------------------------------------------------------------- OCRBench


@pytest.mark.parametrize("pred,answers,cat,hit", [
    ("Hello World", ["hello"], "Regular Text Recognition", True),     # lowercase substring
    ("x ^ { 2 }", ["x^{2}"], ocrbench.HME, True),                     # HME: spaces removed
    ("x ^ { 2 }", ["x^{2}"], "Scene Text-centric VQA", False),        # others keep spaces
    ("X^2", ["x^2"], ocrbench.HME, False),                            # HME keeps case
    ("X^2", ["x^2"], "Doc-oriented VQA", True),
    ("", ["abc"], "Key Information Extraction", False),               # empty prediction
    ("2021", ["1"], "Digit String Recognition", True),                # substring quirk
    ("line one\nline two", ["one line"], "Handwriting Recognition", True),  # newline -> space
    ("total: 12 USD", ["12 usd", "twelve"], "Key Information Extraction", True),
])
def test_ocrbench_hit(pred, answers, cat, hit):
    assert ocrbench.ocrbench_hit(pred, answers, cat) is hit


def test_ocrbench_scores():
    recs = ([{"category": "Regular Text Recognition", "hit": True}] * 3
            + [{"category": "Digit String Recognition", "hit": True}] * 2
            + [{"category": "Digit String Recognition", "hit": False}]
            + [{"category": ocrbench.HME, "hit": True}])
    s = ocrbench.ocrbench_scores(recs)
    assert s["groups"]["Text Recognition"] == 5
    assert s["groups"][ocrbench.HME] == 1
    assert s["final_score"] == 6 and s["final_score_norm"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="none of"):
        ocrbench.ocrbench_scores([{"category": "Other", "hit": True}])


# ----------------------------------------------------------------------------- MMMU


@pytest.mark.parametrize("pred,expected", [
    ("(B)", "B"), ("The answer is (C).", "C"), ("B", "B"), ("A.", "A"),
    ("I think it's B, not A", "A"),        # " B," is no standalone letter; " A " is
    ("(A) looks right but the final answer is (B)", "B"),   # last bracketed letter wins
    ("The picture clearly shows a blue bike near the house", "B"),  # >5 words: option text
    ("blue bike", None),                    # option text needs more than 5 words
    ("", None), ("E", None),
])
def test_mmmu_multi_choice(pred, expected):
    index2ans = {"A": "red car", "B": "blue bike", "C": "green bus", "D": "grey van"}
    assert mmmu.parse_multi_choice_response(pred, index2ans) == expected


@pytest.mark.parametrize("pred,gold,ok", [
    ("The answer is 3,000.", "3000", True),     # thousands comma, indicator "is "
    ("5 cm", "5", True),                        # number with a unit
    ("It is Paris.", "Paris", True),            # text, case-insensitive substring
    ("2.504", "2.50", True),                    # rounded to 2 decimals
    ("2.51", "2.50", False),
    ("x = 7\ny = 8", "8", True),                # "=" counts on the last line
    ("x = 7\ny = 8", "7", False),               # ... not on earlier lines
    ("", "0", False),                           # empty answer
    ("the cat", ["dog", "cat"], True),          # any gold answer
])
def test_mmmu_open(pred, gold, ok):
    assert mmmu.eval_open(gold, mmmu.parse_open_response(pred)) is ok


def test_mmmu_normalisation_details():
    assert mmmu.normalize_str("1,234.567") == [1234.57]
    assert mmmu.normalize_str("A") == [" a", "a "]
    # the reference's simple-number pattern also picks pieces of "1,000" and "2.5e3"
    assert mmmu.extract_numbers("1,000 and 2.5e3 and -4") == [
        "1,000", "2.5e3", "000", "2", "3", "-4"]
    assert mmmu.subject_of("validation_Art_Theory_12") == "Art_Theory"


# ------------------------------------------------------------------- HallusionBench


@pytest.mark.parametrize("pred,parsed", [
    ("Yes, it is.", "yes"), ("No.", "no"), ("Yes and no", "unknown"), ("", "unknown"),
    ("YES", "yes"), ("Nope", "unknown"),
])
def test_hallusion_yes_no(pred, parsed):
    assert hallusion.yes_no_words(pred) == parsed


def test_hallusion_scores():
    def r(s, f, q, ok, cat="VD", sub="chart"):
        return {"group": [cat, sub], "tables": [cat, f"{cat}/{sub}"], "set_id": s,
                "figure_id": f, "question_id": q, "correct": ok}

    recs = [r("0", "0", "0", True), r("0", "0", "1", False),
            r("0", "1", "0", True), r("0", "1", "1", False),
            r("1", "0", "0", True, cat="VS", sub="map")]
    s = hallusion.hallusion_scores(recs)
    # aAcc 3/5; figures (0,0) and (0,1) each have a wrong answer, (1,0) ok -> 1/3;
    # questions (0,0) [T,T] ok, (0,1) [F,F] not, (1,0) ok -> 2/3
    assert s["overall"]["aAcc"] == pytest.approx(60)
    assert s["overall"]["fAcc"] == pytest.approx(100 / 3)
    assert s["overall"]["qAcc"] == pytest.approx(200 / 3)
    assert s["categories"]["VD/chart"]["fAcc"] == pytest.approx(0)
    assert s["categories"]["VD/chart"]["qAcc"] == pytest.approx(50)
    assert s["categories"]["VS"]["aAcc"] == pytest.approx(100)


# ------------------------------------------------------------------------ MathVista


@pytest.mark.parametrize("resp,answer,qtype,atype,choices,prec,ok", [
    ("B", "4", "multi_choice", "text", ["3", "4", "5"], None, True),      # letter -> text
    ("(C) 5", "5", "multi_choice", "text", ["3", "4", "5"], None, True),  # "(X)" letter
    ("4", "4", "multi_choice", "text", ["3", "4", "5"], None, True),      # a choice as is
    ("gren", "green", "multi_choice", "text", ["red", "green", "blue"], None, True),  # closest
    ("12", "12", "free_form", "integer", [], None, True),
    ("The answer is 12 cm.", "12", "free_form", "integer", [], None, True),  # number + unit
    ("1,234", "1234", "free_form", "integer", [], None, True),
    ('The answer is "7".', "7", "free_form", "integer", [], None, True),   # quick rule
    ("3.14", "3.1", "free_form", "float", [], 1, True),                    # precision 1
    ("3.14", "3.14", "free_form", "float", [], 2, True),
    ("3.14", "3.1", "free_form", "float", [], 2, False),
    ("", "0", "free_form", "integer", [], None, False),                    # empty answer
    ("[1, 2]", "[1, 2]", "free_form", "list", [], None, True),
    ("12.0", "12", "free_form", "integer", [], None, True),                # int(float(x))
])
def test_mathvista(resp, answer, qtype, atype, choices, prec, ok):
    assert mathvista.mathvista_correct(resp, answer, qtype, atype, choices, prec)[1] is ok


# --------------------------------------------------------- per-category task summaries


def test_seed_accuracy_per_question_type():
    task = TASKS["seed"]
    ref = {"options": ["cat", "dog"], "answer": "B"}
    preds = [("B", "1"), ("(B)", "1"), ("A", "1"), ("dog", "2"), ("", "2")]
    recs = [task.score({**ref, "category": c}, p) for p, c in preds]
    s = task.summarize(recs)
    assert s["metrics"]["accuracy"] == pytest.approx(60)          # B, (B), dog
    assert s["metrics"]["accuracy_exact"] == pytest.approx(20)    # only the bare "B"
    assert s["categories"]["1"]["correct"] == pytest.approx(200 / 3)
    assert s["categories"]["2"]["correct"] == pytest.approx(50)


def test_docvqa_summary_is_mean_anls_in_percent():
    task = TASKS["docvqa"]
    recs = [task.score({"answers": ["hello"], "category": "all"}, p)
            for p in ("hello", "hallo", "xyz")]
    assert task.summarize(recs)["metrics"]["anls"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)
