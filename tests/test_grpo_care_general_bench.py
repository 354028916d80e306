"""Table 4's evaluation on synthetic files in Video-R1's evaluation layout (VSI-Bench, VideoMMMU, MMVU, MVBench,
TempCompass, VideoMME): read, prompted, scored by problem type (accuracy and MRA apart), at 32 frames, with each
clip's real temporal spacing (or 1 s per patch) reaching the model."""

import json
from pathlib import Path

import pytest
import torch
from grpo_care.config import GRPOCareConfig
from grpo_care.evaluate import evaluate_files
from grpo_care.rewards import extract_answer

pytest.importorskip("av", reason="the synthetic clips are written with PyAV (pip install av)")
pytestmark = pytest.mark.usefixtures("one_thread")

LONG_FRAMES = 120  # at 4 fps: 30 s, i.e. 60 frames at 2 fps, capped at 32 (sampled at 32 / 30 fps)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from grpo_care.synthetic import write_tiny_model, write_video_r1_eval

    root = tmp_path_factory.mktemp("general")
    files = write_video_r1_eval(root / "src", num_frames=12, long_num_frames=LONG_FRAMES)
    return {"files": files, "model": write_tiny_model(root / "model")}


@pytest.fixture(scope="module")
def model(bench):
    from grpo_care.modeling import load_model

    model, processor, _ = load_model(_config(bench))
    return model.eval(), processor


def _config(bench, **overrides) -> GRPOCareConfig:
    values = dict(
        model_name_or_path=bench["model"],
        device="cpu",
        eval_max_new_tokens=4,
        eval_batch_size=2,
        eval_video_max_frames=32,
        video_min_pixels=3136,
        video_max_pixels=3136,
        image_max_pixels=3136,
    )
    values.update(overrides)
    return GRPOCareConfig(**values)


def _records(path):
    return json.loads(Path(path).read_text())


def _answer(record) -> str:
    """What the fake model answers: the gold letter on even problem ids, a wrong one on odd; the gold number
    for numerical items; 1.27 x the gold for regression (relative error 0.27: MRA 0.5)."""
    gold = extract_answer(record["solution"])
    kind, i = record["problem_type"], record["problem_id"]
    if kind == "multiple choice":
        answer = gold if i % 2 == 0 else ("A" if gold != "A" else "B")
    elif kind == "numerical":
        answer = gold
    else:
        answer = f"{float(gold) * 1.27:.4f}"
    return f"<think>looking</think><answer>{answer}</answer>"


def _fake_generation(monkeypatch, bench, tokenizer):
    """evaluate's generate_rollouts replaced by one that answers each prompt as _answer says."""
    import grpo_care.evaluate as ev
    from grpo_care.rollout import Rollout, completion_mask

    by_problem = {r["problem"]: _answer(r) for path in bench["files"].values() for r in _records(path)}
    seen = []

    def generate(model, prompts, generation_config, group_size, eos_token_id=None):
        texts = tokenizer.batch_decode(prompts["input_ids"], skip_special_tokens=True)
        seen.extend(texts)
        answers = [next(a for problem, a in by_problem.items() if problem in text) for text in texts]
        rows = [tokenizer.encode(a, add_special_tokens=False) + [tokenizer.eos_token_id] for a in answers]
        ids = torch.full((len(rows), max(map(len, rows))), generation_config.pad_token_id)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        mask = completion_mask(ids, tokenizer.eos_token_id)
        return Rollout(
            prompts["input_ids"], prompts["attention_mask"], ids, mask, {}, torch.ones(len(rows), dtype=bool)
        )

    monkeypatch.setattr(ev, "generate_rollouts", generate)
    return seen


