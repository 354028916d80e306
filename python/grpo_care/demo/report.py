"""The demo's outputs: a results table (JSON + Markdown, also printed) and a PNG of the training curves.

    table = results_table({"warm start": scores_ws, "GRPO": scores_grpo, "GRPO-CARE": scores_care})
    write_report(out_dir, table, meta)            # results.json, results.md
    plot_curves(out_dir / "curves.png", {"GRPO": grpo_metrics, "GRPO-CARE": care_metrics})  # None: skipped

`scores` are the dicts of `score_model` (evaluation.py): accuracy per level, consistency rate, and counts.
The curves read the trainer's per-step metrics (`metrics.jsonl` rows): reward, accuracy reward, and the
consistency of the training rollouts as the demo's judge scored them.
"""

from __future__ import annotations

import json
import math
import warnings
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


def noise_note(table: dict, per_level: int) -> str:
    """How large a difference the sample size can resolve: the largest binomial standard error in the table."""
    def se(pct, n):
        p = (pct or 0.0) / 100.0
        return 100.0 * math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")

    rows = table["rows"]
    level = max((se(r[lv], per_level) for r in rows for lv in LEVELS), default=float("nan"))
    overall = max((se(r[k], r["n"]) for r in rows for k in ("overall", "consistency")), default=float("nan"))
    return (f"{per_level} questions per level ({rows[0]['n'] if rows else 0} in all): one standard error is up to "
            f"{level:.1f} points on a level's accuracy and {overall:.1f} points on the overall rates; differences "
            "smaller than about twice that are noise.")


def across_seeds(results: list[dict]) -> str:
    """Markdown: overall accuracy and consistency of each model per seed, then mean and spread over seeds.

    `results` are the demo's results.json contents, one per seed (`grpo-care demo --summarize DIR ...`): the
    models every run has, from runs of one RL length (runs of 50 and 100 steps are not averaged together)."""
    steps = sorted({r["meta"].get("plan_detail", {}).get("rl_steps") for r in results}, key=str)
    if len(steps) > 1:
        raise ValueError(f"these runs trained for different numbers of RL steps ({', '.join(map(str, steps))}): "
                         "summarize runs of one length together")
    models = [row["model"] for row in results[0]["table"]["rows"]
              if all(any(x["model"] == row["model"] for x in r["table"]["rows"]) for r in results)]
    seeds = [r["meta"]["seed"] for r in results]
    lines = ["| model | " + " | ".join(f"seed {s}: acc / cons." for s in seeds) + " | mean acc | mean cons. |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    for model in models:
        pairs = []
        for r in results:
            row = next(x for x in r["table"]["rows"] if x["model"] == model)
            pairs.append((row["overall"], row["consistency"]))
        cells = [f"{a:.1f} / {c:.1f}" for a, c in pairs]
        accs, cons = [a for a, _ in pairs], [c for _, c in pairs]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {_mean_spread(accs)} | {_mean_spread(cons)} |")
    return "\n".join(lines)


def _mean_spread(xs: list[float]) -> str:
    """'mean ± sample std' (just the mean for one value)."""
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{mean:.1f}"
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return f"{mean:.1f} ± {sd:.1f}"


def write_report(out_dir: str | Path, table: dict, meta: dict) -> tuple[Path, Path]:
    """results.json (table + meta) and results.md (table, then what was run); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps({"table": table, "meta": meta}, indent=2))
    notes = [f"- {k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list)) and k != "noise"]
    md_path.write_text("# grpo-care demo results\n\n" + markdown_table(table) + "\n\n"
                       "Accuracy per level and rates in %, near-greedy decoding; consistency = the code judge "
                       "says the <think> supports the <answer> (grpo_care/demo/consistency.py).\n"
                       + (meta.get("noise", "") + "\n\n") + "\n".join(notes) + "\n")
    return json_path, md_path


def plot_curves(path: str | Path, runs: dict, smooth: int = 5) -> Path | None:
    """One PNG, three panels (base reward, accuracy, consistency of the rollouts), one line per run: the raw
    per-step values faint, a moving average of `smooth` steps solid. CARE's bonus is left out of the reward
    panel so that the two runs are on the same scale.

    Returns the PNG's path, or None with a warning when matplotlib is missing or the plot cannot be drawn: the
    plot is an extra that never costs a finished run its results (written before it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        warnings.warn(f"{Path(path).name} skipped: matplotlib is not installed ({err}); "
                      "pip install \"care-kernels[demo]\" draws it next time", stacklevel=2)
        return None
    try:
        return _draw(plt, Path(path), runs, smooth)
    except Exception as err:  # noqa: BLE001 - fonts, backends, a full disk: the results are already written
        warnings.warn(f"{Path(path).name} skipped: the plot could not be drawn ({type(err).__name__}: {err})",
                      stacklevel=2)
        return None


def _draw(plt, path: Path, runs: dict, smooth: int) -> Path:
    panels = (("reward", "base reward (accuracy + format)"), ("accuracy", "rollout accuracy"),
              ("consistency", "rollout consistency (code judge)"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    try:
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
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _moving_average(values: list, k: int) -> list:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1):i + 1]
        out.append(sum(window) / len(window))
    return out
