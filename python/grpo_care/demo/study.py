"""`grpo-care demo --study`: the demo on several seeds, resumable, and a summary with intervals over seeds.

    summary = run_study(Path("outputs/demo_study"), FULL, seeds=[0, 1, 2, 3, 4])
    summary = summarize_study(Path("outputs/demo_study"), FULL, seeds=[0, 1, 2, 3, 4])  # finished seeds only

Each seed runs into `<output_dir>/seed_<s>` with `run_demo(..., resume=True)`: a seed or arm that finished is
loaded, not run again. The summary (study.json, study.md, study.png) holds every per-seed, per-arm outcome, the
mean of each outcome per arm with a 95% t-interval over seeds, and the paired differences GRPO-CARE minus GRPO
and GRPO-CARE minus no-KL (the difference within each seed, then its mean and 95% t-interval over seeds), then
each arm minus the warm start (how far RL moved it; descriptive).
Every seed counts, including one whose warm start missed the perception target (marked in the table).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path

OUTCOMES = ("overall", "consistency", "L1", "L2", "L3", "consistency_when_correct", "premises_correct", "format")
# the primary comparisons, then each arm's change from the warm start (drift: descriptive)
PAIRS = (("GRPO-CARE", "GRPO"), ("GRPO-CARE", "no-KL"),
         ("GRPO", "warm start"), ("no-KL", "warm start"), ("GRPO-CARE", "warm start"))


# ------------------------------------------------------------------------------------------------------------
# interval arithmetic


@functools.cache
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` degrees of freedom, from its density integrated by
    Simpson's rule and bisection (about 1e-8 absolute; scipy.stats.t.ppf(p, df) gives the same)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf_above_half(x: float, n: int = 4000) -> float:  # P(0 < T < x)
        h = x / n
        total = density(0.0) + density(x)
        total += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
        return total * h / 3

    lo, hi = 0.0, 1.0
    while cdf_above_half(hi) < p - 0.5:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf_above_half(mid) < p - 0.5 else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values: list[float], level: float = 0.95) -> dict:
    """{"n", "mean", "sd" (sample, n - 1), "ci95": [lo, hi] (t-interval: mean -+ t * sd / sqrt(n)), "values"};
    sd and ci95 are None for fewer than two values."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    out = {"n": n, "mean": None, "sd": None, "ci95": None, "values": xs}
    if n == 0:
        return out
    mean = sum(xs) / n
    out["mean"] = round(mean, 3)
    if n >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
        out["sd"], out["ci95"] = round(sd, 3), [round(mean - half, 3), round(mean + half, 3)]
    return out


def paired_differences(a: dict, b: dict) -> dict:
    """`a` minus `b` per seed (dicts seed -> value, seeds in both), then mean_interval over the seeds."""
    seeds = sorted(set(a) & set(b), key=int)
    diffs = [a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None]
    out = mean_interval(diffs)
    out["seeds"] = [int(s) for s in seeds]
    return out


# ------------------------------------------------------------------------------------------------------------
# running and summarizing


def seed_dir(out_dir: Path, seed: int) -> Path:
    return Path(out_dir) / f"seed_{seed}"


def run_study(out_dir: Path, plan, seeds: list[int], log=print) -> dict:
    """Run (or resume) every seed, then write and return the summary."""
    from grpo_care.demo.pipeline import run_demo

    out_dir = Path(out_dir)
    for seed in seeds:
        log(f"\n=== study seed {seed} ({seeds.index(seed) + 1} of {len(seeds)}) ===")
        run_demo(seed_dir(out_dir, seed), plan, seed=seed, log=log, resume=True)
    return summarize_study(out_dir, plan, seeds)


def _seed_outcomes(result: dict) -> dict:
    rows = {row["model"]: row for row in result["table"]["rows"]}
    meta = result["meta"]
    return {
        "arms": {name: {k: row.get(k) for k in OUTCOMES} for name, row in rows.items()},
        "perception_L1": meta["warm_start"]["perception_L1"],
        "reached_perception_target": meta["warm_start"]["reached_perception_target"],
        "warm_start_consistency_per_level":
            meta.get("breakdown", {}).get("warm start", {}).get("consistency_per_level"),
        "reference_probe": meta["warm_start"].get("reference_probe"),
        "care_bonus_among_correct_rollouts": meta.get("care_bonus_among_correct_rollouts"),
        "seconds": meta["seconds"],
        "speed_probe": meta.get("speed_probe"),
    }


