"""Benchmark JSON -> Markdown tables and PNG plots under benchmarks/results/<device>/.

    python benchmarks/report.py                        # the newest .benchmarks/care_kernels-*.json
    python benchmarks/report.py run.json [more.json|run.jsonl ...] [--merge] [--readme README.md]

Input: pytest-benchmark JSON written by `pytest benchmarks/` (or the JSON lines of CK_BENCH_JSONL, which
survive a killed run). Output, per device: README.md (tables with median time, effective TFLOP/s, the
ratio to the bare matmuls, peak extra memory, and the time ratio of every provider to every other),
time / memory plots against N (one line per provider), records.json (the normalized data) and the raw
input. benchmarks/results/README.md indexes the latest tables of every device; `--readme FILE` also
writes that index between `<!-- care_kernels-bench:start -->` and `<!-- care_kernels-bench:end -->`.
`--merge` keeps a device's earlier records that this input does not replace (e.g. a headline-only run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from ratios import add_ratios

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CASE_ORDER = (
    "grpo_head",
    "fwd_bwd",
    "forward",
    "dual",
    "entropy",
    "group_advantages",
    "care_bonus",
    "answer_likelihood",
)
CASE_TITLES = {
    "grpo_head": "GRPO loss head: policy forward+backward + reference forward",
    "fwd_bwd": "Log-probs forward+backward",
    "forward": "Log-probs forward",
    "dual": "Policy + reference log-probs (forward)",
    "entropy": "Log-probs + entropy, forward+backward",
    "group_advantages": "Group advantages",
    "care_bonus": "CARE consistency bonus",
    "answer_likelihood": "Answer likelihood",
}
START, END = "<!-- care_kernels-bench:start -->", "<!-- care_kernels-bench:end -->"


# --------------------------------------------------------------------------------------------- loading


def _records_from_json(data: dict) -> list[dict]:
    machine = data.get("care_kernels_bench") or data.get("machine_info", {}).get("care_kernels_bench", {})
    out = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info") or {})
        if "case" not in info:
            continue
        median = (bench.get("stats") or {}).get("median")
        if median:
            info["median_s"] = median
        info["machine"] = machine
        out.append(info)
    return out


def load(paths: list[Path]) -> list[dict]:
    records = []
    for path in paths:
        text = path.read_text()
        if path.suffix == ".jsonl":
            records += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            records += data["records"] if "records" in data else _records_from_json(data)
    return records


def default_input() -> Path:
    found = sorted((HERE.parent / ".benchmarks").glob("care_kernels-*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(
            "no input given and no .benchmarks/care_kernels-*.json found: run `pytest benchmarks/` first"
        )
    return found[-1]


def _key(r: dict) -> tuple:
    return (r["case"], r["head"], r["N"], r["dtype"])


def with_ratios(records: list[dict]) -> list[dict]:
    """Recompute the ratios from the medians (a merged set may mix runs)."""
    groups = defaultdict(dict)
    for r in records:
        groups[_key(r)][r["provider"]] = r
    for group in groups.values():
        add_ratios(group)
    return records


# --------------------------------------------------------------------------------------------- formatting


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "–"
    if b >= 1 << 30:
        return f"{b / (1 << 30):.2f} GiB"
    if b >= 1 << 20:
        return f"{b / (1 << 20):.0f} MiB"
    return f"{b / 1024:.0f} KiB"


def fmt_x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _sorted_providers(group: dict) -> list[dict]:
    return sorted(group.values(), key=lambda r: r["median_s"])


def case_table(group: dict) -> list[str]:
    rows = _sorted_providers(group)
    has_floor = any("vs_fused_floor_matmuls" in r for r in rows)
    head = (
        ["provider", "median", "TFLOP/s", "× bare GEMMs"]
        + (["× 4-GEMM floor"] if has_floor else [])
        + ["peak extra memory", "rounds", "note"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tf = r.get("tflops")
        cells = [
            f"**{r['label']}**" if r.get("kind") == "ours" else r["label"],
            fmt_time(r["median_s"]),
            "–" if tf is None else (f"{tf:.3f}" if tf < 1 else f"{tf:.1f}"),
            "1.00× (itself)" if r["provider"] == "torch_mm" else fmt_x(r.get("vs_bare_matmuls")),
        ]
        if has_floor:
            cells.append(
                "1.00× (itself)" if r["provider"] == "torch_mm_x4" else fmt_x(r.get("vs_fused_floor_matmuls"))
            )
        mem = fmt_bytes(r.get("peak_extra_bytes"))
        if r.get("memory_error"):
            mem = "error"
        elif str(r.get("memory_method", "")).startswith("analytic"):
            mem += " (buffers)"
        cells += [mem, str(r.get("rounds", "")), (r.get("note") or "").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratio_matrix(group: dict) -> list[str]:
    rows = _sorted_providers(group)
    names = [r["provider"] for r in rows]
    lines = ["| time of row ÷ time of column | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for r in rows:
        cells = [
            "1" if o == r["provider"] else f"{r['time_ratio_vs'].get(o, float('nan')):.2f}" for o in names
        ]
        lines.append(f"| {r['provider']} | " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------------------------- plots


def plots(records: list[dict], out: Path) -> dict[tuple, list[str]]:
    """(case, head, dtype) -> PNG file names: time and memory against N, or bars when there is one N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(lambda: defaultdict(list))
    for r in records:
        series[(r["case"], r["head"], r["dtype"])][r["label"]].append(r)
    made = {}
    for (case, head, dtype), by_label in series.items():
        ns = sorted({r["N"] for rs in by_label.values() for r in rs})
        files = []
        for metric, field, unit, scale in (
            ("time", "median_s", "seconds", 1.0),
            ("memory", "peak_extra_bytes", "MiB", 1 / (1 << 20)),
        ):
            fig, ax = plt.subplots(figsize=(7.5, 4.5))
            if len(ns) > 1:
                for label, rs in sorted(by_label.items()):
                    pts = sorted((r["N"], r[field] * scale) for r in rs if r.get(field) is not None)
                    if pts:
                        ax.plot(
                            [p[0] for p in pts],
                            [p[1] for p in pts],
                            marker="o",
                            label=label,
                            linestyle="--" if rs[0].get("kind") == "bare" else "-",
                        )
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("tokens N")
                ax.legend(fontsize=7)
            else:
                items = sorted(
                    (
                        (label, rs[0][field] * scale)
                        for label, rs in by_label.items()
                        if rs[0].get(field) is not None
                    ),
                    key=lambda x: x[1],
                )
                ax.barh([i[0] for i in items], [i[1] for i in items])
                ax.tick_params(axis="y", labelsize=7)
                ax.set_xlabel(unit)
            ax.set_ylabel(unit if len(ns) > 1 else "")
            ax.set_title(
                f"{case} {head} {dtype}: {metric}" + (f" (N={ns[0]})" if len(ns) == 1 else ""), fontsize=9
            )
            ax.grid(True, alpha=0.3)
            fig.tight_layout()
            name = f"{case}-{head}-{metric}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            files.append(name)
        made[(case, head, dtype)] = files
    return made


