"""Scores of one model on the three levels: the trainer's evaluation for accuracy, the code judge for consistency.

    scores = score_model(model, processor, files, config)
    scores["accuracy"]["L2"], scores["consistency"], scores["records"][0]["verdict"]

Accuracy comes from `grpo_care.evaluate.evaluate` (SEED-Bench-R1's protocol: near-greedy decoding, exact
letter match). Every completion it returns is then judged by `consistency.judge` against the options and the
ground truth stored in the demo's annotation records.

Besides the table's rates, the scores break accuracy and consistency down by clip (cars driving forward vs
backing up) and measure perception: `perception_L1` is the share of L1's questions whose stated premises are
the ones the warm start was taught to see (the way the car faces, and its cell), what the warm start's
perception target is checked on.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from grpo_care.demo.consistency import judge

LEVELS = ("L1", "L2", "L3")


def read_records(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return {str(r["sample_id"]): r for r in (json.loads(line) for line in f if line.strip())}


def options_of(record: dict) -> list[str]:
    return [record[f"choice_{c}"] for c in "abcd"]


def _rate(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def _premises_as_taught(verdict, truth: dict) -> bool:
    """The stated premises are the teacher's (the way the car faces, and its cell)."""
    return (verdict.direction == truth["teacher_direction"] and verdict.current is not None
            and list(verdict.current) == list(truth["current"]))


def _by_clip(records: list[dict], key: str) -> dict:
    return {clip: _rate([r[key] for r in records if r["clip"] == clip]) for clip in ("forward", "reversing")}


def _by_motion(records: list[dict], key: str) -> dict:
    """{"shown", "hidden"}: the rate on clips that show the motion and on those that hide it
    (World.hidden_motion_rate)."""
    return {name: _rate([r[key] for r in records if r["motion_hidden"] == hidden])
            for name, hidden in (("shown", False), ("hidden", True))}


def score_model(model, processor, files, config) -> dict:
    """Accuracy per level and overall, consistency (overall, per level, among correct answers, per clip kind),
    premises (true, as taught), perception on L1 (premises as taught)."""
    from grpo_care.evaluate import evaluate

    accuracy, consistency, records = {}, {}, []
    for level in LEVELS:
        annotations = read_records(files.levels[level])
        result = evaluate(model, processor, str(files.levels[level]), config)
        accuracy[level] = result["accuracy"]
        verdicts = []
        for r in result["records"]:
            record = annotations[str(r["sample_id"])]
            verdict = judge(r["completion"], options_of(record), record["ground_truth"])
            verdicts.append(verdict.consistent)
            truth = record["ground_truth"]
            records.append({"level": level, "sample_id": r["sample_id"], "completion": r["completion"],
                            "answer": r["answer"], "gold": r["gold"], "correct": bool(r["correct"]),
                            "format_ok": bool(r["format_ok"]), "verdict": asdict(verdict),
                            "clip": "reversing" if truth.get("reversing") else "forward",
                            "at_wall": bool(truth["at_wall"]),
                            "consistent": verdict.consistent, "premises_correct": bool(verdict.premises_correct),
                            "premises_as_taught": _premises_as_taught(verdict, truth)})
            if "motion_hidden" in truth:
                records[-1]["motion_hidden"] = truth["motion_hidden"]
        consistency[level] = _rate(verdicts)
    by_motion = {}
    if records and all("motion_hidden" in r for r in records):
        by_motion = {"accuracy_by_motion": _by_motion(records, "correct"),
                     "consistency_by_motion": _by_motion(records, "consistent")}
    return {
        "accuracy": accuracy,
        "accuracy_overall": _rate([r["correct"] for r in records]),
        "consistency": _rate([r["verdict"]["consistent"] for r in records]),
        "consistency_per_level": consistency,
        "consistency_when_correct": _rate([r["verdict"]["consistent"] for r in records if r["correct"]]),
        "premises_correct": _rate([r["premises_correct"] for r in records]),
        "premises_as_taught": _rate([r["premises_as_taught"] for r in records]),
        "perception_L1": _rate([r["premises_as_taught"] for r in records if r["level"] == "L1"]),
        "accuracy_by_clip": _by_clip(records, "correct"),
        "consistency_by_clip": _by_clip(records, "consistent"),
        **by_motion,
        "format": _rate([r["format_ok"] for r in records]),
        "n": len(records),
        "records": records,
    }
