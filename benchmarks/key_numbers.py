"""The key numbers of a benchmark run, short enough for the top of gpu_check's summary.txt.

    python benchmarks/key_numbers.py bench.jsonl [--picks picks.jsonl]

For the GRPO head, the dual pass and forward+backward (each shape measured): every provider's median time,
effective TFLOP/s and peak extra memory, fastest first; then the goals of issue 19, each as measured in this run:
  - the autograd GRPO head (care_kernels impl=triton) at least as fast as TRL's ChunkedLogProbFunction, with less
    extra memory;
  - the fused loss (FusedLinearGRPOLoss) at least as fast as Liger's materialized-logits triton_grpo_loss;
  - the dual pass faster than two single passes.
With --picks: the logits GEMM strategies and fused-head variants `auto` picked (every candidate's time) and any
candidate dropped for failing.
Records from several processes (gpu_check's phases) compare directly: each is a median of its own rounds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CASES = ("grpo_head", "dual", "fwd_bwd", "forward")
GOALS = (
    ("grpo_head", "ck_triton", "trl_chunked", "autograd GRPO head vs TRL ChunkedLogProbFunction", True),
    ("grpo_head", "ck_fused", "liger_triton", "fused loss vs Liger triton_grpo_loss", False),
    ("dual", "ck_triton", "ck_triton_x2", "dual pass vs two single passes", False),
)


def _load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a killed run
                continue
    return out


def _gib(b) -> str:
    return "-" if b is None else f"{b / (1 << 30):.2f} GiB"


def _base(provider: str) -> tuple[str, str]:
    name, _, tag = provider.partition("@")
    return name, tag


def tables(records: list[dict]) -> list[str]:
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if r.get("case") in CASES:
            groups.setdefault((r["case"], r["head"], r["N"], r["dtype"]), {})[r["provider"]] = r  # the latest wins
    lines = []
    for key in sorted(groups, key=lambda k: (CASES.index(k[0]), k[2])):
        case, head, n, dtype = key
        lines.append(f"{case} {head} N={n} {dtype}:")
        for r in sorted(groups[key].values(), key=lambda r: r["median_s"]):
            tf = r.get("tflops")
            lines.append(f"  {r['median_s'] * 1e3:9.1f} ms  {'-' if tf is None else f'{tf:6.1f}':>6} TFLOP/s  "
                         f"{_gib(r.get('peak_extra_bytes')):>10}  {r['label']}")  # fmt: skip
    return lines


def goals(records: list[dict]) -> list[str]:
    latest: dict[tuple, dict] = {}
    for r in records:
        latest[(r.get("case"), r.get("N"), r.get("provider"))] = r
    lines = []
    for case, ours, theirs, title, memory_too in GOALS:
        for (c, n, provider), rec in sorted(latest.items(), key=lambda kv: str(kv[0])):
            name, tag = _base(provider)
            if c != case or name != ours:
                continue
            other = latest.get((case, n, theirs)) or latest.get((case, n, f"{theirs}@{tag}"))
            where = f"{title} (N={n}{', ' + tag if tag else ''})"
            if other is None:
                lines.append(f"  {where}: {rec['median_s'] * 1e3:.1f} ms; {theirs} not measured")
                continue
            ratio = rec["median_s"] / other["median_s"]
            met = ratio <= 1.0 if case != "dual" else ratio < 1.0
            text = f"  {where}: {rec['median_s'] * 1e3:.1f} vs {other['median_s'] * 1e3:.1f} ms ({ratio:.3f}x)"
            mine, its = rec.get("peak_extra_bytes"), other.get("peak_extra_bytes")
            if memory_too:
                text += f", peak extra {_gib(mine)} vs {_gib(its)}"
                met = met and mine is not None and its is not None and mine < its
            lines.append(f"{text} -> {'MET' if met else 'not met'}")
    return ["goals (as measured in this run):", *(lines or ["  none measurable yet"])]


def picks(entries: list[dict]) -> list[str]:
    lines = []
    for e in entries:
        if e.get("type") == "pick" and e.get("kernel", "").endswith(("strategy", "variant")):
            times = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(e.get("timings_ms", {}).items()))
            lines.append(f"  [{e.get('tag') or '-'}] {e['kernel']} {dict(zip(e['key_args'], e['key']))}: "
                         f"{e['label']} ({times})")  # fmt: skip
        elif e.get("type") == "dropped":
            lines.append(f"  [{e.get('tag') or '-'}] DROPPED {e['where']}: {e['candidate']}: {e['error'][:200]}")
    return ["strategy picks and dropped candidates:", *lines] if lines else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("jsonl", type=Path)
    parser.add_argument("--picks", type=Path)
    args = parser.parse_args(argv)
    records = _load(args.jsonl)
    if not records:
        print(f"key numbers: no benchmark records in {args.jsonl} yet")
        return 0
    print("\n".join([*tables(records), *goals(records), *(picks(_load(args.picks)) if args.picks else [])]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