# --------------------------------------------------------------------------------------------- documents


def _machine_lines(m: dict) -> list[str]:
    return [
        f"- device: **{m.get('device_name', '?')}**",
        f"- torch {m.get('torch')}, triton {m.get('triton')}, care_kernels {m.get('care_kernels')}; "
        f"peers: trl {m.get('trl')}, liger-kernel {m.get('liger_kernel')}, "
        f"cut-cross-entropy {m.get('cut_cross_entropy')}; python {m.get('python')}",
        f"- CPU: {m.get('cpu_model')} ({m.get('cpu_count')} CPUs, torch threads {m.get('torch_threads')}"
        + (f", instruction set {m['cpu_isa']} (ATen; C++ epilogues: {m.get('cpp_isa')})" if m.get("cpu_isa") else "")
        + ")",
        f"- date: {m.get('date')}" + _load_note(m),
    ]


def _load_note(m: dict) -> str:
    loads = [x for x in (m.get("loadavg_start"), m.get("loadavg_end")) if x is not None]
    if m.get("device") != "cpu" or not loads:
        return ""
    note = f"; load average {' → '.join(f'{x:.1f}' for x in loads)} on {m.get('cpu_count')} CPUs"
    # The run's own threads keep up to cpu_count cores busy; a load well above that means other work ran too.
    if max(loads) > 1.25 * (m.get("cpu_count") or 1):
        note += " (**other processes were running: CPU timings are disturbed, compare within this run only**)"
    return note


