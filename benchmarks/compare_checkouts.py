"""Before/after timing of two checkouts of this project, measured side by side in one run.

    python benchmarks/compare_checkouts.py --before /tmp/old --after . [--cases head fused trainer_head] [--rounds 3]

Each checkout is a package root with `care_kernels` built in place (`python setup.py build_ext --inplace`) and
`python/grpo_care`. Every timing runs in a fresh process that imports only that checkout (PYTHONPATH), and the two
checkouts alternate (before, after; then after, before; ...) so a drift of the machine's speed hits both alike.
Prints one line per process, then per case the medians and after/before; `--json PATH` also writes them.

Cases (the CPU goal shape, fp32, the native kernel):
  head          dual_linear_logprobs(impl="cpp") + backward of sum(logp * adv), N=2048, H=896, V=151936
  fused         FusedLinearGRPOLoss(beta=0.04, use_ref_model=True) forward + backward, the same shape
  trainer_head  the seconds per RL step that grpo_care's trainer spends in its LM head (scoring + the fused loss
                head), on the demo's GRPO-CARE arm with the full Qwen vocabulary (V=151,680, H=64), 6 steps
A head/fused process times one warm-up call, then the best of two; trainer_head reports every step after the
first. `--small` shrinks every case (a check that the script runs, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ("head", "fused", "trainer_head")


def _logprob_case(case: str, small: bool) -> list[float]:
    import torch

    import care_kernels as ck

    n, h, v = (64, 32, 1000) if small else (2048, 896, 151936)
    torch.manual_seed(0)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.03).requires_grad_()
    ref_hidden, ref_weight = torch.randn(n, h), torch.randn(v, h) * 0.03
    targets = torch.randint(0, v, (n,))
    advantages = torch.randn(n)
    rows, cols = 16, n // 16

    def head():
        logp, _ = ck.dual_linear_logprobs(hidden, weight, ref_hidden, ref_weight, targets, impl="cpp")
        (logp * advantages).sum().backward()

    def fused():
        loss_fn = ck.FusedLinearGRPOLoss(beta=0.04, loss_type="grpo", use_ref_model=True)
        loss, _ = loss_fn(hidden.view(rows, cols, h), weight, targets.view(rows, cols), torch.ones(rows, cols),
                          advantages[:rows], ref_input=ref_hidden.view(rows, cols, h), ref_weight=ref_weight)
        loss.backward()

    run = head if case == "head" else fused
    seconds = []
    for _ in range(3):  # the first call warms up the BLAS threads and the allocator: not kept
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return [min(seconds[1:])]


def _trainer_head_case(small: bool) -> list[float]:
    """Per-step seconds in the trainer's head functions, whichever names this checkout's trainer has."""
    import inspect
    import tempfile
    from dataclasses import fields, replace

    import torch

    import care_kernels as ck
    import grpo_care.trainer as trainer_module
    from grpo_care.demo import pipeline, tiny_model
    from grpo_care.demo.synthetic_data import DatasetSizes, write_dataset

    spent = []

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - start)
        return wrapper

    scorers = [name for name in ("_score", "_score_reference") if hasattr(trainer_module.Trainer, name)]
    for name in scorers:
        setattr(trainer_module.Trainer, name, timed(getattr(trainer_module.Trainer, name)))
    ck.FusedLinearGRPOLoss.forward = timed(ck.FusedLinearGRPOLoss.forward)

    steps = 2 if small else 6
    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp(prefix="compare_checkouts_"))
    spec_fields = {f.name for f in fields(tiny_model.TinyModelSpec)}
    spec = tiny_model.TinyModelSpec(vocabulary="qwen") if "vocabulary" in spec_fields else tiny_model.TinyModelSpec()
    plan = replace(pipeline.FULL, data=DatasetSizes(train=16, sft=8, eval_per_level=4), rl_steps=steps, model=spec,
                   max_completion_length=8 if small else 48, learning_rate=5e-4, num_generations=8,
                   prompts_per_step=2)
    if hasattr(plan, "teacher"):
        files = write_dataset(out / "data", plan.data, seed=0, teacher=plan.teacher, world=plan.world)
    else:  # checkouts before the demo's reversing-car task
        files = write_dataset(out / "data", plan.data, seed=0, flaws=plan.flaws)
    model, processor = tiny_model.build_model_and_processor(plan.model, seed=0)
    if "arm" in inspect.signature(pipeline.rl_config).parameters:
        config = pipeline.rl_config(plan, files, out / "run", 0, pipeline.ARMS["grpo_care"])
    else:
        config = pipeline.rl_config(plan, files, out / "run", 0, care=True)
    trainer_module.train(config, model=model, processor=processor)
    per_step = [spent[i] + spent[i + 1] for i in range(0, len(spent), 2)]  # one scoring + one loss head per step
    return per_step[1:]


def child(case: str, small: bool) -> None:
    seconds = _trainer_head_case(small) if case == "trainer_head" else _logprob_case(case, small)
    import care_kernels

    print(json.dumps({"case": case, "seconds": seconds, "package": care_kernels.__file__}))


def run_one(root: Path, case: str, small: bool) -> list[float]:
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'python'}"}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", case] + (["--small"] if small else [])
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{case} in {root} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["package"]).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"{root} imported care_kernels from {result['package']}: build it in place there")
    return result["seconds"]


def compare(before: Path, after: Path, cases, rounds: int, small: bool = False, log=print) -> dict:
    """{case: {"before": [...], "after": [...], "before_median", "after_median", "after_over_before"}}."""
    roots = {"before": before, "after": after}
    results = {case: {"before": [], "after": []} for case in cases}
    for r in range(rounds):
        for case in cases:
            for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
                seconds = run_one(roots[name], case, small)
                results[case][name] += seconds
                log(f"round {r + 1} {case} {name}: " + ", ".join(f"{s:.3f}" for s in seconds) + " s")
    for case, res in results.items():
        res["before_median"] = statistics.median(res["before"])
        res["after_median"] = statistics.median(res["after"])
        res["after_over_before"] = res["after_median"] / res["before_median"]
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path)
    ap.add_argument("--after", type=Path)
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="tiny shapes: checks the script, measures nothing")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.small)
        return 0
    if args.before is None or args.after is None:
        ap.error("--before and --after are required (two package roots with care_kernels built in place)")
    results = compare(args.before, args.after, args.cases, args.rounds, args.small)
    for case, res in results.items():
        print(f"{case}: before median {res['before_median']:.3f} s, after median {res['after_median']:.3f} s, "
              f"after/before {res['after_over_before']:.3f} (n = {len(res['before'])}, {len(res['after'])})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
