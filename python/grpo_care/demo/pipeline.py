"""`grpo-care demo`: data, warm start, GRPO and GRPO-CARE through the real trainer, evaluation, table and plot.

    summary = run_demo(Path("outputs/demo"), FULL, seed=0)

Both RL runs start from the same warm-start weights (deep copies), with the same seed, data order, rollout
budget and learning rate; they differ only where the paper's two methods differ: GRPO keeps a frozen
reference with a KL penalty (beta = 0.04, TRL's default), GRPO-CARE drops the KL (beta = 0) and adds the
consistency bonus with its EMA reference. The code judge is registered as a third reward function with
weight 0, so the trainer logs the consistency of its own rollouts at every step without it touching a reward.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from grpo_care.demo.evaluation import score_model
from grpo_care.demo.report import noise_note, plot_curves, results_table, write_report
from grpo_care.demo.synthetic_data import CotFlaws, DatasetSizes, write_dataset
from grpo_care.demo.tiny_model import TinyModelSpec, build_model_and_processor
from grpo_care.demo.warm_start import WarmStartSpec, warm_start

FRAME = 112  # pixels per side of every frame and image: one visual token per grid cell
CONSISTENCY_REWARD = "grpo_care.demo.consistency.consistency_reward"


@dataclass(frozen=True)
class DemoPlan:
    """Everything that sets the demo's size; FULL and QUICK below."""

    name: str
    data: DatasetSizes
    flaws: CotFlaws
    model: TinyModelSpec
    warm: WarmStartSpec
    rl_steps: int
    prompts_per_step: int
    num_generations: int
    max_completion_length: int
    learning_rate: float
    grpo_beta: float = 0.04


FULL = DemoPlan(
    name="full",
    data=DatasetSizes(train=128, sft=768, eval_per_level=32),
    flaws=CotFlaws(reasoning_flaw_rate=0.25, answer_flaw_rate=0.10),
    model=TinyModelSpec(),
    warm=WarmStartSpec(perception_steps=150, cot_steps=300, learning_rate=3e-3),
    rl_steps=24,
    prompts_per_step=2,
    num_generations=8,
    max_completion_length=48,
    learning_rate=2e-4,
)
QUICK = replace(
    FULL,
    name="quick",
    data=DatasetSizes(train=8, sft=8, eval_per_level=4),
    warm=replace(FULL.warm, perception_steps=2, perception_batch_size=4, cot_steps=2, cot_batch_size=4),
    rl_steps=2,
    num_generations=4,
    max_completion_length=24,
)


def rl_config(plan: DemoPlan, files, out_dir: Path, seed: int, care: bool):
    """The trainer's config for one RL run; identical for both runs except the method switches."""
    from grpo_care.config import GRPOCareConfig

    return GRPOCareConfig(
        model_name_or_path="",
        device="cpu",
        gradient_checkpointing=False,
        train_file=str(files.train),
        data_root=str(files.root),
        num_generations=plan.num_generations,
        per_device_train_batch_size=plan.prompts_per_step,
        gradient_accumulation_steps=1,
        max_completion_length=plan.max_completion_length,
        temperature=1.0,
        top_p=0.95,
        top_k=50,
        learning_rate=plan.learning_rate,
        max_steps=plan.rl_steps,
        seed=seed,
        use_care=care,
        beta=0.0 if care else plan.grpo_beta,
        reward_funcs=["accuracy", "format", CONSISTENCY_REWARD],
        reward_weights=[1.0, 1.0, 0.0],
        video_fps=2.0,
        video_min_frames=4,
        video_max_frames=4,
        video_min_pixels=FRAME * FRAME,
        video_max_pixels=FRAME * FRAME,
        image_min_pixels=FRAME * FRAME,
        image_max_pixels=FRAME * FRAME,
        eval_max_new_tokens=plan.max_completion_length,
        eval_batch_size=16,
        eval_video_max_frames=4,
        output_dir=str(out_dir),
        overwrite_output_dir=True,  # a rerun of the demo starts over
        report_to=[],
        log_completions_steps=1,
        num_completions_to_print=0,
        save_steps=0,
        disable_tqdm=True,
    )


def read_curves(metrics_file) -> list[dict]:
    """Per-step reward (accuracy + format, the base reward both runs share), accuracy and consistency."""
    rows = []
    with open(metrics_file, encoding="utf-8") as f:
        for line in f:
            m = json.loads(line)
            acc, fmt = m.get("rewards/accuracy/mean"), m.get("rewards/format/mean")
            rows.append({"step": m["step"], "reward": None if acc is None or fmt is None else acc + fmt,
                         "accuracy": acc, "consistency": m.get("rewards/consistency_reward/mean"),
                         "total_reward": m.get("reward"), "bonus": m.get("rewards/bonus_rewards")})
    return rows


