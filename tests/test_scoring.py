"""Scoring functions on hand-made cases with hand-computed expectations."""

import pytest

from mini_internvl_jax.infer.scoring import (
    chartqa_score,
    circular_accuracy,
    extract_choice,
    mmbench_question,
    normalize_vqa_answer,
    relaxed_correctness,
    rotate_options,
    summarize,
    vqa_accuracy,
    vqa_exact_match,
)


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
    assert relaxed_correctness(pred, ref) is ok


def test_chartqa_tolerance_relative_to_prediction_reproduces_internvl():
    # |100 - 95.2| = 4.8: 5.04% of the reference, 4.8% of the prediction
    assert not relaxed_correctness("100", "95.2")
    assert relaxed_correctness("100", "95.2", relative_to="prediction")
    with pytest.raises(ValueError, match="relative_to"):
        relaxed_correctness("1", "1", relative_to="both")


def test_chartqa_best_over_references():
    assert chartqa_score("5", ["7", "5.1"]) == 1.0
    assert chartqa_score("5", ["7", "8"]) == 0.0
    assert chartqa_score("blue", "Blue") == 1.0


def test_mmbench_prompt_layout():
    q = mmbench_question("What is shown?", ["a dog", "a cat"], hint="Look closely.")
    assert q == ("Look closely.\nWhat is shown?\nA. a dog\nB. a cat\n"
                 "Answer with the option's letter from the given choices directly.")
    assert mmbench_question("Q?", ["x", "y"]) == ("Q?\nA. x\nB. y\nAnswer with the option's "
                                                  "letter from the given choices directly.")


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
    assert extract_choice(pred, ["a dog", "a cat", "a bird", "a fish"]) == expected


def test_mmbench_rotations_track_the_answer():
    opts = ["red", "green", "blue", "white"]
    assert rotate_options(opts, "C", 0) == (opts, "C")
    assert rotate_options(opts, "C", 1) == (["green", "blue", "white", "red"], "B")
    assert rotate_options(opts, "C", 3) == (["white", "red", "green", "blue"], "D")
    for shift in range(4):
        rotated, ans = rotate_options(opts, "C", shift)
        assert rotated["ABCD".index(ans)] == "blue"
    assert len({tuple(rotate_options(opts, "A", s)[0]) for s in range(4)}) == 4
    with pytest.raises(ValueError, match="not among 4 options"):
        rotate_options(opts, "E", 0)


def test_circular_accuracy_needs_every_rotation():
    results = [("q1", True)] * 4 + [("q2", True), ("q2", False), ("q2", True), ("q2", True),
                                    ("q3", True), ("q3", True)]
    assert circular_accuracy(results) == pytest.approx(2 / 3)
    assert circular_accuracy([]) == 0.0


@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"), ("The cat.", "cat"), ("a dog", "dog"), ("dont", "don't"), ("yes!", "yes"),
    ("1,000", "1000"), ("3.5", "3.5"), ("red-and-blue", "red and blue"),
    ("  Ten\tapples\n", "10 apples"), ("none", "0"), ("well - ok", "well ok"),
])
def test_vqa_normalisation(raw, norm):
    assert normalize_vqa_answer(raw) == norm


def test_vqa_scores():
    assert vqa_exact_match("Two dogs", ["2 dogs", "dogs"]) == 1.0
    assert vqa_exact_match("three", "2") == 0.0
    refs = ["yes"] * 2 + ["no"] * 8
    # leave-one-out: 8 subsets keep both "yes" (2/3), 2 subsets keep one (1/3)
    assert vqa_accuracy("Yes", refs) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    refs3 = ["yes"] * 3 + ["no"] * 7
    assert vqa_accuracy("yes", refs3) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)
    assert vqa_accuracy("no", refs3) == 1.0
    assert vqa_accuracy("maybe", refs3) == 0.0
    assert vqa_accuracy("a cat", ["cat"]) == 1.0  # a single reference: exact match


def test_summaries():
    mm = [{"id": "1", "rotation": r, "correct": True} for r in range(3)]
    mm += [{"id": "2", "rotation": 0, "correct": True}, {"id": "2", "rotation": 1,
                                                         "correct": False}]
    s = summarize("mmbench", mm)
    assert s["circular_accuracy"] == 0.5 and s["accuracy_first_rotation"] == 1.0
    assert s["num_questions"] == 2
    c = summarize("chartqa", [{"score": 1.0, "score_internvl": 1.0},
                              {"score": 0.0, "score_internvl": 1.0}])
    assert c["relaxed_accuracy"] == 0.5 and c["relaxed_accuracy_internvl"] == 1.0
    with pytest.raises(ValueError, match="unknown task"):
        summarize("coco", [])
