"""The code judge: does the `<think>` support the `<answer>`? Decided by the world's rule, not by a model.

    verdict = judge("<think>The red car drove right and is now at row 2, column 4, at the wall, so next it "
                    "drives left.</think><answer>B</answer>", options, ground_truth)
    verdict.consistent, verdict.reason          # True, "ok" when option B is the "left" option

What it measures, exactly: the reasoning supports the answer when it states the premises the task needs
(the direction the car drove and the cell it is in now), the next move it concludes, if it states one, is the
one the rule (world.next_move) derives from those premises, and the chosen letter is the option standing for
that move. It checks support, not truth: a wrong premise followed faithfully to its option is consistent (and
wrong); `premises_correct` says separately whether the premises match the clip. A completion without a
parseable `<think>` or a single-letter `<answer>` (the accuracy reward's exact-match rule) is not consistent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from grpo_care.demo.tasks import option_direction
from grpo_care.demo.world import DIRECTIONS, GRID, Cell, inside, next_move

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_CELL = re.compile(r"row\s+(\d+)\s*,?\s*(?:and\s+)?col(?:umn)?\s+(\d+)", re.IGNORECASE)
_DIR = r"(up|down|left|right)"
_PREMISE = re.compile(r"\b(?:drove|moved|went|came|was driving|was moving)\s+" + _DIR + r"\b", re.IGNORECASE)
_CONCLUSION = re.compile(r"\bnext\b[^.<]*?\b(?:drives|goes|moves|turns|heads|drive|go|move)\s+(?:back\s+)?"
                         + _DIR + r"\b", re.IGNORECASE)
_ANY_DIR = re.compile(r"\b" + _DIR + r"\b", re.IGNORECASE)
LETTERS = "ABCD"


@dataclass(frozen=True)
class Verdict:
    consistent: bool
    reason: str  # ok | no_think | no_answer | no_direction | no_position | invalid_step | answer_mismatch | bad_option
    direction: Optional[str] = None
    current: Optional[Cell] = None
    implied: Optional[str] = None
    answered: Optional[str] = None
    premises_correct: Optional[bool] = None


def parse_cells(text: str) -> list[Cell]:
    return [(int(r), int(c)) for r, c in _CELL.findall(text)]


def parse_premise_direction(text: str) -> Optional[str]:
    """The direction the think says the car drove (`drove right`), else its first bare direction word."""
    found = _PREMISE.search(text)
    if found is None:
        conclusion = _CONCLUSION.search(text)
        head = text[:conclusion.start()] if conclusion else text
        found = _ANY_DIR.search(head)
    return found.group(1).lower() if found else None


def parse_conclusion(text: str) -> Optional[str]:
    """The next move the think concludes (`next it drives left`), or None when it states none."""
    found = list(_CONCLUSION.finditer(text))
    return found[-1].group(1).lower() if found else None


def answer_letter(completion: str) -> Optional[str]:
    """The first `<answer>` content when it is exactly one option letter (the accuracy reward's rule)."""
    found = _ANSWER.search(completion)
    letter = found.group(1).strip() if found else ""
    return letter if len(letter) == 1 and letter in LETTERS else None


def judge(completion: str, options: list[str], ground_truth: Optional[dict] = None) -> Verdict:
    """Verdict on one completion; `options` are the option texts in letter order (A, B, ...)."""
    if len(options) < 2:
        raise ValueError(f"options must list the option texts in letter order (A, B, ...), got {options!r}")
    think = _THINK.search(completion)
    if think is None:
        return Verdict(False, "no_think", premises_correct=_premises_correct(None, None, ground_truth))
    text = think.group(1)
    letter = answer_letter(completion)
    direction = parse_premise_direction(text)
    cells = parse_cells(text)
    current = cells[0] if cells else None
    truth = _premises_correct(direction, current, ground_truth)
    if letter is None or LETTERS.index(letter) >= len(options):
        return Verdict(False, "no_answer", direction, current, premises_correct=truth)
    if direction is None:
        return Verdict(False, "no_direction", None, current, premises_correct=truth)
    if current is None or not inside(current, GRID):
        return Verdict(False, "no_position", direction, current, premises_correct=truth)
    implied, _ = next_move(direction, current)
    answered = option_direction(options[LETTERS.index(letter)])
    if answered is None:
        return Verdict(False, "bad_option", direction, current, implied, None, truth)
    stated = parse_conclusion(text)
    if stated is not None and stated != implied:
        return Verdict(False, "invalid_step", direction, current, implied, answered, truth)
    if answered != implied:
        return Verdict(False, "answer_mismatch", direction, current, implied, answered, truth)
    return Verdict(True, "ok", direction, current, implied, answered, truth)


def _premises_correct(
    direction: Optional[str], current: Optional[Cell], ground_truth: Optional[dict]
) -> Optional[bool]:
    if ground_truth is None:
        return None
    if direction not in DIRECTIONS or current is None:
        return False
    return direction == ground_truth["direction"] and list(current) == list(ground_truth["current"])


def consistency_reward(completions: list, options: list, **columns) -> list[float]:
    """The judge as a reward function (TRL's signature): 1.0 when the think supports the answer, else 0.0.

    The demo registers it with weight 0, so it changes no reward and only logs
    `rewards/consistency_reward/mean`: the consistency of the training rollouts at every step.
    """
    texts = [c if isinstance(c, str) else str(c[-1].get("content", "")) for c in completions]
    return [1.0 if judge(text, opts).consistent else 0.0 for text, opts in zip(texts, options)]
