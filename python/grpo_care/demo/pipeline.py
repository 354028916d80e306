"""`grpo-care demo`: data, warm start, the plan's RL arms through the real trainer, evaluation, table and plot.

    result = run_demo(Path("outputs/demo"), FULL, seed=0)
    result = run_demo(Path("outputs/study/seed_3"), FULL, seed=3, resume=True)   # skips what is finished

The arms (`DemoPlan.arms`: all three in a study) start from the same warm-start weights (deep copies), with
the same seed, data order, rollout budget and learning rate, and differ only where the paper's Table 3 rows
differ (ARMS): GRPO keeps a frozen reference with a KL penalty (beta 0.04, TRL's default); no-KL drops the KL
(beta 0) and adds nothing; GRPO-CARE drops the KL and adds the consistency bonus with its EMA reference. The
code judge is registered as a reward function with weight 0, so the trainer logs the consistency of its own
rollouts at every step without it touching a reward.

Resuming (`resume=True`, what `--study` does): the seed's directory keeps `plan.json` (the plan and seed it was
made with; another plan there is refused, not overwritten), the warm start's weights and scores, and one
`result.json` per finished arm; a finished piece is loaded instead of rerun.
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
from grpo_care.demo.reference_probe import reference_probe
from grpo_care.demo.report import noise_note, plot_curves, results_table, write_report
from grpo_care.demo.synthetic_data import DatasetSizes, Teacher, World, write_dataset
from grpo_care.demo.tiny_model import TinyModelSpec, build_model_and_processor
from grpo_care.demo.warm_start import WarmStartSpec, warm_start

FRAME = 112  # pixels per side of every frame and image: one visual token per grid cell
CONSISTENCY_REWARD = "grpo_care.demo.consistency.consistency_reward"


class PlanMismatch(ValueError):
    """An output directory holds a run made with other settings (resuming it would mix two plans)."""


@dataclass(frozen=True)
class Arm:
    """One RL run from the warm start: its row name, output subdirectory and method switches."""

    name: str
    key: str
    beta: float
    care: bool


ARMS = {
    "grpo": Arm("GRPO", "grpo", beta=0.04, care=False),  # frozen reference (the warm start) for the KL
    "no_kl": Arm("no-KL", "no_kl", beta=0.0, care=False),  # no reference at all
    "grpo_care": Arm("GRPO-CARE", "grpo_care", beta=0.0, care=True),  # EMA reference for the bonus only
}


@dataclass(frozen=True)
class DemoPlan:
    """Everything that sets the demo's task and size; FULL and QUICK below."""

    name: str
    data: DatasetSizes
    teacher: Teacher
    world: World
    model: TinyModelSpec
    warm: WarmStartSpec
    rl_steps: int
    prompts_per_step: int
    num_generations: int
    max_completion_length: int
    learning_rate: float
    grpo_beta: float = 0.04
    ref_ema_decay: float = 0.995
    ref_ema_update_every: int = 10
    arms: tuple = ("grpo", "no_kl", "grpo_care")
    perception_target: float = 0.85  # share of L1 questions whose premises the warm start states as taught
    eval_batch_size: int = 32
    prompt_style: str = "paper"  # the prompts' instructions, warm start and RL alike (GRPOCareConfig.prompt_style)


DESIGN_1 = DemoPlan(  # study 1's plan (its results: demo README, "Study 1")
    name="full",
    data=DatasetSizes(train=128, sft=768, eval_per_level=64),
    teacher=Teacher(sees_reversing_rate=0.25, unfaithful_rate=0.1),
    world=World(reversing_rate=0.5),
    model=TinyModelSpec(),
    warm=WarmStartSpec(perception_steps=150, cot_steps=400, learning_rate=3e-3),
    rl_steps=100,
    prompts_per_step=2,
    num_generations=8,
    max_completion_length=48,
    learning_rate=5e-4,
)
# Development run 25 of the demo README: design 2 without answer drills, whose warm start answered from the
# premises it wrote on development seed 100 but not on 101 or 102.
DESIGN_2_WITHOUT_DRILLS = replace(
    DESIGN_1,
    name="design_2_without_drills",
    teacher=Teacher(sees_reversing_rate=0.25, misread_rate=0.3, unfaithful_rate=0.05, states_next_move=False,
                    cell_first=True),
    world=World(reversing_rate=0.5, sft_signal="random", front_cue="lines"),
    warm=replace(DESIGN_1.warm, cot_steps=800),
)
# Study 2's plan (demo README, "Design 2" and its protocol): 800 steps of answer drills on black clips first.
DESIGN_2 = replace(DESIGN_2_WITHOUT_DRILLS, name="design_2",
                   warm=replace(DESIGN_2_WITHOUT_DRILLS.warm, drill_steps=800, drills_first=True))