def bonus_by_consistency(completions_file) -> dict:
    """Among the CARE run's correct rollouts: how often the bonus went to consistent vs inconsistent ones, and
    the reference likelihood p of their answers. The bonus can only teach consistency if it prefers the
    consistent ones, which it does only as far as the reference's answer depends on the reasoning."""
    out = {}
    rows = [json.loads(line) for line in Path(completions_file).read_text().splitlines() if line.strip()]
    for name, wanted in (("consistent", 1.0), ("inconsistent", 0.0)):
        sel = [r for r in rows if r.get("accuracy") == 1.0 and r.get("consistency_reward") == wanted]
        likelihoods = [r["ref_likelihood"] for r in sel if r.get("ref_likelihood") is not None]
        out[name] = {"rollouts": len(sel),
                     "bonus_rate": round(sum(r.get("bonus", 0) > 0 for r in sel) / len(sel), 3) if sel else None,
                     "mean_ref_likelihood": round(sum(likelihoods) / len(likelihoods), 3) if likelihoods else None}
    return out


class Stopwatch:
    """Wall seconds per stage, and the process's CPU seconds (all threads): on a shared machine the wall
    clock also counts other people's work, the CPU clock does not."""

    def __init__(self, log):
        self.start, self.cpu_start, self.log, self.stages = time.perf_counter(), time.process_time(), log, {}
        self._since = (self.start, self.cpu_start)

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.stages[name] = {"wall_s": round(wall - self._since[0], 1), "cpu_s": round(cpu - self._since[1], 1)}
        self.log(f"[{wall - self.start:6.0f}s] {name} done in {wall - self._since[0]:.0f}s "
                 f"({cpu - self._since[1]:.0f} CPU-s)")
        self._since = (wall, cpu)

    def totals(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.start, 1),
                "cpu_s": round(time.process_time() - self.cpu_start, 1)}


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, {torch.get_num_threads()} torch threads"


def drop_trainer_state(output_dir: Path) -> None:
    """Keep each run's final policy (usable by `grpo-care eval`), drop the optimizer/EMA state (~170 MB)."""
    for state in Path(output_dir).glob("checkpoint-*/trainer_state.pt"):
        state.unlink()


def run_demo(out_dir: Path, plan: DemoPlan = FULL, seed: int = 0, log=print) -> dict:
    """Run everything into `out_dir`; returns {"table", "meta", "paths"}."""
    from grpo_care.trainer import train

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = Stopwatch(log)
    torch.manual_seed(seed)

    log(f"grpo-care demo ({plan.name}): writing the synthetic SEED-Bench-R1-like data set ...")
    files = write_dataset(out_dir / "data", plan.data, seed=seed, flaws=plan.flaws)
    clock.lap("data")

    model, processor = build_model_and_processor(plan.model, seed=seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny Qwen2.5-VL: {n_params / 1e6:.1f} M parameters, Qwen2.5 tokenizer ({len(processor.tokenizer)} tokens)")
    base = rl_config(plan, files, out_dir / "grpo", seed, care=False)
    log(f"warm start: {plan.warm.perception_steps} perception steps, then {plan.warm.cot_steps} steps on "
        "imperfect chains of thought ...")
    history = warm_start(model, processor, files.sft, base, plan.warm, log=log)
    (out_dir / "warm_start_history.json").write_text(json.dumps(history))
    clock.lap("warm start")

    scores = {}
    scores["warm start"] = score_model(model, processor, files, base)
    clock.lap("evaluate warm start")

    curves, diagnostic = {}, {}
    for name, care, sub in (("GRPO", False, "grpo"), ("GRPO-CARE", True, "grpo_care")):
        config = rl_config(plan, files, out_dir / sub, seed, care=care)
        log(f"{name}: {plan.rl_steps} steps x {plan.prompts_per_step} prompts x {plan.num_generations} rollouts "
            f"(beta {config.beta}, use_care {care}) through grpo_care.trainer.train ...")
        policy = copy.deepcopy(model)
        summary = train(config, model=policy, processor=processor)
        curves[name] = read_curves(summary["metrics_file"])
        if care:
            diagnostic = bonus_by_consistency(summary["completions_file"])
            log(f"  CARE bonus among correct rollouts: consistent {diagnostic['consistent']}, "
                f"inconsistent {diagnostic['inconsistent']}")
        drop_trainer_state(config.output_dir)
        clock.lap(name)
        scores[name] = score_model(policy.eval(), processor, files, config)
        clock.lap(f"evaluate {name}")
        del policy

    table = results_table(scores)
    meta = {
        "seed": seed,
        "plan": plan.name,
        "seconds": clock.totals(),
        "seconds_per_stage": clock.stages,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "machine": machine_description(),
        "torch": torch.__version__,
        "parameters": n_params,
        "plan_detail": asdict(plan),
        "consistency_per_level": {k: v["consistency_per_level"] for k, v in scores.items()},
        "noise": noise_note(table, plan.data.eval_per_level),
        "care_bonus_among_correct_rollouts": diagnostic,
    }
    json_path, md_path = write_report(out_dir, table, meta)
    for name, s in scores.items():
        path = out_dir / "eval" / f"{name.lower().replace(' ', '_').replace('-', '_')}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in s["records"]))
    (out_dir / "curves.json").write_text(json.dumps(curves, indent=1))
    png_path = plot_curves(out_dir / "curves.png", curves)  # last; None (warned) when it cannot be drawn
    return {"table": table, "meta": meta,
            "paths": {"json": str(json_path), "markdown": str(md_path), "plot": str(png_path) if png_path else None}}
