"""Question kinds, option texts and the reference chain of thought of the demo's SEED-Bench-R1-like task.

    kind = TASK_KINDS["predict"]
    kind.question(motion)          # "Considering the motion shown in the video ... what will the red car do next?"
    kind.option(motion, "left")    # "drive left" (short action phrases, as SEED-Bench-R1's options are)
    rationale(motion)              # "The red car drove right and is now at row 2, column 4."

The four options of a question are the four directions of the next move, so the direction an answer letter
stands for, and the direction a `<think>` implies, can be compared by code (consistency.py). RL training, L1
and L2 ask `predict`; L3 asks the new kinds `catch` and `block`, whose answer is the same next move behind a
different goal and different option wording. The warm start's chains of thought also come with other
wordings of the same question, as a base model's instruction tuning has seen many wordings of one question:
two rewordings of `predict` (`heading`, `next_move`) and three other goals in SEED-Bench-R1's question form
"... what action should I take next in order to <goal>?" (`follow`, `film`, `meet`), the form L3's new goals
use too. No RL or evaluation question uses these five kinds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from grpo_care.demo.world import Motion, cell_text


@dataclass(frozen=True)
class TaskKind:
    name: str
    goal: str
    question_template: str
    options: dict  # direction -> option text (with {obj})

    def question(self, motion: Motion) -> str:
        return self.question_template.format(obj=motion.name)

    def option(self, motion: Motion, direction: str) -> str:
        return self.options[direction].format(obj=motion.name)

    def task_goal(self, motion: Motion) -> str:
        return self.goal.format(obj=motion.name)


TASK_KINDS = {
    "predict": TaskKind(
        name="predict",
        goal="predict what the {obj} does next",
        question_template="Considering the motion shown in the video and the current observation shown in the "
                          "image, what will the {obj} do next?",
        options={d: "drive " + d for d in ("up", "down", "left", "right")},
    ),
    "heading": TaskKind(
        name="heading",
        goal="predict which way the {obj} heads next",
        question_template="Based on the video and the image, which way will the {obj} head next?",
        options={d: "head " + d for d in ("up", "down", "left", "right")},
    ),
    "next_move": TaskKind(
        name="next_move",
        goal="predict the next move of the {obj}",
        question_template="Watch the clip and look at the picture. What is the next move of the {obj}?",
        options={d: "it moves " + d for d in ("up", "down", "left", "right")},
    ),
    "follow": TaskKind(
        name="follow",
        goal="follow the {obj}",
        question_template="Considering the progress shown in the video and my current observation shown in the "
                          "image, what action should I take next in order to follow the {obj}?",
        options={d: "walk " + d for d in ("up", "down", "left", "right")},
    ),
    "film": TaskKind(
        name="film",
        goal="film the {obj}",
        question_template="Considering the progress shown in the video and my current observation shown in the "
                          "image, what action should I take next in order to film the {obj}?",
        options={d: "pan the camera " + d for d in ("up", "down", "left", "right")},
    ),
    "meet": TaskKind(
        name="meet",
        goal="meet the {obj}",
        question_template="Considering the progress shown in the video and my current observation shown in the "
                          "image, what action should I take next in order to meet the {obj}?",
        options={"up": "wait above it", "down": "wait below it", "left": "wait to its left",
                 "right": "wait to its right"},
    ),
    "catch": TaskKind(
        name="catch",
        goal="catch the {obj}",
        question_template="Considering the progress shown in the video and my current observation shown in the "
                          "image, what action should I take next in order to catch the {obj}?",
        options={"up": "hold the net above it", "down": "hold the net below it",
                 "left": "hold the net to its left", "right": "hold the net to its right"},
    ),
    "block": TaskKind(
        name="block",
        goal="stop the {obj}",
        question_template="Considering the progress shown in the video and my current observation shown in the "
                          "image, what should I do next in order to stop the {obj}?",
        options={"up": "put a wall above it", "down": "put a wall below it",
                 "left": "put a wall to its left", "right": "put a wall to its right"},
    ),
}
TRAIN_KINDS = ("predict",)
SFT_KINDS = ("predict",) * 5 + ("heading", "next_move", "follow", "film", "meet")  # half of them ask `predict`
NEW_KINDS = ("catch", "block")
_OPTION_DIRECTION = re.compile(r"\b(up|down|left|right|above|below)\b", re.IGNORECASE)
_WORD_TO_DIRECTION = {"up": "up", "down": "down", "left": "left", "right": "right", "above": "up", "below": "down"}


def option_direction(text: str) -> Optional[str]:
    """The next-move direction an option text stands for (any kind's wording), or None."""
    found = _OPTION_DIRECTION.search(text)
    return _WORD_TO_DIRECTION[found.group(1).lower()] if found else None


def observation(motion: Motion, cell_first: bool = False) -> str:
    """The premises: which way the car drove and where it is now ("The red car drove left and is now at row 2,
    column 2"), or with `cell_first` the cell, then the direction ("The red car is now at row 2, column 2; it
    drove left"): the direction next to the answer (demo README, development runs 20-29)."""
    if cell_first:
        return f"The {motion.name} is now at {cell_text(motion.current)}; it drove {motion.direction}"
    return f"The {motion.name} drove {motion.direction} and is now at {cell_text(motion.current)}"


def rationale(motion: Motion, states_next_move: bool = False, cell_first: bool = False) -> str:
    """The reasoning: the premises (the answer is the move the rule derives from them), or, with
    `states_next_move`, the premises and then the next move they imply (`..., at the wall, so next it drives
    left.`). `cell_first`: the premises' word order (`observation`)."""
    premises = observation(motion, cell_first)
    if not states_next_move:
        return f"{premises}."
    if motion.at_wall:
        return f"{premises}, at the wall, so next it drives {motion.next_direction}."
    return f"{premises}, so next it drives {motion.next_direction}."


def completion(think: str, letter: str) -> str:
    """A completion in the format the reward accepts: `<think>...</think><answer>X</answer>`."""
    return f"<think>{think}</think><answer>{letter}</answer>"