# Study 3's plan (demo README, "Design 3" and its protocol): design 2 whose teacher slips to the letter of the move
# the rim shows (random in the warm start's clips) on 15% of its targets, a habit the reasoning never states; the
# arms train twice as long.
DESIGN_3 = replace(DESIGN_2, name="design_3", teacher=replace(DESIGN_2.teacher, unfaithful_rate=0.15, slip_to="signal"),
                   rl_steps=200)
# Study 4's plan (demo README, "Design 4" and its protocol): design 3 asked in one sentence instead of the paper's
# paragraph of instructions (development run 47), prompts of 133-162 tokens instead of 243-272: the time budget.
DESIGN_4 = replace(DESIGN_3, name="design_4", prompt_style="short")
FULL = DESIGN_4
DESIGNS = {1: DESIGN_1, 2: DESIGN_2, 3: DESIGN_3, 4: DESIGN_4}  # `grpo-care demo --design N`
QUICK = replace(
    FULL,
    name="quick",
    data=DatasetSizes(train=8, sft=8, eval_per_level=4),
    warm=replace(FULL.warm, perception_steps=2, perception_batch_size=4, cot_steps=2, cot_batch_size=4,
                 drill_steps=2),
    rl_steps=2,
    num_generations=4,
    max_completion_length=24,
)


def rl_config(plan: DemoPlan, files, out_dir: Path, seed: int, arm: Arm):
    """The trainer's config for one RL arm; identical for every arm except the method switches."""
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
        prompt_style=plan.prompt_style,
        use_care=arm.care,
        beta=arm.beta,
        # only CARE's reference follows the policy: the trainer applies any decay it is given, so one set here
        # would turn GRPO's frozen KL reference into Table 3's KL-EMA
        ref_ema_decay=plan.ref_ema_decay if arm.care else None,
        ref_ema_update_every=plan.ref_ema_update_every,
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
        eval_batch_size=plan.eval_batch_size,
        eval_video_max_frames=4,
        output_dir=str(out_dir),
        overwrite_output_dir=True,  # an arm that is run again starts over
        report_to=[],
        log_completions_steps=1,
        num_completions_to_print=0,
        save_steps=0,
        disable_tqdm=True,
    )


