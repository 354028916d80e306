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

The warm start's chains of thought (`cot` in training_with_cot.jsonl) are written the way a teacher writes them
that reads which way a car drove off the way it faces: it states those premises and follows them faithfully
to the move they imply, and answers that move's letter. The teacher is right when the car drives forward and
wrong when it backs up (`reversing_rate` of the clips) away from a wall: a wrong premise followed faithfully,
consistent and wrong. `Teacher.misread_rate` adds other wrong premises (another direction or a neighbouring
cell), also followed faithfully: they are there to make the answer a function of the written premises rather
than of the clip (whether a warm start learns that: demo README, development runs 15-29).
`Teacher.unfaithful_rate` writes another answer letter than the reasoning implies: the only targets whose answer
does not follow their reasoning. With `Teacher.slip_to="signal"` (design 3) that letter is the one of the move the
clip's rim shows, a habit no rationale states (random in the warm start's clips, the next move in RL's).
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from grpo_care.demo.render import (
    FPS,
    NEW_SCENES,
    SEEN_SCENES,
    Scene,
    check_front_cue,
    render_clip,
    write_mp4,
    write_png,
)
from grpo_care.demo.tasks import (
    NEW_KINDS,
    SFT_KINDS,
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
class Teacher:
    """How the warm start's chains of thought are written (see the module docstring)."""

    sees_reversing_rate: float = 0.0  # on a reversing car, the teacher reads the way it drove from the motion
    misread_rate: float = 0.0  # a wrong premise besides the reversing cars', followed faithfully
    unfaithful_rate: float = 0.0  # another answer letter than the reasoning implies
    slip_to: str = "random"  # that letter: "random" (another letter) or "signal" (the letter of the rim's move)
    states_next_move: bool = True  # end the reasoning with "so next it drives X" (tasks.rationale)
    cell_first: bool = False  # word the premises cell first, direction last (tasks.observation)

    def __post_init__(self):
        if self.slip_to not in ("random", "signal"):
            raise ValueError(f"slip_to must be 'random' or 'signal', got {self.slip_to!r}")


@dataclass(frozen=True)
class World:
    """How clips are drawn: the share of cars that back up (their front points away from where they drive), and
    what the signal shows in the warm start's clips ("random": a random direction's color, so that the warm
    start learns to ignore it; "next_move": the next move, as in every RL and evaluation clip)."""

    reversing_rate: float = 0.5
    sft_signal: str = "next_move"
    front_cue: str = "windshield"  # render.render_clip: "lines" also shows the way the car faces in the grid lines
    hidden_motion_rate: float = 0.0  # RL and evaluation clips whose car does not move on screen (render_clip)

    def __post_init__(self):
        if not 0.0 <= self.hidden_motion_rate <= 1.0:
            raise ValueError(f"hidden_motion_rate must be in [0, 1], got {self.hidden_motion_rate}")
        check_front_cue(self.front_cue)
        if self.sft_signal not in ("random", "next_move"):
            raise ValueError(f"sft_signal must be 'random' or 'next_move', got {self.sft_signal!r}")


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
    "sft": Split("sft", SEEN_SCENES, SFT_KINDS, "train"),
    "L1": Split("L1", SEEN_SCENES, TRAIN_KINDS, "L1"),
    "L2": Split("L2", NEW_SCENES, TRAIN_KINDS, "L2"),
    "L3": Split("L3", NEW_SCENES, NEW_KINDS, "L3"),
}


def sample_motion(rng: random.Random, reversing_rate: float = 0.0) -> Motion:
    """A random visible move, at the wall (next move: back) or not (next move: on) with equal odds; the car
    backs up with probability `reversing_rate`."""
    direction = rng.choice(sorted(DIRECTIONS))
    back = OPPOSITE[direction]
    at_wall = rng.random() < 0.5
    cells = [(r, c) for r in range(1, GRID + 1) for c in range(1, GRID + 1)
             if inside(step((r, c), back)) and inside(step((r, c), direction)) != at_wall]
    current = rng.choice(cells)
    reversing = rng.random() < reversing_rate
    return Motion(color=rng.choice(sorted(COLORS)), shape=rng.choice(SHAPES), direction=direction,
                  previous=step(current, back), current=current, reversing=reversing)