def _curves(out_dir: Path, seeds: list[int]) -> dict:
    """{arm name: {seed: [per-step rows]}} from each seed's curves.json."""
    out: dict = {}
    for seed in seeds:
        path = seed_dir(out_dir, seed) / "curves.json"
        if path.is_file():
            for name, rows in json.loads(path.read_text()).items():
                out.setdefault(name, {})[seed] = rows
    return out


def summarize_study(out_dir: Path, plan, seeds: list[int]) -> dict:
    """study.json / study.md / study.png over the seeds whose results.json exists; returns the summary."""

    out_dir = Path(out_dir)
    per_seed, missing = {}, []
    for seed in seeds:
        path = seed_dir(out_dir, seed) / "results.json"
        if path.is_file():
            per_seed[seed] = _seed_outcomes(json.loads(path.read_text()))
        else:
            missing.append(seed)
    arms = sorted({name for s in per_seed.values() for name in s["arms"]}, key=_arm_order)
    summary_arms = {
        name: {k: mean_interval([per_seed[s]["arms"][name][k] for s in per_seed if name in per_seed[s]["arms"]])
               for k in OUTCOMES}
        for name in arms
    }
    paired = {}
    for a, b in PAIRS:
        if a in arms and b in arms:
            paired[f"{a} minus {b}"] = {
                k: paired_differences({s: v["arms"][a][k] for s, v in per_seed.items() if a in v["arms"]},
                                      {s: v["arms"][b][k] for s, v in per_seed.items() if b in v["arms"]})
                for k in ("overall", "consistency")
            }
    summary = {
        "seeds": sorted(per_seed),
        "missing_seeds": missing,
        "protocol": protocol(plan),
        "per_seed": {str(s): v for s, v in sorted(per_seed.items())},
        "arms": summary_arms,
        "paired": paired,
    }
    (out_dir / "study.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "study.md").write_text(study_markdown(summary) + "\n")
    plot_study(out_dir / "study.png", _curves(out_dir, sorted(per_seed)), per_seed, plan.rl_steps)
    return summary


def protocol(plan) -> dict:
    """The settings the pre-registered protocol names (the demo README's "Pre-registered protocol")."""
    from dataclasses import asdict

    return {
        "rl_steps": plan.rl_steps, "prompts_per_step": plan.prompts_per_step,
        "num_generations": plan.num_generations, "learning_rate": plan.learning_rate,
        "max_completion_length": plan.max_completion_length, "grpo_beta": plan.grpo_beta,
        "ref_ema_decay": plan.ref_ema_decay, "ref_ema_update_every": plan.ref_ema_update_every,
        "arms": list(plan.arms), "eval_per_level": plan.data.eval_per_level,
        "perception_target": plan.perception_target, "plan": asdict(plan),
    }


def _arm_order(name: str) -> int:
    order = ["warm start", "GRPO", "no-KL", "GRPO-CARE"]
    return order.index(name) if name in order else len(order)


def _fmt(stat: dict, signed: bool = False) -> str:
    """`mean [low, high]` (one decimal), `mean` without an interval, `–` without a mean; `signed`: with +/-."""
    number = "{:+.1f}" if signed else "{:.1f}"
    if stat["mean"] is None:
        return "–"
    if stat["ci95"] is None:
        return number.format(stat["mean"])
    low, high = stat["ci95"]
    return f"{number.format(stat['mean'])} [{number.format(low)}, {number.format(high)}]"


def study_markdown(summary: dict) -> str:
    """The study's tables: per arm (mean and 95% t-interval over seeds, n), paired differences, per seed."""
    n = len(summary["seeds"])
    lines = [f"Seeds: {', '.join(map(str, summary['seeds']))} (n = {n})"
             + (f"; not finished: {summary['missing_seeds']}" if summary["missing_seeds"] else ""), "",
             "| model | n | all acc | consistency | L1 acc | L2 acc | L3 acc | consistency (correct only) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, stats in summary["arms"].items():
        lines.append(f"| {name} | {stats['overall']['n']} | " + " | ".join(
            _fmt(stats[k]) for k in ("overall", "consistency", "L1", "L2", "L3", "consistency_when_correct")) + " |")
    if summary["paired"]:
        lines += ["", "| paired by seed | n | all acc | consistency |", "|---|---:|---:|---:|"]
        for name, stats in summary["paired"].items():
            lines.append(f"| {name} | {stats['overall']['n']} | {_fmt(stats['overall'], signed=True)} | "
                         f"{_fmt(stats['consistency'], signed=True)} |")
    lines += ["", "Mean [95% t-interval over seeds], in %; paired rows: the difference within each seed, then "
              "its mean and interval.", ""]
    arms = list(summary["arms"])
    lines += ["| seed | perception L1 (target) | warm start consistency L1 / L2 / L3 | reference: right letter "
              "after true / teacher's premises | " + " | ".join(f"{a}: acc / cons." for a in arms)
              + " | CARE bonus among correct: consistent / inconsistent |",
              "|---:|---:|---:|---:|" + "---:|" * (len(arms) + 1)]
    target = summary["protocol"]["perception_target"]
    for seed, s in summary["per_seed"].items():
        perception = s["perception_L1"]
        mark = "" if s["reached_perception_target"] else " (missed)"
        cells = []
        for a in arms:
            row = s["arms"].get(a)
            cells.append("–" if row is None else f"{row['overall']:.1f} / {row['consistency']:.1f}")
        bonus = s.get("care_bonus_among_correct_rollouts") or {}
        bonus_text = _bonus_shares(bonus) if bonus else "–"
        both = bonus.get("groups_with_both")  # absent from results written before it was measured
        if both:
            bonus_text += f" (groups with both: {_bonus_shares(both)}, {both['groups']} groups)"
        levels = s.get("warm_start_consistency_per_level") or {}
        levels_text = " / ".join(f"{100 * levels[k]:.0f}" for k in ("L1", "L2", "L3")) if levels else "–"
        probe = s.get("reference_probe") or {}
        probe_text = (f"{probe['right_letter_after_true_premises']:.2f} / "
                      f"{probe['right_letter_after_teacher_premises']:.2f}"
                      if probe.get("right_letter_after_true_premises") is not None else "–")
        lines.append(f"| {seed} | {100 * perception:.0f}% ({100 * target:.0f}%){mark} | {levels_text} | {probe_text} | "
                     + " | ".join(cells) + f" | {bonus_text} |")
    return "\n".join(lines)


def _bonus_shares(bonus: dict) -> str:
    """The shares of consistent / inconsistent right rollouts that got the bonus, as "92% / 5%" ("–": none)."""
    rates = [bonus.get(k, {}).get("bonus_rate") for k in ("consistent", "inconsistent")]
    return " / ".join("–" if r is None else f"{100 * r:.0f}%" for r in rates)


# ------------------------------------------------------------------------------------------------------------
# plot


def _moving_average(values: list[float], k: int) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1):i + 1]
        out.append(sum(window) / len(window))
    return out