def test_six_benchmarks_read_and_scored_by_problem_type(bench, model, tmp_path, monkeypatch):
    model, processor = model
    prompts = _fake_generation(monkeypatch, bench, processor.tokenizer)
    report = evaluate_files(model, processor, list(bench["files"].values()), _config(bench), output_dir=tmp_path)

    levels = report["per_level"]
    assert set(levels) == {f"eval_{name}" for name in bench["files"]}
    for name, path in bench["files"].items():
        records = _records(path)
        summary = levels[f"eval_{name}"]
        assert summary["num_samples"] == len(records)
        mc = [r for r in records if r["problem_type"] == "multiple choice"]
        numerical = [r for r in records if r["problem_type"] == "numerical"]
        regression = [r for r in records if r["problem_type"] == "regression"]
        right = sum(r["problem_id"] % 2 == 0 for r in mc) + len(numerical)
        assert summary["accuracy"] == pytest.approx(right / (len(mc) + len(numerical))), name
        if regression:
            assert summary["mra"] == pytest.approx(0.5), name
            assert summary["per_problem_type"]["regression"] == {
                "mean_score": pytest.approx(0.5),
                "num_samples": len(regression),
                "metric": "mra",
            }
        else:
            assert summary["mra"] is None, name
    # VSI-Bench: 1 multiple-choice item (right) and 2 regression items (MRA 0.5 each)
    vsi = levels["eval_vsibench"]
    assert (vsi["accuracy"], vsi["mra"], vsi["num_correct"]) == (1.0, pytest.approx(0.5), 1)
    assert vsi["mean_score"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert set(levels["eval_videommmu"]["per_problem_type"]) == {"multiple choice", "numerical"}
    assert report["protocol"]["video_max_frames"] == 32 and report["protocol"]["real_video_timing"] is True

    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    record = next(json.loads(line) for line in lines[1:] if json.loads(line)["problem_type"] == "regression")
    assert record["score"] == pytest.approx(0.5) and record["correct"] is False
    assert record["key"].startswith("eval_vsibench.json:record ")
    files = report["files"][bench["files"]["vsibench"]]
    assert files["mra"] == pytest.approx(0.5) and files["accuracy"] == 1.0
    # each file's own per_level carries the same scores as the report's level (mean_score, per problem type)
    for name, path in bench["files"].items():
        (file_level,) = report["files"][path]["per_level"].values()
        for key in ("accuracy", "mean_score", "per_problem_type", "num_samples"):
            assert file_level[key] == levels[f"eval_{name}"][key], (name, key)

    # the prompts are eval_bench.py's: options listed for multiple choice, the eval template, the type's suffix
    mc, regression = _records(bench["files"]["vsibench"])[:2]
    mc_prompt = next(p for p in prompts if mc["problem"] in p)
    assert mc["problem"] + "Options:\n" + "".join(f"{o}\n" for o in mc["options"]) in mc_prompt
    assert "between the <think> and </think> tags" in mc_prompt and "single option letter" in mc_prompt
    regression_prompt = next(p for p in prompts if regression["problem"] in p)
    assert "Options:" not in regression_prompt and "provide the numerical value" in regression_prompt


def _capture_generate(model, monkeypatch) -> list[dict]:
    calls = []
    generate = model.generate

    def capturing(*args, **kwargs):
        calls.append({k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)})
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", capturing)
    return calls


@pytest.mark.parametrize("real_timing", [True, False])
def test_each_clip_keeps_its_real_temporal_spacing_at_32_frames(bench, model, tmp_path, monkeypatch, real_timing):
    model, processor = model
    calls = _capture_generate(model, monkeypatch)
    config = _config(bench, eval_real_video_timing=real_timing)
    report = evaluate_files(model, processor, [bench["files"]["vsibench"]], config, output_dir=tmp_path)
    assert report["num_samples"] == 3 and report["protocol"]["real_video_timing"] is real_timing

    grids = torch.cat([c["video_grid_thw"] for c in calls])
    # the long clip: 32 frames (16 temporal patches of 2); the short ones: 12 frames at 4 fps = 3 s -> 6 frames
    assert grids[:, 0].tolist() == [16, 3, 3]
    if real_timing:
        seconds = torch.cat([c["second_per_grid_ts"] for c in calls]).tolist()
        # 32 frames over 30 s: sampled at 32 / 30 fps, 2 frames per patch -> 1.875 s; 3 s clips at 2 fps -> 1 s
        assert seconds == pytest.approx([2 / (32 / LONG_FRAMES * 4), 1.0, 1.0])
    else:  # every clip 1 s per temporal patch, as in training: nothing passed, M-RoPE's default
        assert all("second_per_grid_ts" not in c for c in calls)


def test_per_sample_files_from_before_the_timing_option_resume_as_fixed_timing(bench, model, tmp_path, monkeypatch):
    model, processor = model
    _fake_generation(monkeypatch, bench, processor.tokenizer)
    files = [bench["files"]["mmvu"]]
    evaluate_files(model, processor, files, _config(bench, eval_real_video_timing=False), output_dir=tmp_path)
    samples = tmp_path / "samples.jsonl"
    lines = samples.read_text().splitlines()
    meta = json.loads(lines[0])
    del meta["meta"]["real_video_timing"]  # as written before the option existed (every clip at 1 s per patch)
    del meta["meta"]["prompt_style"]  # likewise: the paper's prompts
    samples.write_text("\n".join([json.dumps(meta), *lines[1:]]) + "\n")
    again = evaluate_files(model, processor, files, _config(bench, eval_real_video_timing=False), output_dir=tmp_path)
    assert sum(f["num_resumed"] for f in again["files"].values()) == 2
    with pytest.raises(ValueError, match="real_video_timing"):
        evaluate_files(model, processor, files, _config(bench), output_dir=tmp_path)
    with pytest.raises(ValueError, match="prompt_style"):  # answers to other prompts are not resumed
        evaluate_files(model, processor, files, _config(bench, eval_real_video_timing=False, prompt_style="short"),
                       output_dir=tmp_path)
