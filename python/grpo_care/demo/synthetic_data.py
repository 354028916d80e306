"""The demo's data set, written in SEED-Bench-R1's layout (grpo_care.md 9.2) with real .mp4 and .png files.

    files = write_dataset("out/data", sizes=DatasetSizes(train=256, sft=384, eval_per_level=48), seed=0)
    files.train, files.sft, files.levels["L1"]      # annotations/*.jsonl under out/data

    out/data/annotations/training.jsonl             RL prompts
    out/data/annotations/training_with_cot.jsonl    warm-start SFT, each with a deliberately imperfect `cot`
    out/data/annotations/validation_L{1,2,3}.jsonl  evaluation
    out/data/videos/<video_source>/<id>.mp4, out/data/images/<video_source>/<id>.png

Every record has SEED-Bench-R1's fields (question, answer, choice_a..choice_d, golden_choice_idx,
task_progress_metadata, video_source, video_basename, current_observation_basename, sample_id). The demo lists
the four options of every question in one fixed order (up, down, left, right), the way a printed answer sheet
does, so its training file uses the validation layout too and the trainer keeps the order: finding which
shuffled option says "left" is an induction skill a 4-layer model trained from scratch does not pick up in
the demo's few minutes, and without it no answer could follow its reasoning. `shuffle_options=True` writes
SEED-Bench-R1's training layout instead (`negative_answers`, options shuffled by the trainer).

Levels mirror SEED-Bench-R1: L1 seen scenes (in-distribution), L2 new scenes, L3 new scenes and new task kinds.
Each record also carries `ground_truth` (direction driven, current cell, next move, at the wall, the option
directions in letter order), the programmatic truth for the answer and for the reasoning.

The SFT chains of thought are imperfect on purpose, as a base model's are: with probability
`reasoning_flaw_rate` the `<think>` states a wrong premise (direction or current cell) and follows it to a
different next move while the answer stays the gold letter; with probability `answer_flaw_rate` the reasoning is
right and the answer is another letter. Either way the rationale disagrees with its answer.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from grpo_care.demo.render import FPS, NEW_SCENES, SEEN_SCENES, Scene, render_clip, write_mp4, write_png
from grpo_care.demo.tasks import (
    NEW_KINDS,
    TASK_KINDS,
    TRAIN_KINDS,
    TaskKind,
    completion,
    observation,
    rationale,
)
from grpo_care.demo.world import (
    COLORS,
    DIRECTIONS,
    GRID,
    OPPOSITE,
    SHAPES,
    Cell,
    Motion,
    inside,
    next_cell,
    step,
)

LETTERS = "ABCD"
OPTION_ORDER = ("up", "down", "left", "right")


@dataclass(frozen=True)
class DatasetSizes:
    train: int = 256
    sft: int = 384
    eval_per_level: int = 48


@dataclass(frozen=True)
class CotFlaws:
    reasoning_flaw_rate: float = 0.25
    answer_flaw_rate: float = 0.10


@dataclass
class DatasetFiles:
    root: Path
    train: Path
    sft: Path
    levels: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Split:
    name: str
    scenes: tuple[Scene, ...]
    kinds: tuple[str, ...]
    level: str


SPLITS = {
    "train": Split("train", SEEN_SCENES, TRAIN_KINDS, "train"),
    "sft": Split("sft", SEEN_SCENES, TRAIN_KINDS, "train"),
    "L1": Split("L1", SEEN_SCENES, TRAIN_KINDS, "L1"),
    "L2": Split("L2", NEW_SCENES, TRAIN_KINDS, "L2"),
    "L3": Split("L3", NEW_SCENES, NEW_KINDS, "L3"),
}


def sample_motion(rng: random.Random) -> Motion:
    """A random visible move, at the wall (next move: back) or not (next move: on) with equal odds."""
    direction = rng.choice(sorted(DIRECTIONS))
    back = OPPOSITE[direction]
    at_wall = rng.random() < 0.5
    cells = [(r, c) for r in range(1, GRID + 1) for c in range(1, GRID + 1)
             if inside(step((r, c), back)) and inside(step((r, c), direction)) != at_wall]
    current = rng.choice(cells)
    return Motion(color=rng.choice(sorted(COLORS)), shape=rng.choice(SHAPES), direction=direction,
                  previous=step(current, back), current=current)


def clutter_cells(motion: Motion, scene: Scene, rng: random.Random) -> list[Cell]:
    busy = {motion.previous, motion.current, next_cell(motion.direction, motion.current)}
    free = [(r, c) for r in range(1, GRID + 1) for c in range(1, GRID + 1) if (r, c) not in busy]
    return rng.sample(free, rng.randint(0, scene.max_clutter))


def flawed_premise(motion: Motion, rng: random.Random) -> Motion:
    """A wrong belief about the clip (another direction, or a neighbouring cell) that implies another move."""
    for _ in range(100):
        if rng.random() < 0.5:
            wrong = replace(motion, direction=rng.choice([d for d in sorted(DIRECTIONS) if d != motion.direction]))
        else:
            cell = step(motion.current, rng.choice(sorted(DIRECTIONS)))
            if not inside(cell):
                continue
            wrong = replace(motion, current=cell)
        if wrong.next_direction != motion.next_direction:
            return wrong
    raise RuntimeError(f"no flawed premise found for {motion}")  # unreachable on a 4x4 grid


def ground_truth(motion: Motion, kind: TaskKind, scene: Scene, option_directions: list[str]) -> dict:
    return {"direction": motion.direction, "previous": list(motion.previous), "current": list(motion.current),
            "next_direction": motion.next_direction, "at_wall": motion.at_wall,
            "next_cell": list(next_cell(motion.direction, motion.current)), "color": motion.color,
            "shape": motion.shape, "task_kind": kind.name, "scene": scene.name,
            "option_directions": option_directions, "rationale": rationale(motion),
            "observation": observation(motion) + "."}


def make_record(split: Split, index: int, rng: random.Random, flaws: CotFlaws,
                shuffle_options: bool = False) -> tuple[dict, Motion, Scene, list]:
    motion = sample_motion(rng)
    scene = rng.choice(split.scenes)
    kind = TASK_KINDS[rng.choice(split.kinds)]
    video_source = f"gridworld_{split.name}"
    stem = f"{split.name}_{index:05d}"
    record = {
        "sample_id": f"{split.name}-{index:05d}",
        "video_source": video_source,
        "video_basename": f"{stem}.mp4",
        "current_observation_basename": f"{stem}.png",
        "video_id": stem,
        "task_goal": kind.task_goal(motion),
        "question": kind.question(motion),
        "answer": kind.option(motion, motion.next_direction),
        "task_progress_metadata": [{"narration_text": f"the {motion.name} drives {motion.direction}",
                                    "start_frame": 0, "stop_frame": 3}],
        "domain": kind.name,
    }
    if split.name == "train" and shuffle_options:
        wrong = [d for d in OPTION_ORDER if d != motion.next_direction]
        record["negative_answers"] = [kind.option(motion, d) for d in wrong]
        option_directions = [motion.next_direction] + wrong
    else:
        option_directions = list(OPTION_ORDER)
        if shuffle_options:
            rng.shuffle(option_directions)
        for letter, direction in zip("abcd", option_directions):
            record[f"choice_{letter}"] = kind.option(motion, direction)
        record["golden_choice_idx"] = LETTERS[option_directions.index(motion.next_direction)]
        record["task_level"] = split.level
    record["ground_truth"] = ground_truth(motion, kind, scene, option_directions)
    if split.name == "sft":
        record.update(imperfect_cot(motion, option_directions, rng, flaws))
    clutter = clutter_cells(motion, scene, rng)
    return record, motion, scene, clutter


def imperfect_cot(motion: Motion, option_directions: list[str], rng: random.Random, flaws: CotFlaws) -> dict:
    gold = LETTERS[option_directions.index(motion.next_direction)]
    u = rng.random()
    if u < flaws.reasoning_flaw_rate:
        return {"cot": completion(rationale(flawed_premise(motion, rng)), gold), "cot_flaw": "reasoning"}
    if u < flaws.reasoning_flaw_rate + flaws.answer_flaw_rate:
        wrong = rng.choice([letter for letter in LETTERS[:len(option_directions)] if letter != gold])
        return {"cot": completion(rationale(motion), wrong), "cot_flaw": "answer"}
    return {"cot": completion(rationale(motion), gold), "cot_flaw": "none"}


def write_split(root: Path, split: Split, count: int, seed: int, flaws: CotFlaws,
                shuffle_options: bool = False) -> list[dict]:
    rng = random.Random(f"{seed}-{split.name}")
    pixels = np.random.default_rng(zlib.crc32(f"{seed}-{split.name}".encode()))
    records = []
    for i in range(count):
        record, motion, scene, clutter = make_record(split, i, rng, flaws, shuffle_options)
        frames = render_clip(scene, motion, clutter, pixels)
        write_mp4(root / "videos" / record["video_source"] / record["video_basename"], frames, FPS)
        write_png(root / "images" / record["video_source"] / record["current_observation_basename"], frames[-1])
        records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_dataset(root: str | Path, sizes: DatasetSizes = DatasetSizes(), seed: int = 0,
                  flaws: CotFlaws = CotFlaws(), shuffle_options: bool = False) -> DatasetFiles:
    """Render and write every split; returns the annotation paths. Deterministic in `seed`.

    `shuffle_options=False` (the demo): every question lists its options in OPTION_ORDER and every file uses
    the validation layout (the trainer keeps that order). `True`: SEED-Bench-R1's training layout
    (`negative_answers`, shuffled by the trainer) and shuffled validation options.
    """
    root = Path(root)
    annotations = root / "annotations"
    files = DatasetFiles(root=root, train=annotations / "training.jsonl", sft=annotations / "training_with_cot.jsonl")
    write_jsonl(files.train, write_split(root, SPLITS["train"], sizes.train, seed, flaws, shuffle_options))
    write_jsonl(files.sft, write_split(root, SPLITS["sft"], sizes.sft, seed, flaws, shuffle_options))
    for level in ("L1", "L2", "L3"):
        path = annotations / f"validation_{level}.jsonl"
        write_jsonl(path, write_split(root, SPLITS[level], sizes.eval_per_level, seed, flaws, shuffle_options))
        files.levels[level] = path
    (root / "dataset_info.json").write_text(json.dumps(
        {"seed": seed, "sizes": asdict(sizes), "flaws": asdict(flaws), "fps": FPS, "grid": GRID,
         "shuffle_options": shuffle_options}, indent=2))
    return files