def device_readme(records: list[dict], images: dict) -> str:
    m = records[0].get("machine", {})
    lines = [
        f"# care_kernels benchmarks: {m.get('device_name', '?')}",
        "",
        *_machine_lines(m),
        "",
        "Reproduce: `pytest benchmarks/` then `python benchmarks/report.py` (on a GPU machine: "
        "`bash benchmarks/gpu_check.sh`). Effective TFLOP/s = the case's FLOP count / median time, the same "
        "count for every provider: 2NHV forward, backward with recompute 6NHV (fwd+bwd 8NHV), dual forward "
        "4NHV, GRPO head 10NHV (its fused floor is 4 GEMMs = 8NHV). Peak extra memory: on CUDA the "
        "allocator's peak above the inputs; on CPU the peak RSS above the pre-run RSS of a process running "
        "only that case (bare GEMMs: their preallocated output buffers). Ratios > 1 are slower / larger.",
        "",
    ]
    groups = defaultdict(dict)
    for r in records:
        groups[_key(r)][r["provider"]] = r
    order = {c: i for i, c in enumerate(CASE_ORDER)}
    shown_images = set()
    for key in sorted(groups, key=lambda k: (order.get(k[0], 99), k[1], k[3], k[2])):
        case, head, n, dtype = key
        group = groups[key]
        first = next(iter(group.values()))
        shape = (
            f"{first.get('model')} head H={first.get('H')} V={first.get('V')}, N={n} tokens"
            if first.get("H")
            else f"{n} rows"
        )
        formula = first.get("flop_formula")
        lines += [
            f"## {CASE_TITLES.get(case, case)}: {shape}, {dtype}" + (f" ({formula})" if formula else ""),
            "",
        ]
        run = first.get("machine", {})
        if run.get("date") != m.get("date"):  # merged from another run (report.py --merge)
            lines += [f"Measured in another run: {run.get('date')}" + _load_note(run) + ".", ""]
        lines += case_table(group) + [""]
        lines += ["<details><summary>time ratio of every provider to every other</summary>", ""]
        lines += ratio_matrix(group) + ["", "</details>", ""]
        img_key = (case, head, dtype)
        if img_key in images and img_key not in shown_images:
            shown_images.add(img_key)
            lines += [" ".join(f"![{f}]({f})" for f in images[img_key]), ""]
    return "\n".join(lines) + "\n"


def _headline_group(records: list[dict]) -> dict | None:
    heads = [r for r in records if r["case"] == "grpo_head"]
    if not heads:
        return None
    top = max(heads, key=lambda r: (r["N"], r["head"]))
    return {r["provider"]: r for r in heads if _key(r) == _key(top)}


def index(root: Path) -> str:
    lines = [START, "", "## Benchmark results (latest per device)", ""]
    for rec_file in sorted(root.glob("*/records.json")):
        data = json.loads(rec_file.read_text())
        records = with_ratios(data["records"])
        if not records:
            continue
        group = _headline_group(records)
        first = next(iter(group.values())) if group else records[0]
        m = first.get("machine", {})  # the run the headline table below comes from
        rel = rec_file.parent.name
        lines += [f"### [{m.get('device_name', rel)}]({rel}/README.md)", "", *_machine_lines(m), ""]
        if group:
            lines += [
                f"GRPO loss head step, {first.get('model')} head, N={first['N']}, {first['dtype']} "
                f"(10NHV counted):",
                "",
            ]
            lines += case_table(group) + [""]
    lines += [END]
    return "\n".join(lines) + "\n"


def update_block(path: Path, block: str, rel_prefix: str) -> None:
    block = block.replace("](", "](" + rel_prefix) if rel_prefix else block
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        text = text[: text.index(START)] + block.rstrip("\n") + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block
    path.write_text(text)


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", type=Path, help="pytest-benchmark JSON or CK_BENCH_JSONL files")
    ap.add_argument("--out-root", type=Path, default=RESULTS, help="folder of the per-device result folders")
    ap.add_argument(
        "--merge", action="store_true", help="keep earlier records of the device not in this input"
    )
    ap.add_argument("--readme", type=Path, help="also write the index between the markers of this file")
    args = ap.parse_args(argv)

    inputs = args.inputs or [default_input()]
    records = load(inputs)
    if not records:
        print(f"no benchmark records in {', '.join(map(str, inputs))}", file=sys.stderr)
        return 1
    by_device = defaultdict(list)
    for r in records:
        by_device[(r.get("machine") or {}).get("device_slug", "unknown-device")].append(r)
    args.out_root.mkdir(parents=True, exist_ok=True)
    for slug, recs in by_device.items():
        out = args.out_root / slug
        if args.merge and (out / "records.json").exists():
            old = json.loads((out / "records.json").read_text())["records"]
            new_keys = {(_key(r), r["provider"]) for r in recs}
            recs = [r for r in old if (_key(r), r["provider"]) not in new_keys] + recs
        elif out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        recs = with_ratios(recs)
        (out / "records.json").write_text(json.dumps({"records": recs}, indent=1) + "\n")
        for src in inputs:  # the raw input beside the tables; a merged run keeps its own name
            stem = f"bench-{src.stem}" if args.merge else "bench"
            shutil.copyfile(src, out / (stem + (".jsonl" if src.suffix == ".jsonl" else ".json")))
        images = plots(recs, out)
        (out / "README.md").write_text(device_readme(recs, images))
        print(f"wrote {out}/README.md ({len(recs)} results, {sum(len(v) for v in images.values())} plots)")
    block = index(args.out_root)
    update_block(
        args.out_root / "README.md",
        "# care_kernels benchmark results\n\n" + block
        if not (args.out_root / "README.md").exists()
        else block,
        "",
    )
    if args.readme:
        rel = os.path.relpath(args.out_root.resolve(), args.readme.resolve().parent)
        update_block(args.readme, block, rel + "/")
        print(f"updated the benchmark block of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
