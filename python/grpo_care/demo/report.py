"""The demo's outputs: a results table (JSON + Markdown, also printed) and a PNG of the training curves.

    table = results_table({"warm start": scores_ws, "GRPO": scores_grpo, "GRPO-CARE": scores_care})
    write_report(out_dir, table, meta)            # results.json, results.md
    plot_curves(out_dir / "curves.png", {"GRPO": grpo_metrics, "GRPO-CARE": care_metrics})

`scores` are the dicts of `score_model` (evaluation.py): accuracy per level, consistency rate, and counts.
The curves read the trainer's per-step metrics (`metrics.jsonl` rows): reward, accuracy reward, and the
consistency of the training rollouts as the demo's judge scored them.
"""

from __future__ import annotations

import json
from pathlib import Path

LEVELS = ("L1", "L2", "L3")


def results_table(scores: dict) -> dict:
    """{"columns": [...], "rows": [{"model": name, "L1": acc, ..., "consistency": rate, ...}]} (rates in %)."""
    rows = []
    for name, s in scores.items():
        row = {"model": name}
        for level in LEVELS:
            row[level] = _pct(s["accuracy"].get(level))
        row["overall"] = _pct(s["accuracy_overall"])
        row["consistency"] = _pct(s["consistency"])
        row["consistency_when_correct"] = _pct(s.get("consistency_when_correct"))
        row["premises_correct"] = _pct(s.get("premises_correct"))
        row["format"] = _pct(s.get("format"))
        row["n"] = s["n"]
        rows.append(row)
    columns = ["model", *LEVELS, "overall", "consistency", "consistency_when_correct", "premises_correct",
               "format", "n"]
    return {"columns": columns, "rows": rows}


def _pct(x):
    return None if x is None else round(100.0 * float(x), 1)


HEADERS = {"model": "model", "L1": "L1 acc", "L2": "L2 acc", "L3": "L3 acc",
           "overall": "all acc", "consistency": "consistency", "consistency_when_correct": "consistency (correct only)",
           "premises_correct": "premises right", "format": "format ok", "n": "n"}


def markdown_table(table: dict) -> str:
    columns = table["columns"]
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |",
             "|" + "|".join("---" if c == "model" else "---:" for c in columns) + "|"]
    for row in table["rows"]:
        cells = []
        for c in columns:
            v = row[c]
            cells.append("–" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out_dir: str | Path, table: dict, meta: dict) -> tuple[Path, Path]:
    """results.json (table + meta) and results.md (table, then what was run); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps({"table": table, "meta": meta}, indent=2))
    notes = [f"- {k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))]
    md_path.write_text("# grpo-care demo results\n\n" + markdown_table(table) + "\n\n"
                       "Accuracy per level and rates in %, near-greedy decoding; consistency = the code judge "
                       "says the <think> supports the <answer> (grpo_care/demo/consistency.py).\n\n"
                       + "\n".join(notes) + "\n")
    return json_path, md_path


def plot_curves(path: str | Path, runs: dict, smooth: int = 5) -> Path:
    """One PNG, three panels (reward, accuracy, consistency of the rollouts) with one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("reward", "total reward (incl. CARE bonus)"), ("accuracy", "rollout accuracy"),
              ("consistency", "rollout consistency (code judge)"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, panels):
        for name, rows in runs.items():
            steps = [r["step"] for r in rows if r.get(key) is not None]
            values = [r[key] for r in rows if r.get(key) is not None]
            if not values:
                continue
            line, = ax.plot(steps, values, alpha=0.25)
            ax.plot(steps, _moving_average(values, smooth), color=line.get_color(), label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _moving_average(values: list, k: int) -> list:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1):i + 1]
        out.append(sum(window) / len(window))
    return out