def teacher_belief(motion: Motion) -> Motion:
    """What the teacher believes the clip shows: the car drove the way it faces (right unless it backs up)."""
    return replace(motion, direction=motion.facing, previous=step(motion.current, OPPOSITE[motion.facing]),
                   reversing=False)


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


def ground_truth(motion: Motion, kind: TaskKind, scene: Scene, option_directions: list[str], signal: str,
                 cell_first: bool = False) -> dict:
    """The clip's truth, the signal it shows, and the teacher's premises (`teacher_direction`,
    `teacher_observation`); the texts worded as the teacher words them (`cell_first`)."""
    belief = teacher_belief(motion)
    return {"direction": motion.direction, "previous": list(motion.previous), "current": list(motion.current),
            "next_direction": motion.next_direction, "at_wall": motion.at_wall,
            "next_cell": list(next_cell(motion.direction, motion.current)), "color": motion.color,
            "shape": motion.shape, "reversing": motion.reversing, "facing": motion.facing,
            "signal": signal, "task_kind": kind.name, "scene": scene.name,
            "option_directions": option_directions, "rationale": rationale(motion, cell_first=cell_first),
            "observation": observation(motion, cell_first) + ".", "teacher_direction": belief.direction,
            "teacher_next_direction": belief.next_direction,
            "teacher_observation": observation(belief, cell_first) + "."}


def make_record(split: Split, index: int, rng: random.Random, teacher: Teacher, world: World,
                shuffle_options: bool = False, drill_rng: random.Random | None = None
                ) -> tuple[dict, Motion, Scene, list, str]:
    motion = sample_motion(rng, world.reversing_rate)
    signal = motion.next_direction
    if split.name == "sft" and world.sft_signal == "random":
        signal = rng.choice(sorted(DIRECTIONS))
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
    record["ground_truth"] = ground_truth(motion, kind, scene, option_directions, signal, teacher.cell_first)
    if split.name == "sft":
        record.update(teacher_cot(motion, option_directions, rng, teacher, signal))
        if drill_rng is not None:  # its own random stream: a drill changes no clip, premise or letter of the rest
            record.update(answer_drill(motion, option_directions, drill_rng, teacher))
    clutter = clutter_cells(motion, scene, rng)
    return record, motion, scene, clutter, signal


def random_premises(rng: random.Random, car: Motion) -> Motion:
    """Premises about `car` drawn at random, whatever its clip shows: a direction, and a cell it can have driven
    into that way (its previous cell on the board)."""
    direction = rng.choice(sorted(DIRECTIONS))
    cells = [(r, c) for r in range(1, GRID + 1) for c in range(1, GRID + 1)
             if inside(step((r, c), OPPOSITE[direction]))]
    current = rng.choice(cells)
    return replace(car, direction=direction, previous=step(current, OPPOSITE[direction]), current=current,
                   reversing=False)


def answer_drill(car: Motion, option_directions: list[str], rng: random.Random, teacher: Teacher) -> dict:
    """An answer drill: random premises (`drill_premises`) in the teacher's wording and the letter of the move they
    imply (`drill`, a completion). The warm start shows drills with a black clip and image and trains only what
    follows the premises (warm_start.py): the letter can only come from the written premises."""
    premises = random_premises(rng, car)
    letter = LETTERS[option_directions.index(premises.next_direction)]
    return {"drill": completion(rationale(premises, teacher.states_next_move, teacher.cell_first), letter),
            "drill_premises": observation(premises, teacher.cell_first) + "."}