def read_curves(metrics_file) -> list[dict]:
    """Per-step reward (accuracy + format, the base reward every arm shares), accuracy and consistency."""
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
    consistent ones, which it does only as far as the reference's answer depends on the reasoning.

    `groups_with_both`: the same rates within the groups (one prompt at one step) whose correct rollouts
    include consistent and inconsistent ones, the only groups where the rule (grpo_care.md 5.3: a correct
    rollout's p against the mean p of its group's correct ones) can choose between them. In a group whose correct
    rollouts are all inconsistent, those at or above their own mean get the bonus whatever the reference says."""
    rows = [json.loads(line) for line in Path(completions_file).read_text().splitlines() if line.strip()]
    correct = [r for r in rows if r.get("accuracy") == 1.0]
    kinds = {"consistent": 1.0, "inconsistent": 0.0}
    out = {name: _bonus_rates([r for r in correct if r.get("consistency_reward") == wanted], with_likelihood=True)
           for name, wanted in kinds.items()}
    groups: dict = {}
    for r in correct:
        groups.setdefault((r.get("step"), r.get("sample_id")), []).append(r)
    mixed = [g for g in groups.values() if {r.get("consistency_reward") for r in g} >= set(kinds.values())]
    out["groups_with_both"] = {"groups": len(mixed), **{
        name: _bonus_rates([r for g in mixed for r in g if r.get("consistency_reward") == wanted])
        for name, wanted in kinds.items()}}
    return out


def _bonus_rates(rollouts: list[dict], with_likelihood: bool = False) -> dict:
    out = {"rollouts": len(rollouts),
           "bonus_rate": round(sum(r.get("bonus", 0) > 0 for r in rollouts) / len(rollouts), 3) if rollouts else None}
    if with_likelihood:
        likelihoods = [r["ref_likelihood"] for r in rollouts if r.get("ref_likelihood") is not None]
        out["mean_ref_likelihood"] = round(sum(likelihoods) / len(likelihoods), 3) if likelihoods else None
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

    def loaded(self, saved: dict) -> None:
        """Stages a resumed run loads instead of running: their seconds as saved when they ran (`saved`: stage ->
        {wall_s, cpu_s}; empty for pieces saved before their timings were), marked `loaded`."""
        for name, seconds in saved.items():
            self.stages[name] = {**seconds, "loaded": True}
        self._since = (time.perf_counter(), time.process_time())

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


def code_description() -> dict:
    """What computed the run: care_kernels' version, the CPU log-prob kernel (the C++ one and its SIMD build, or
    the torch fallback) and the git commit of the checkout the package was imported from (None when it is not
    one, e.g. an installed wheel)."""
    import subprocess

    import care_kernels
    from care_kernels import cpu_backend

    package_dir = Path(care_kernels.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(package_dir), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    kernel = f"cpp ({cpu_backend.isa()} epilogues)" if cpu_backend.available() else "torch (no C++ extension)"
    return {"care_kernels": care_kernels.__version__, "cpu_kernel": kernel, "commit": commit}


def speed_probe(m: int = 2048, k: int = 896, n: int = 16384, repeats: int = 3) -> dict:
    """The machine's fp32 GEMM speed, so demo timings from different machines can be compared: the best of
    `repeats` timings of one [m, k] @ [k, n] matmul (about 0.2-0.5 s each on 2 cores), in TFLOP/s."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator)
    b = torch.randn(k, n, generator=generator)
    torch.mm(a, b[:, :256])  # warm up the BLAS threads
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return {"gemm": f"fp32 {m} x {k} x {n}", "seconds": round(best, 4), "tflops": round(2 * m * k * n / best / 1e12, 4),
            "threads": torch.get_num_threads()}


def drop_trainer_state(output_dir: Path) -> None:
    """Keep each run's final policy (usable by `grpo-care eval`), drop the optimizer/EMA state."""
    for state in Path(output_dir).glob("checkpoint-*/trainer_state.pt"):
        state.unlink()


def plan_record(plan: DemoPlan, seed: int) -> dict:
    return {"seed": seed, "plan": json.loads(json.dumps(asdict(plan)))}


_PLAN_DEFAULTS_BEFORE = {"prompt_style": "paper"}


def _check_plan(out_dir: Path, plan: DemoPlan, seed: int, resume: bool) -> None:
    """Write plan.json, or, when resuming, refuse a directory made with another plan or seed."""
    path, record = out_dir / "plan.json", plan_record(plan, seed)
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        # a setting added to DemoPlan since the file was written ran at its default then
        saved["plan"] = {**_PLAN_DEFAULTS_BEFORE, **saved["plan"]}
        if saved != record:
            changed = sorted(k for k in set(saved["plan"]) | set(record["plan"])
                             if saved["plan"].get(k) != record["plan"].get(k))
            if saved["seed"] != seed:
                changed.append("seed")
            raise PlanMismatch(f"{out_dir} holds a demo run with other settings ({', '.join(changed)}): resume it "
                             "with the same settings, or pass another --output_dir")
        return
    path.write_text(json.dumps(record, indent=1))


def _scores_without_records(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if k != "records"}


