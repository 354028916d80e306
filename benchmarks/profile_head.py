"""gpu_check phase (e): a torch.profiler kernel table of one iteration of our GRPO heads.

    python benchmarks/profile_head.py [--providers ck_triton,ck_fused] [--head qwen2.5-vl-7b] [--n 16384]

For each provider (benchmarks/providers.py: ck_triton = the autograd head, dual_linear_logprobs + policy_loss +
backward; ck_fused = FusedLinearGRPOLoss), the benchmark's GRPO-head case is built on the benchmark's inputs,
run twice untimed (compiles, autotuning, the logits GEMM strategy's timing), then once under torch.profiler; the
table lists the kernels by total device time (CPU ops by CPU time off a GPU), with the iteration's wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import providers  # noqa: E402
import torch  # noqa: E402
from shapes import Spec, device, plan  # noqa: E402


def profile(provider: str, head: str, n: int, dtype: str, rows: int) -> str:
    dev = device()
    spec = Spec("grpo_head", provider, head, n, dtype)
    ok, why = providers.PROVIDERS[provider].available("grpo_head", dev)
    if not ok:
        return f"{provider}: not available here ({why})"
    inputs = cases.make_inputs(spec, dev)
    built = providers.build(provider, "grpo_head", inputs, dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(2):
        built.reset()
        built.run()
        sync()
    built.reset()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        built.run()
        sync()
        wall = time.perf_counter() - start
    sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70)
    label = providers.PROVIDERS[provider].label
    return f"== {label} ({provider}), grpo_head {head} N={n} {dtype}: one iteration {wall * 1e3:.1f} ms wall\n{table}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--providers", default="ck_triton,ck_fused")
    parser.add_argument("--head", default=plan().heads[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--dtype", default=plan().dtype)
    parser.add_argument("--rows", type=int, default=25, help="kernels listed per table")
    args = parser.parse_args(argv)
    for provider in filter(None, args.providers.split(",")):
        print(profile(provider, args.head, args.n, args.dtype, args.rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
