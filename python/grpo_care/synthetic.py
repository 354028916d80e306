"""A synthetic SEED-Bench-R1 (tiny mp4 clips, PNG observations, JSONL in the real layout) and a tiny model
on disk, so that the whole pipeline runs on a CPU with no download:

    python -m grpo_care.synthetic outputs/tiny      # data in outputs/tiny/data, model in outputs/tiny/model
    grpo-care train --config configs/tiny_cpu.yaml

The clips are written with PyAV (`pip install av`); their content is coloured noise with a moving square.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

ACTIONS = [
    "open fridge",
    "take knife",
    "wash tomato",
    "cut onion",
    "close tap",
    "put pan on stove",
    "pick up spoon",
    "turn off light",
    "stir soup",
    "open drawer",
]


def write_video(
    path: str | Path, num_frames: int = 12, height: int = 64, width: int = 96, fps: int = 4, seed: int = 0
) -> None:
    """An mp4 (MPEG-4 part 2, yuv420p) of `num_frames` frames at `fps`."""
    import av

    rng = np.random.default_rng(seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        base = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        for t in range(num_frames):
            frame = base.copy()
            x = (t * 7) % max(1, width - 16)
            frame[8:24, x : x + 16] = (255, 0, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_image(path: str | Path, height: int = 56, width: int = 84, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)).save(path)


def _record(i: int, rng: random.Random, with_video: bool, validation: bool) -> dict:
    goal = rng.choice(["make a salad", "cook pasta", "clean the kitchen"])
    answer, *negatives = rng.sample(ACTIONS, 5)
    record = {
        "sample_id": i,
        "question": "Considering the progress shown in the video and my current observation shown in the "
        f"image, what action should I take next in order to {goal}?",
        "answer": answer,
        "task_progress_metadata": [{"narration_text": "start", "start_frame": 0, "stop_frame": 10}]
        if with_video
        else [],
        "video_source": "EpicKitchens_flatten",
        "video_basename": f"clip_{i}.mp4",
        "current_observation_basename": f"obs_{i}.png",
    }
    if validation:
        options = negatives[:3] + [answer]
        rng.shuffle(options)
        record.update({f"choice_{c}": o for c, o in zip("abcd", options)})
        record["golden_choice_idx"] = "ABCD"[options.index(answer)]
    else:
        record["negative_answers"] = negatives
    return record


def write_seed_bench_r1(
    root: str | Path, n_train: int = 8, n_val: int = 4, seed: int = 0, num_frames: int = 12
) -> dict:
    """Write root/annotations/{training,validation_L1}.jsonl, root/videos/, root/images/; return the paths."""
    root = Path(root)
    rng = random.Random(seed)
    paths = {}
    for split, n, validation in (("training", n_train, False), ("validation_L1", n_val, True)):
        records = [
            _record(i, rng, with_video=(i % 4 != 3), validation=validation)
            for i in range(1000 * validation, 1000 * validation + n)
        ]
        for r in records:
            if r["task_progress_metadata"]:
                write_video(
                    root / "videos" / r["video_source"] / r["video_basename"],
                    num_frames=num_frames,
                    seed=r["sample_id"],
                )
            write_image(
                root / "images" / r["video_source"] / r["current_observation_basename"], seed=r["sample_id"]
            )
        path = root / "annotations" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths[split] = str(path)
    return paths


# Table 4's six benchmarks in Video-R1's evaluation layout: file name -> (folder, [(problem_type, extra fields)])
GENERAL_BENCHMARKS = {
    "vsibench": ("VSI-Bench", [("multiple choice", {}), ("regression", {}), ("regression", {})]),
    "videommmu": ("VideoMMMU", [("multiple choice", {}), ("numerical", {})]),
    "mmvu": ("MMVU", [("multiple choice", {}), ("multiple choice", {})]),
    "mvbench": ("MVBench", [("multiple choice", {}), ("multiple choice", {})]),
    "tempcompass": ("TempCompass", [("multiple choice", {"dim": "speed"}), ("multiple choice", {"dim": "order"})]),
    "videomme": ("VideoMME", [("multiple choice", {"duration": "short"}), ("multiple choice", {"duration": "long"})]),
}


def _general_record(name: str, folder: str, i: int, problem_type: str, extra: dict, rng: random.Random) -> dict:
    record = {
        "problem_id": i,
        "problem": f"{folder} question {i}: what happens to the red square in the video?",
        "data_type": "video",
        "problem_type": problem_type,
        "path": f"./Evaluation/{folder}/videos/{name}_{i}.mp4",
        "data_source": folder,
        **extra,
    }
    if problem_type == "multiple choice":
        record["options"] = [f"{letter}. {action}" for letter, action in zip("ABCD", rng.sample(ACTIONS, 4))]
        record["solution"] = f"<answer>{rng.choice('ABCD')}</answer>"
    elif problem_type == "numerical":
        record["options"] = []
        record["solution"] = f"<answer>{rng.randint(2, 9)}</answer>"
    else:  # regression: a measurement, graded by mean relative accuracy
        record["options"] = []
        record["solution"] = f"<answer>{rng.randint(10, 40) / 10}</answer>"
    return record


def write_video_r1_eval(
    root: str | Path, seed: int = 0, num_frames: int = 12, long_num_frames: int | None = None
) -> dict:
    """Write root/Evaluation/eval_<name>.json for Table 4's six benchmarks in Video-R1's evaluation layout
    (a JSON list of {problem_id, problem, data_type, problem_type, options, solution, path, ...}) and their
    clips under root/Evaluation/<Bench>/videos/; return {name: path}. `long_num_frames`: the first clip of
    every file gets that many frames (a clip long enough to be capped by the frame budget)."""
    root = Path(root)
    rng = random.Random(seed)
    paths = {}
    for name, (folder, items) in GENERAL_BENCHMARKS.items():
        records = [_general_record(name, folder, i, kind, extra, rng) for i, (kind, extra) in enumerate(items)]
        for i, record in enumerate(records):
            frames = long_num_frames if (i == 0 and long_num_frames) else num_frames
            write_video(root / record["path"][2:], num_frames=frames, seed=rng.randint(0, 10**6))
        path = root / "Evaluation" / f"eval_{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1))
        paths[name] = str(path)
    return paths


def write_tiny_model(out_dir: str | Path, qwen_vocab: bool = False) -> str:
    """A tiny Qwen2.5-VL and its processor, saved with save_pretrained (loadable by grpo-care train/eval).

    The small byte-level tokenizer (V = 512) by default; `qwen_vocab=True` uses the real Qwen2.5 tokenizer
    (V = 151,680).
    """
    from grpo_care.tiny import byte_tokenizer, qwen2_5_vl_processor, qwen_tokenizer, tiny_qwen2_5_vl

    out_dir = Path(out_dir)
    tokenizer = qwen_tokenizer() if qwen_vocab else byte_tokenizer()
    tiny_qwen2_5_vl(tokenizer).save_pretrained(out_dir)
    qwen2_5_vl_processor(tokenizer).save_pretrained(out_dir)
    return str(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m grpo_care.synthetic", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "out_dir", help="writes OUT/data (SEED-Bench-R1 layout) and OUT/model (tiny Qwen2.5-VL)"
    )
    parser.add_argument("--n_train", type=int, default=16)
    parser.add_argument("--n_val", type=int, default=8)
    parser.add_argument(
        "--qwen_vocab", action="store_true", help="the real Qwen2.5 tokenizer instead of bytes"
    )
    args = parser.parse_args(argv)
    paths = write_seed_bench_r1(Path(args.out_dir) / "data", args.n_train, args.n_val)
    model_dir = write_tiny_model(Path(args.out_dir) / "model", qwen_vocab=args.qwen_vocab)
    print(json.dumps({"model": model_dir, **paths}, indent=2))


if __name__ == "__main__":
    main()