def plot_study(path: Path, curves: dict, per_seed: dict, rl_steps: int, smooth: int = 10):
    """study.png: per arm, the rollouts' accuracy and consistency per RL step (each seed's moving average over
    `smooth` steps, then the mean over seeds, with a band of the 95% t-interval over seeds), and each seed's
    final evaluation as points right of the curves. None (with a warning) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed: study.png not written (pip install matplotlib)", stacklevel=2)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    panels = (("accuracy", "overall", "accuracy"), ("consistency", "consistency", "consistency (code judge)"))
    for ax, (key, eval_key, title) in zip(axes, panels):
        for i, (name, by_seed) in enumerate(sorted(curves.items(), key=lambda kv: _arm_order(kv[0]))):
            smoothed = [_moving_average([r[key] for r in rows if r.get(key) is not None], smooth)
                        for rows in by_seed.values()]
            length = min(len(s) for s in smoothed)
            steps = list(range(1, length + 1))
            stats = [mean_interval([s[j] for s in smoothed]) for j in range(length)]
            mean = [st["mean"] for st in stats]
            line, = ax.plot(steps, mean, label=f"{name} (rollouts, n={len(smoothed)})")
            if len(smoothed) > 1:
                ax.fill_between(steps, [st["ci95"][0] for st in stats], [st["ci95"][1] for st in stats],
                                color=line.get_color(), alpha=0.2)
            x = rl_steps * (1.04 + 0.03 * i)
            points = [s["arms"][name][eval_key] / 100 for s in per_seed.values() if name in s["arms"]]
            ax.scatter([x] * len(points), points, color=line.get_color(), s=14, marker="o")
        ax.axvline(rl_steps * 1.02, color="grey", lw=0.5)
        ax.set_title(f"{title}: rollouts per step; points: final evaluation per seed", fontsize=9)
        ax.set_xlabel("RL step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
