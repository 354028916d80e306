"""Training and evaluation samples: SEED-Bench-R1 and Video-R1 readers and the exact GRPO-CARE prompts.

    samples = load_samples("annotations/training_6k.jsonl", root="SEED-Bench-R1", seed=42)
    messages = build_messages(samples[0])       # one user turn: [video], [image], text

SEED-Bench-R1 (grpo_care.md 2.1, 9.2): a training record (`negative_answers`, no `golden_choice_idx`) gets
`random.sample(negative_answers, 3) + [answer]`, shuffled once by an RNG seeded with `seed` and consumed in
file order (the authors' `dataset.map`); a validation record keeps `choice_a`..`choice_d` in order with the
gold letter `golden_choice_idx`. The video is present only when `task_progress_metadata` is non-empty; the
current observation is always a separate image. Video-R1 (2.2): `problem`, `options`, `problem_type`,
`data_type`, `path`, `solution`.

A malformed line or record is a `DataFormatError` naming the file and the line (or record) number.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from grpo_care.user_errors import UsageError

QUESTION_TEMPLATE = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, "
    "and then give your final answer between the <answer> </answer> tags."
)
# eval_bench.py's version: "and" added twice (a train/eval mismatch of the official code, kept on purpose).
EVAL_QUESTION_TEMPLATE = QUESTION_TEMPLATE.replace(
    "the <think> </think> tags, and then give your final answer between the <answer> </answer> tags.",
    "the <think> and </think> tags, and then give your final answer between the <answer> and </answer> tags.",
)
_NUMERICAL = " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags."
TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) "
    "within the <answer> </answer> tags.",
    "numerical": _NUMERICAL,
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer "
    "within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "regression": _NUMERICAL,
}

# `prompt_style="short"` (the demo's design 4, its demo README): one sentence instead of the paper's paragraph, with
# the paper's "and" difference between its training and evaluation wordings, and no option-letter sentence for
# multiple choice (the other problem types keep TYPE_TEMPLATE's sentence: it says what form the answer takes).
# Worded with the paper's own tokens, so the demo's restricted vocabulary (demo/vocabulary.py) stays as it was.
SHORT_QUESTION_TEMPLATE = (
    "{Question}\nPlease reason between the <think> </think> tags and answer between the <answer> </answer> tags."
)
SHORT_EVAL_QUESTION_TEMPLATE = (
    "{Question}\nPlease reason between the <think> and </think> tags and answer between the <answer> and </answer> "
    "tags."
)
PROMPT_STYLES = ("paper", "short")


def strip_instructions(text: str) -> str:
    """The question with its options: a prompt text (question_text's, any template and style) without the
    instructions that follow them; a text without them unchanged."""
    for template in (QUESTION_TEMPLATE, SHORT_QUESTION_TEMPLATE):
        start = template.split("{Question}", 1)[1][:24]  # "\nPlease think about this " / "\nPlease reason between "
        cut = text.rfind(start)
        if cut >= 0:
            return text[:cut]
    return text


def check_wording(template: str, prompt_style: str) -> None:
    """A ValueError naming the bad argument unless template is train / eval and prompt_style one of PROMPT_STYLES."""
    if template not in ("train", "eval"):
        raise ValueError(f"template must be 'train' or 'eval', got {template!r}")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {prompt_style!r}")


def question_text(question: str, problem_type: str = "multiple choice", template: str = "train",
                  prompt_style: str = "paper") -> str:
    """The user turn's text: the question (options included) in the template's wording, then the answer-form
    sentence of its problem type.

    template: "train" (the training prompt) or "eval" (eval_bench.py's wording); prompt_style: "paper"
    (QUESTION_TEMPLATE / EVAL_QUESTION_TEMPLATE + TYPE_TEMPLATE[problem_type], grpo_care.md 2) or "short"
    (SHORT_QUESTION_TEMPLATE / SHORT_EVAL_QUESTION_TEMPLATE, + TYPE_TEMPLATE[problem_type] except for multiple
    choice)."""
    check_wording(template, prompt_style)
    if problem_type not in TYPE_TEMPLATE:
        raise ValueError(f"problem_type must be one of {sorted(TYPE_TEMPLATE)}, got {problem_type!r}")
    if prompt_style == "paper":
        wording = QUESTION_TEMPLATE if template == "train" else EVAL_QUESTION_TEMPLATE
        return wording.format(Question=question) + TYPE_TEMPLATE[problem_type]
    wording = SHORT_QUESTION_TEMPLATE if template == "train" else SHORT_EVAL_QUESTION_TEMPLATE
    answer_form = "" if problem_type == "multiple choice" else TYPE_TEMPLATE[problem_type]
    return wording.format(Question=question) + answer_form


class DataFormatError(UsageError):
    """A record that cannot be read; the message starts with `file:line:`. A UsageError (so a ValueError):
    `grpo-care` says it in one line."""

    def __init__(self, message: str, *, source: str = "",
                 hint: str = "fix that record of the annotation file, or pass another file"):
        super().__init__(message, source=source, hint=hint)


@dataclass
class Sample:
    """One prompt: the question text (template included), the gold `<answer>X</answer>` and media paths."""

    sample_id: str
    text: str
    solution: str
    problem_type: str = "multiple choice"
    video: Optional[str] = None
    image: Optional[str] = None
    options: list = field(default_factory=list)
    level: str = ""
    domain: str = ""
    where: str = ""

    def columns(self) -> dict:
        """The dataset columns passed to reward functions as keyword arguments (TRL's convention)."""
        return {
            "solution": self.solution,
            "problem_type": self.problem_type,
            "sample_id": self.sample_id,
            "options": self.options,
            "level": self.level,
            "domain": self.domain,
        }


def build_messages(sample: Sample, multimodal: bool = True) -> list[dict]:
    """The single user turn of GRPO-CARE (no custom system message: the chat template adds its default).

    `multimodal=False` (a text-only model) keeps only the text; the caller warns that media are dropped.
    """
    content: list[dict] = []
    if multimodal and sample.video:
        content.append({"type": "video", "video": sample.video})
    if multimodal and sample.image:
        content.append({"type": "image", "image": sample.image})
    content.append({"type": "text", "text": sample.text})
    if not multimodal:
        return [{"role": "user", "content": sample.text}]
    return [{"role": "user", "content": content}]


# ------------------------------------------------------------------------------------------------------------
# reading files


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """[(where, record)]: JSONL (one object a line) or a JSON list; where = `file:line` / `file:record N`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataFormatError(f"{path}:1: a .json annotation file must hold a list of records")
        out = []
        for i, record in enumerate(data):
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}:record {i}: each record must be a JSON object")
            out.append((f"{path}:record {i}", record))
        return out
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(record, dict):
            raise DataFormatError(
                f"{path}:{lineno}: each line must be a JSON object, got {type(record).__name__}"
            )
        out.append((f"{path}:{lineno}", record))
    return out


def default_root(path: str | Path) -> Path:
    """SEED-Bench-R1 keeps annotations/ beside videos/ and images/: the annotation file's grandparent."""
    return Path(path).resolve().parent.parent


def load_samples(
    path: str | Path,
    root: str | Path | None = None,
    *,
    fmt: str = "auto",
    seed: int = 42,
    template: str = "train",
    prompt_style: str = "paper",
    limit: int = 0,
) -> list[Sample]:
    """Read an annotation file into Samples (options shuffled once, deterministically from `seed`); the prompt
    text in `template`'s wording ("train" or "eval") and `prompt_style` ("paper" or "short": question_text)."""
    check_wording(template, prompt_style)  # before any record, not as a bad record
    root = Path(root) if root else default_root(path)
    rng = random.Random(seed)
    level = Path(path).stem
    out = []
    for where, record in read_records(path):
        kind = fmt if fmt != "auto" else ("video_r1" if "problem_type" in record else "seed_bench_r1")
        try:
            if kind == "seed_bench_r1":
                sample = seed_bench_r1_sample(record, root, rng, template, prompt_style)
            elif kind == "video_r1":
                sample = video_r1_sample(record, root, template, prompt_style)
            else:
                raise ValueError(f"unknown dataset format {fmt!r}")
        except (KeyError, TypeError, ValueError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise DataFormatError(f"{where}: bad {kind} record: {detail}") from None
        sample.where = where
        sample.level = str(record.get("task_level") or record.get("level") or level)
        sample.domain = str(record.get("domain") or record.get("scenario") or "")
        out.append(sample)
        if limit and len(out) >= limit:
            break
    return out


def seed_bench_r1_sample(record: dict, root: Path, rng: random.Random, template: str = "train",
                         prompt_style: str = "paper") -> Sample:
    """grpo_care.md 2.1: options, question text, gold letter, video (if any progress), observation image."""
    answer = record["answer"]
    if "golden_choice_idx" in record:
        options = [record[f"choice_{c}"] for c in "abcd"]
        gold = str(record["golden_choice_idx"]).strip()
    else:
        negatives = record["negative_answers"]
        if not isinstance(negatives, list) or len(negatives) < 3:
            raise ValueError("negative_answers must be a list of at least 3 strings")
        options = rng.sample(negatives, 3) + [answer]
        rng.shuffle(options)
        gold = chr(65 + options.index(answer))
    question = (
        record["question"]
        + "Options:\n"
        + "\n".join(f"{chr(65 + i)}. {option}" for i, option in enumerate(options))
        + "\n"
    )
    text = question_text(question, "multiple choice", template, prompt_style)
    source = record["video_source"]
    video = None
    if len(record.get("task_progress_metadata") or []) > 0:
        video = str(root / "videos" / source / record["video_basename"])
    image = str(root / "images" / source / record["current_observation_basename"])
    return Sample(
        sample_id=str(record.get("sample_id", "")),
        text=text,
        solution=f"<answer>{gold}</answer>",
        problem_type="multiple choice",
        video=video,
        image=image,
        options=options,
    )


def video_r1_sample(record: dict, root: Path, template: str = "train", prompt_style: str = "paper") -> Sample:
    """grpo_care.md 2.2: `problem` (+ "Options:" and an option a line for multiple choice) + TYPE_TEMPLATE."""
    problem_type = record["problem_type"]
    if problem_type not in TYPE_TEMPLATE:
        raise ValueError(f"problem_type must be one of {sorted(TYPE_TEMPLATE)}, got {problem_type!r}")
    question = record["problem"]
    options = list(record.get("options") or [])
    if problem_type == "multiple choice":
        question = question + "Options:\n" + "".join(f"{op}\n" for op in options)
    text = question_text(question, problem_type, template, prompt_style)
    data_type = record.get("data_type", "image")
    if data_type not in ("image", "video"):
        raise ValueError(f"data_type must be image or video, got {data_type!r}")
    media = None
    if record.get("path"):
        rel = record["path"][2:] if record["path"].startswith("./") else record["path"]
        media = str(root / rel)
    return Sample(
        sample_id=str(record.get("problem_id", "")),
        text=text,
        solution=record["solution"],
        problem_type=problem_type,
        video=media if data_type == "video" else None,
        image=media if data_type == "image" else None,
        options=options,
    )