def teacher_cot(motion: Motion, option_directions: list[str], rng: random.Random, teacher: Teacher,
                signal: str | None = None) -> dict:
    """The teacher's chain of thought: its premises (`cot_premises`), followed faithfully to the letter of the
    move they imply, except `unfaithful_rate` of them: another letter (`slip_to="random"`) or the letter of the
    move the clip's rim shows (`slip_to="signal"`; where that is the implied move anyway the target stays
    faithful). `cot_kind`: faithful | saw_reversing | misread | unfaithful."""
    belief = teacher_belief(motion)
    kind = "faithful"
    if motion.reversing and rng.random() < teacher.sees_reversing_rate:
        belief, kind = motion, "saw_reversing"
    u = rng.random()
    if u < teacher.misread_rate:
        belief, kind = flawed_premise(belief, rng), "misread"
    letter = LETTERS[option_directions.index(belief.next_direction)]
    if teacher.misread_rate <= u < teacher.misread_rate + teacher.unfaithful_rate:
        if teacher.slip_to == "random":
            letter = rng.choice([x for x in LETTERS[:len(option_directions)] if x != letter])
            kind = "unfaithful"
        elif signal is None:
            raise ValueError("Teacher(slip_to='signal') needs the clip's signal")
        elif signal != belief.next_direction:
            letter, kind = LETTERS[option_directions.index(signal)], "unfaithful"
    return {"cot": completion(rationale(belief, teacher.states_next_move, teacher.cell_first), letter),
            "cot_kind": kind, "cot_premises": observation(belief, teacher.cell_first) + "."}


def write_split(root: Path, split: Split, count: int, seed: int, teacher: Teacher, world: World,
                shuffle_options: bool = False) -> list[dict]:
    rng = random.Random(f"{seed}-{split.name}")
    pixels = np.random.default_rng(zlib.crc32(f"{seed}-{split.name}".encode()))
    drill_rng = random.Random(f"{seed}-{split.name}-drill")
    hide_rng = random.Random(f"{seed}-{split.name}-hide")  # its own stream: hiding changes nothing else
    records = []
    for i in range(count):
        record, motion, scene, clutter, signal = make_record(split, i, rng, teacher, world, shuffle_options,
                                                             drill_rng)
        hide = False
        if split.name != "sft" and world.hidden_motion_rate > 0:  # the warm start's clips always show the motion
            hide = hide_rng.random() < world.hidden_motion_rate
            record["ground_truth"]["motion_hidden"] = hide
        frames = render_clip(scene, motion, clutter, pixels, signal, world.front_cue, hide)
        write_mp4(root / "videos" / record["video_source"] / record["video_basename"], frames, FPS)
        write_png(root / "images" / record["video_source"] / record["current_observation_basename"], frames[-1])
        records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def dataset_files(root: str | Path) -> DatasetFiles:
    """The annotation paths of a data set `write_dataset` finished under `root` (it writes dataset_info.json
    last)."""
    root = Path(root)
    if not (root / "dataset_info.json").is_file():
        raise FileNotFoundError(f"no finished demo data set under {root} (dataset_info.json is missing)")
    annotations = root / "annotations"
    return DatasetFiles(root=root, train=annotations / "training.jsonl", sft=annotations / "training_with_cot.jsonl",
                        levels={level: annotations / f"validation_{level}.jsonl" for level in ("L1", "L2", "L3")})


def write_dataset(root: str | Path, sizes: DatasetSizes = DatasetSizes(), seed: int = 0,
                  teacher: Teacher = Teacher(), world: World = World(), shuffle_options: bool = False) -> DatasetFiles:
    """Render and write every split; returns the annotation paths. Deterministic in `seed`.

    `shuffle_options=False` (the demo): every question lists its options in OPTION_ORDER and every file uses
    the validation layout (the trainer keeps that order). `True`: SEED-Bench-R1's training layout
    (`negative_answers`, shuffled by the trainer) and shuffled validation options.
    """
    root = Path(root)
    annotations = root / "annotations"
    files = DatasetFiles(root=root, train=annotations / "training.jsonl", sft=annotations / "training_with_cot.jsonl")
    write_jsonl(files.train, write_split(root, SPLITS["train"], sizes.train, seed, teacher, world, shuffle_options))
    write_jsonl(files.sft, write_split(root, SPLITS["sft"], sizes.sft, seed, teacher, world, shuffle_options))
    for level in ("L1", "L2", "L3"):
        path = annotations / f"validation_{level}.jsonl"
        write_jsonl(path, write_split(root, SPLITS[level], sizes.eval_per_level, seed, teacher, world, shuffle_options))
        files.levels[level] = path
    (root / "dataset_info.json").write_text(json.dumps(
        {"seed": seed, "sizes": asdict(sizes), "teacher": asdict(teacher), "world": asdict(world), "fps": FPS,
         "grid": GRID, "shuffle_options": shuffle_options}, indent=2))
    return files