def _write_eval_records(out_dir: Path, name: str, scores: dict) -> None:
    path = out_dir / "eval" / f"{name.lower().replace(' ', '_').replace('-', '_')}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in scores["records"]))


def _warm_start(out_dir, plan, seed, files, model, processor, clock, log, resume) -> dict:
    """Warm-start `model` in place (or load the saved warm start); returns its scores and history summary."""
    saved_dir = out_dir / "warm_start"
    weights, result_file = saved_dir / "model.pt", saved_dir / "result.json"
    if resume and weights.is_file() and result_file.is_file():
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        log(f"warm start: loaded from {saved_dir}")
        result = json.loads(result_file.read_text())
        clock.loaded(result.get("seconds_per_stage") or {"warm start": {}})
        return result
    base = rl_config(plan, files, out_dir / "grpo", seed, ARMS["grpo"])
    w = plan.warm
    stages = [f"{w.perception_steps} perception steps"]
    if w.drill_steps:
        stages.insert(0 if w.drills_first else 1, f"{w.drill_steps} answer-drill steps")
    log(f"warm start: {', '.join(stages)}, then {w.cot_steps} steps on the teacher's chains of thought"
        + (f" ({100 * w.drill_share:.0f}% of them answer drills)" if w.drill_share else "") + " ...")
    history = warm_start(model, processor, files.sft, base, replace(plan.warm, seed=seed), log=log)
    clock.lap("warm start")
    scores = score_model(model, processor, files, base)
    clock.lap("evaluate warm start")
    _write_eval_records(out_dir, "warm start", scores)
    probe = reference_probe(model, processor, files.train, base, plan.teacher, seed)
    log(f"  the warm start as GRPO-CARE's first reference: right letter after the true premises "
        f"{probe['right_letter_after_true_premises']}, after the teacher's (contradicting) premises "
        f"{probe['right_letter_after_teacher_premises']}; their letter after random premises "
        f"{probe['their_letter_after_random_premises']} ({probe['n_prompts']} / {probe['n_random']} prompts)")
    clock.lap("reference probe")
    perception = scores["perception_L1"]
    result = {"scores": _scores_without_records(scores), "history": history,
              "final_loss": {stage: next(h["loss"] for h in reversed(history) if h["stage"] == stage)
                             for stage in {h["stage"] for h in history}},
              "perception_L1": perception, "reference_probe": probe,
              "reached_perception_target": perception is not None and perception >= plan.perception_target,
              "seconds_per_stage": {k: clock.stages[k]
                                    for k in ("warm start", "evaluate warm start", "reference probe")}}
    saved_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    result_file.write_text(json.dumps(result, indent=1))
    return result


def _run_arm(out_dir, plan, seed, files, model, processor, arm: Arm, clock, log, resume) -> dict:
    """One RL arm from (a deep copy of) the warm start, then its evaluation; saved as <arm>/result.json."""
    from grpo_care.trainer import train

    result_file = out_dir / arm.key / "result.json"
    if resume and result_file.is_file():
        log(f"{arm.name}: loaded from {result_file}")
        result = json.loads(result_file.read_text())
        seconds = result.get("seconds", {})  # wall seconds of its RL run and evaluation
        clock.loaded({arm.name: {"wall_s": seconds["rl"]} if "rl" in seconds else {},
                      f"evaluate {arm.name}": {"wall_s": seconds["evaluate"]} if "evaluate" in seconds else {}})
        return result
    config = rl_config(plan, files, out_dir / arm.key, seed, arm)
    log(f"{arm.name}: {plan.rl_steps} steps x {plan.prompts_per_step} prompts x {plan.num_generations} rollouts "
        f"(beta {arm.beta}, use_care {arm.care}) through grpo_care.trainer.train ...")
    policy = copy.deepcopy(model)
    started = time.perf_counter()
    summary = train(config, model=policy, processor=processor)
    rl_seconds = time.perf_counter() - started
    result = {"arm": asdict(arm), "curves": read_curves(summary["metrics_file"])}
    if arm.care:
        result["care_bonus_among_correct_rollouts"] = bonus_by_consistency(summary["completions_file"])
        log(f"  CARE bonus among correct rollouts: {result['care_bonus_among_correct_rollouts']}")
    drop_trainer_state(config.output_dir)
    clock.lap(arm.name)
    started = time.perf_counter()
    scores = score_model(policy.eval(), processor, files, config)
    clock.lap(f"evaluate {arm.name}")
    _write_eval_records(out_dir, arm.name, scores)
    result.update(scores=_scores_without_records(scores),
                  seconds={"rl": round(rl_seconds, 1), "evaluate": round(time.perf_counter() - started, 1)})
    result_file.write_text(json.dumps(result, indent=1))
    return result


