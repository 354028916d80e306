"""Evaluation scores by problem type: the rules of the authors' eval_bench.py (grpo_care.md 9.3, Table 4).

    score = score_answer(prediction("<think>..</think><answer>12</answer>"), "10", "regression")   # 0.6

`prediction(text)` is the stripped content of the first `<answer>...</answer>`, or the whole output when that
is missing or empty. `score_answer(pred, gold, problem_type)` is in [0, 1]:

- multiple choice: 1 iff `pred.strip() == gold.strip()` (an exact letter);
- numerical: 0 when only one of them has a '.' or ','; else both parsed (commas dropped) and 1 iff they round
  to the same value at 2 decimals; an unparsable or non-finite prediction scores 0;
- regression (VSI-Bench's numeric questions): the mean relative accuracy, the mean over the thresholds
  t = 0.50, 0.55, ..., 0.95 of 1[|pred - gold| / (|gold| + 1e-8) < 1 - t], in float32 as the authors compute it;
- free-form: the mean of the ROUGE-1/2/L F-measures (rouge_score, stemmed), the training reward's rule;
- OCR: 1 - word error rate, clipped to [0, 1], the training reward's rule.

Anything that raises scores 0, as in the authors' code. Regression scores are reported apart from the others:
`accuracy` is the mean score of the non-regression samples, `mra` that of the regression ones (the authors'
`mean_acc` and `mean_mra`), `mean_score` that of all (their `mean_rewards`); a sample is `correct` when its
score is 1. Departure: eval_bench.py scores free-form and OCR items 0 (they fall through to its final else);
the six general benchmarks of Table 4 have none in Video-R1's evaluation files (MMVU is its multiple-choice
subset), so the published numbers do not depend on it, and a file that has them is scored by the rules the
model was trained on.
"""

from __future__ import annotations

import math

import torch

from grpo_care.rewards import ANSWER_RE, free_form_accuracy, ocr_accuracy

REGRESSION = "regression"
MRA_THRESHOLDS = (0.50, 0.95, 0.05)  # start, end (inclusive), step


def prediction(text: str) -> str:
    """The first `<answer>` content, stripped; the whole output (stripped) when it is missing or empty."""
    match = ANSWER_RE.search(text)
    answer = match.group(1).strip() if match else ""
    return answer if answer else text.strip()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def mean_relative_accuracy(pred: float, gold: float) -> float:
    """VSI-Bench's MRA: the fraction of thresholds t in 0.50:0.05:0.95 with |pred - gold| / (|gold| + 1e-8) <
    1 - t. float32 throughout, thresholds from torch.arange, as eval_bench.py (edge cases land the same)."""
    start, end, step = MRA_THRESHOLDS
    p, g = torch.tensor(pred, dtype=torch.float32), torch.tensor(gold, dtype=torch.float32)
    relative_error = (p - g).abs() / (g.abs() + 1e-8)
    thresholds = torch.arange(start, end + step / 2, step, dtype=torch.float32)
    return float((relative_error < 1 - thresholds).float().mean())


def multiple_choice_score(pred: str, gold: str) -> float:
    return 1.0 if pred.strip() == gold.strip() else 0.0


def numerical_score(pred: str, gold: str) -> float:
    if (("." in gold) or ("," in gold)) != (("." in pred) or ("," in pred)):
        return 0.0
    g, p = _number(gold), _number(pred)
    if g is None or p is None or not math.isfinite(p):
        return 0.0
    return 1.0 if round(g, 2) == round(p, 2) else 0.0


def regression_score(pred: str, gold: str) -> float:
    g, p = _number(gold), _number(pred)
    if g is None or p is None:
        return 0.0
    return mean_relative_accuracy(p, g)


SCORE_BY_TYPE = {
    "multiple choice": multiple_choice_score,
    "numerical": numerical_score,
    REGRESSION: regression_score,
    "free-form": free_form_accuracy,
    "OCR": ocr_accuracy,
}


def score_answer(pred: str, gold: str, problem_type: str) -> float:
    """The score in [0, 1] of a prediction against the gold answer (both without tags) for its problem type."""
    rule = SCORE_BY_TYPE.get(problem_type)
    if rule is None:
        raise ValueError(f"no evaluation rule for problem_type {problem_type!r}: one of {sorted(SCORE_BY_TYPE)}")
    try:
        return float(rule(pred, gold))
    except Exception:  # noqa: BLE001 - the authors score every failure 0
        return 0.0


def summarize_scores(records: list[dict]) -> dict:
    """{"accuracy", "mra", "mean_score"} of records with `score` and `problem_type`; None where no sample."""

    def mean(values):
        return sum(values) / len(values) if values else None

    scores = [record_score(r) for r in records]
    kinds = [r.get("problem_type", "multiple choice") for r in records]
    return {
        "accuracy": mean([s for s, k in zip(scores, kinds) if k != REGRESSION]),
        "mra": mean([s for s, k in zip(scores, kinds) if k == REGRESSION]),
        "mean_score": mean(scores),
    }


def record_score(record: dict) -> float:
    """A record's score; records written before scores existed (multiple choice only) have `correct`."""
    return float(record["score"]) if "score" in record else float(bool(record["correct"]))
