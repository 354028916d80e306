"""grpo_care.scoring: the authors' evaluation rules by problem type (Table 4), checked on hand-picked answers."""

import pytest
from grpo_care.scoring import (
    mean_relative_accuracy,
    prediction,
    score_answer,
    summarize_scores,
)


def _mra_float64(pred: float, gold: float) -> float:
    """An independent float64 reading of VSI-Bench's MRA, for values away from a threshold."""
    error = abs(pred - gold) / (abs(gold) + 1e-8)
    thresholds = [0.50 + 0.05 * k for k in range(10)]
    return sum(error < 1 - t for t in thresholds) / len(thresholds)


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        (10.0, 10.0, 1.0),
        (12.0, 10.0, 0.6),  # error 2 / (10 + 1e-8): at t = 0.80 float32, the authors' arithmetic, says "not
        # below 1 - t" (float64 would say it is, and give 0.7)
        (10.6, 10.0, 0.9),  # 0.06: every threshold but 0.95
        (10.4, 10.0, 1.0),
        (7.0, 10.0, 0.4),  # 0.3
        (0.0, 10.0, 0.0),
        (25.0, 10.0, 0.0),
        (0.0, 0.0, 1.0),  # gold 0: only an exact 0 scores
        (1.0, 0.0, 0.0),
        (float("inf"), 3.0, 0.0),
        (float("nan"), 3.0, 0.0),
    ],
)
def test_mean_relative_accuracy(pred, gold, expected):
    assert mean_relative_accuracy(pred, gold) == pytest.approx(expected)


def test_mean_relative_accuracy_agrees_with_a_float64_reading_away_from_thresholds():
    for pred, gold in [(3.3, 2.9), (1.234, 1.5), (100, 61), (-4.1, -5), (0.07, 0.1), (55.5, 50)]:
        assert mean_relative_accuracy(pred, gold) == pytest.approx(_mra_float64(pred, gold)), (pred, gold)


def test_exactly_on_a_threshold_the_comparison_is_strict():
    # relative error exactly 0.5 = 1 - 0.50: not below it, so no threshold is met
    assert mean_relative_accuracy(15.0, 10.0) == 0.0
    assert mean_relative_accuracy(5.0, 10.0) == 0.0


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("3", "3", 1.0),
        ("3.0", "3", 0.0),  # only one has a decimal point: 0, whatever the values
        ("3.14", "3.141", 1.0),  # both round to 3.14
        ("3.15", "3.141", 0.0),
        ("1000", "1,000", 0.0),  # ',' counts as a decimal mark
        ("1,000.0", "1,000", 1.0),
        ("seven", "7", 0.0),
        ("inf", "7", 0.0),
        ("", "7", 0.0),
    ],
)
def test_numerical_rule(pred, gold, expected):
    assert score_answer(pred, gold, "numerical") == expected


def test_regression_multiple_choice_free_form_and_ocr():
    assert score_answer("12", "10", "regression") == pytest.approx(0.6)
    assert score_answer("1,200", "1000", "regression") == pytest.approx(0.6)  # commas dropped: error 0.2
    assert score_answer("about ten", "10", "regression") == 0.0
    assert score_answer(" B ", "B", "multiple choice") == 1.0
    assert score_answer("B. open tap", "B", "multiple choice") == 0.0  # the exact letter only
    assert score_answer("the cat sat on the mat", "the cat sat on the mat", "free-form") == pytest.approx(1.0)
    assert 0.0 < score_answer("a cat sat on a mat", "the cat sat on the mat", "free-form") < 1.0
    assert score_answer("hello world", "hello there world", "OCR") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no evaluation rule"):
        score_answer("A", "A", "segmentation")


def test_prediction_falls_back_to_the_whole_output_when_the_answer_is_missing_or_empty():
    assert prediction("<think>x</think><answer> 12 </answer>") == "12"
    assert prediction("  12  ") == "12"
    assert prediction("<think>x</think><answer> </answer> 12") == "<think>x</think><answer> </answer> 12"


def test_accuracy_and_mra_are_reported_apart():
    records = [
        {"problem_type": "multiple choice", "score": 1.0},
        {"problem_type": "multiple choice", "score": 0.0},
        {"problem_type": "numerical", "score": 1.0},
        {"problem_type": "regression", "score": 0.6},
        {"problem_type": "regression", "score": 0.2},
    ]
    summary = summarize_scores(records)
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["mra"] == pytest.approx(0.4)
    assert summary["mean_score"] == pytest.approx(2.8 / 5)
    only_mc = summarize_scores(records[:2])
    assert only_mc["mra"] is None and only_mc["accuracy"] == 0.5
    # records written before scores existed (multiple choice, `correct` only) still count
    assert summarize_scores([{"correct": True}, {"correct": False}])["accuracy"] == 0.5