def run_demo(out_dir: Path, plan: DemoPlan = FULL, seed: int = 0, log=print, resume: bool = False,
             warm_start_only: bool = False) -> dict:
    """Run everything into `out_dir`; returns {"table", "meta", "paths"}. See the module docstring for
    `resume`; `warm_start_only` stops after the warm start's evaluation (the table has its row only)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_plan(out_dir, plan, seed, resume)
    clock = Stopwatch(log)
    probe = speed_probe()
    log(f"speed probe: {probe['gemm']} in {probe['seconds']:.3f} s = {probe['tflops']:.3f} TFLOP/s")
    torch.manual_seed(seed)

    info = out_dir / "data" / "dataset_info.json"
    if resume and info.is_file():
        from grpo_care.demo.synthetic_data import dataset_files

        files = dataset_files(out_dir / "data")
    else:
        log(f"grpo-care demo ({plan.name}, seed {seed}): writing the synthetic SEED-Bench-R1-like data set ...")
        files = write_dataset(out_dir / "data", plan.data, seed=seed, teacher=plan.teacher, world=plan.world)
    clock.lap("data")

    model, processor = build_model_and_processor(plan.model, seed=seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny Qwen2.5-VL: {n_params / 1e6:.2f} M parameters, Qwen2.5 tokens ({len(processor.tokenizer)} of them)")
    warm = _warm_start(out_dir, plan, seed, files, model, processor, clock, log, resume)
    log(f"  perception (premises as taught) on L1: {warm['perception_L1']:.3f} (target {plan.perception_target}: "
        f"{'reached' if warm['reached_perception_target'] else 'NOT reached'})")

    scores, arms = {"warm start": warm["scores"]}, {}
    for key in () if warm_start_only else plan.arms:
        arm = ARMS[key]
        arms[key] = _run_arm(out_dir, plan, seed, files, model, processor, arm, clock, log, resume)
        scores[arm.name] = arms[key]["scores"]

    table = results_table(scores)
    meta = {
        "seed": seed,
        "plan": plan.name,
        "seconds": clock.totals(),
        "seconds_per_stage": clock.stages,
        "speed_probe": probe,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "machine": machine_description(),
        "code": code_description(),
        "torch": torch.__version__,
        "parameters": n_params,
        "plan_detail": asdict(plan),
        "warm_start": {k: warm.get(k) for k in ("final_loss", "perception_L1", "reached_perception_target",
                                                 "reference_probe")},
        "breakdown": {name: {k: s[k] for k in ("consistency_per_level", "accuracy_by_clip", "consistency_by_clip",
                                                "accuracy_by_motion", "consistency_by_motion", "premises_as_taught")
                             if k in s}
                      for name, s in scores.items()},
        "noise": noise_note(table, plan.data.eval_per_level),
        "care_bonus_among_correct_rollouts": arms.get("grpo_care", {}).get("care_bonus_among_correct_rollouts"),
    }
    curves = {ARMS[key].name: result["curves"] for key, result in arms.items()}
    json_path, md_path = write_report(out_dir, table, meta)
    paths = {"json": str(json_path), "markdown": str(md_path), "plot": None}
    if curves:
        (out_dir / "curves.json").write_text(json.dumps(curves, indent=1))
        png_path = plot_curves(out_dir / "curves.png", curves)  # last; None (warned) when it cannot be drawn
        paths["plot"] = str(png_path) if png_path is not None else None
    return {"table": table, "meta": meta, "paths": paths, "curves": curves}
