"""Base rewards of GRPO-CARE (grpo_care.md 4) and a registry of pluggable reward functions.

Every reward function has TRL's signature

    def my_reward(completions: list[str], **columns) -> list[float | None]

`completions` are the decoded completions (special tokens skipped); the columns are the samples' dataset
fields (`solution`, `problem_type`, `options`, `sample_id`, `level`, `domain`) plus `prompts` (the question
text) and `completion_ids` (token ids up to and including EOS), each a list with one entry per completion.
`None` means "not applicable to this sample" and is left out of the sum. Conversational completions
(`[{"role": "assistant", "content": ...}]`) are accepted too.

    >>> accuracy_reward(["<think>t</think><answer>B</answer>"], solution=["<answer>B</answer>"],
    ...                 problem_type=["multiple choice"])
    [1.0]
    >>> format_reward([" <think>t</think><answer>B</answer>"])   # fullmatch: no leading space allowed
    [0.0]

Departure: the authors read `problem_type` from the first sample of the batch; here each sample uses its own
(identical for their homogeneous batches).
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
from collections.abc import Callable
from typing import Optional

from care_kernels.answer_spans import ANSWER_RE  # what is graded here is the content span CARE scores

FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)

RewardFunc = Callable[..., list]
_WARNED = {"rouge": False}


def completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def extract_answer(text: str) -> str:
    """The stripped content of the first `<answer>...</answer>`, or "" when there is none."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip() if match else ""


# ------------------------------------------------------------------------------------------------------------
# accuracy by problem type


def _to_float(text: str) -> float:
    return float(text.replace(",", ""))


def numerical_accuracy(out: str, gt: str) -> float:
    """1 iff both round to the same value at 2 decimals; 0 if only one of them has a '.' or ','."""
    if (("." in gt) or ("," in gt)) != (("." in out) or ("," in out)):
        return 0.0
    g, o = _to_float(gt), _to_float(out)
    if not (math.isfinite(g) and math.isfinite(o)):
        return 0.0
    return 1.0 if round(g, 2) == round(o, 2) else 0.0


def _edit_distance(a: list[str], b: list[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def ocr_accuracy(out: str, gt: str) -> float:
    """1 - WER(gt, out), clipped to [0, 1]; WER = word edit distance / max(1, words in gt)."""
    ref, hyp = gt.split(), out.split()
    return min(1.0, max(0.0, 1.0 - _edit_distance(ref, hyp) / max(1, len(ref))))


def free_form_accuracy(out: str, gt: str) -> float:
    """Mean of ROUGE-1/2/L F-measures (rouge_score with stemming), clipped to [0, 1]."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        warnings.warn(
            "rouge_score is not installed: free-form accuracy uses an unstemmed ROUGE", stacklevel=2
        )
        return _rouge_mean_unstemmed(out, gt)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = scorer.score(gt, out)
    return min(1.0, max(0.0, sum(s.fmeasure for s in scores.values()) / 3))


def _rouge_mean_unstemmed(out: str, gt: str) -> float:
    def ngrams(words, n):
        return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]

    def f1(overlap, n_out, n_ref):
        if overlap == 0 or n_out == 0 or n_ref == 0:
            return 0.0
        p, r = overlap / n_out, overlap / n_ref
        return 2 * p * r / (p + r)

    o, g = re.findall(r"[a-z0-9]+", out.lower()), re.findall(r"[a-z0-9]+", gt.lower())
    scores = []
    for n in (1, 2):
        a, b = ngrams(o, n), ngrams(g, n)
        overlap = sum(min(a.count(x), b.count(x)) for x in set(a))
        scores.append(f1(overlap, len(a), len(b)))
    lcs = len(o) + len(g) - _edit_distance_lcs(o, g)
    scores.append(f1(lcs, len(o), len(g)))
    return min(1.0, max(0.0, sum(scores) / 3))


def _edit_distance_lcs(a, b) -> int:
    """len(a) + len(b) - LCS(a, b), so LCS = len(a) + len(b) - this."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return len(a) + len(b) - prev[-1]


def regression_accuracy(out: str, gt: str) -> float:
    g, o = _to_float(gt), _to_float(out)
    return 1.0 - min(1.0, (abs(o - g) + 1e-9) / (abs(g) + 1e-9))


def multiple_choice_accuracy(out: str, gt: str) -> float:
    """Strict: "A" matches "A"; "A." or "A. open tap" do not."""
    return 1.0 if out.strip() == gt.strip() else 0.0


ACCURACY_BY_TYPE = {
    "multiple choice": multiple_choice_accuracy,
    "numerical": numerical_accuracy,
    "OCR": ocr_accuracy,
    "free-form": free_form_accuracy,
    "regression": regression_accuracy,
}


def accuracy_reward(completions, solution, problem_type=None, **_) -> list[float]:
    """Accuracy of the first `<answer>` against the solution's, by problem type (any exception scores 0)."""
    types = problem_type if problem_type is not None else ["multiple choice"] * len(completions)
    out = []
    for completion, sol, kind in zip(completions, solution, types):
        try:
            score = ACCURACY_BY_TYPE[kind](extract_answer(completion_text(completion)), extract_answer(sol))
        except Exception:  # noqa: BLE001 - the authors score every failure 0
            score = 0.0
        out.append(float(score))
    return out


def format_reward(completions, **_) -> list[float]:
    """1.0 iff the whole completion is `<think>...</think> <answer>...</answer>` (re.fullmatch)."""
    return [1.0 if FORMAT_RE.fullmatch(completion_text(c)) else 0.0 for c in completions]


REWARD_FUNCS: dict[str, RewardFunc] = {"accuracy": accuracy_reward, "format": format_reward}


def resolve_reward_func(name: str) -> RewardFunc:
    """A built-in name (`accuracy`, `format`) or a dotted path `pkg.module.func` (or `pkg.module:func`)."""
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    module_name, sep, attr = name.replace(":", ".").rpartition(".")
    if not sep:
        raise ValueError(
            f"unknown reward function {name!r}: use one of {sorted(REWARD_FUNCS)} or a dotted path "
            "'package.module.function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function {name!r}: cannot import module {module_name!r} ({e})") from e
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"reward function {name!r}: {module_name} has no callable {attr!r}")
    return func


def reward_name(name: str) -> str:
    """Metric name of a reward function: `rewards/<name>/mean` uses the last component of a dotted path."""
    return name.replace(":", ".").rpartition(".")[2]


def score_completions(
    funcs: list[RewardFunc], completions: list, columns: dict
) -> list[list[Optional[float]]]:
    """[[reward of func f for completion i] for f] with None kept; length checked per function."""
    out = []
    for func in funcs:
        values = list(func(completions, **columns))
        if len(values) != len(completions):
            raise ValueError(
                f"reward function {getattr(func, '__name__', func)} returned {len(values)} values "
                f"for {len(completions)} completions"
            )
        out.append([None if v is None else float(v) for v in values])
    return out
