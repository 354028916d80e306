"""The demo study's summary: t-quantiles, intervals over seeds, paired differences, the tables and the plot."""

import json
import math

import pytest
from grpo_care.demo.study import mean_interval, paired_differences, study_markdown, summarize_study, t_quantile

# two-sided 95% quantiles of Student's t (any statistics table; scipy.stats.t.ppf(0.975, df))
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 30: 2.0423, 120: 1.9799}


@pytest.mark.parametrize("df, expected", sorted(T975.items()))
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_t_quantile_other_levels_and_bad_input():
    assert t_quantile(0.95, 4) == pytest.approx(2.1318, abs=2e-4)
    assert t_quantile(0.995, 10) == pytest.approx(3.1693, abs=2e-4)
    with pytest.raises(ValueError, match="0.5 < p < 1"):
        t_quantile(0.3, 4)
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0.975, 0)


def test_mean_interval_by_hand():
    # mean 3, sample sd sqrt(2.5), half-width t(0.975, 4) * sd / sqrt(5)
    stat = mean_interval([1, 2, 3, 4, 5])
    half = 2.7764 * math.sqrt(2.5) / math.sqrt(5)
    assert stat["n"] == 5 and stat["mean"] == 3.0 and stat["sd"] == pytest.approx(math.sqrt(2.5), abs=1e-3)
    assert stat["ci95"] == pytest.approx([3 - half, 3 + half], abs=2e-3)


def test_mean_interval_small_and_missing():
    assert mean_interval([]) == {"n": 0, "mean": None, "sd": None, "ci95": None, "values": []}
    one = mean_interval([42.0, None])
    assert (one["n"], one["mean"], one["sd"], one["ci95"]) == (1, 42.0, None, None)
    same = mean_interval([7.0, 7.0, 7.0])
    assert same["sd"] == 0.0 and same["ci95"] == [7.0, 7.0]


def test_paired_differences_use_each_seeds_difference():
    care = {0: 80.0, 1: 60.0, 2: 70.0, 3: 90.0}
    grpo = {0: 70.0, 1: 55.0, 2: 72.0}  # seed 3 missing: not paired
    stat = paired_differences(care, grpo)
    assert stat["seeds"] == [0, 1, 2] and stat["values"] == [10.0, 5.0, -2.0]
    sd = math.sqrt(((10 - 13 / 3) ** 2 + (5 - 13 / 3) ** 2 + (-2 - 13 / 3) ** 2) / 2)
    half = 4.3027 * sd / math.sqrt(3)
    assert stat["mean"] == pytest.approx(13 / 3, abs=1e-3)
    assert stat["ci95"] == pytest.approx([13 / 3 - half, 13 / 3 + half], abs=2e-3)
    # pairing matters: the spread of the differences, not of each arm
    assert stat["sd"] < mean_interval(list(care.values())[:3])["sd"]


def _fake_seed(tmp_path, seed, acc, cons, reached=True):
    rows = [{"model": name, "overall": acc[i], "consistency": cons[i], "L1": acc[i], "L2": acc[i], "L3": acc[i],
             "consistency_when_correct": cons[i], "premises_correct": 50.0, "format": 100.0, "n": 96}
            for i, name in enumerate(("warm start", "GRPO", "no-KL", "GRPO-CARE"))]
    bonus = {"consistent": {"rollouts": 10, "bonus_rate": 0.8}, "inconsistent": {"rollouts": 5, "bonus_rate": 0.2}}
    probe = {"right_letter_after_true_premises": 0.91, "right_letter_after_teacher_premises": 0.04}
    meta = {"seed": seed, "warm_start": {"perception_L1": 0.95 if reached else 0.5,
                                         "reached_perception_target": reached, "reference_probe": probe},
            "breakdown": {"warm start": {"consistency_per_level": {"L1": 1.0, "L2": 0.9, "L3": 0.854}}},
            "care_bonus_among_correct_rollouts": bonus, "seconds": {"wall_s": 1.0}, "speed_probe": None}
    d = tmp_path / f"seed_{seed}"
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"table": {"rows": rows}, "meta": meta}))
    curves = {name: [{"step": s, "accuracy": 0.5 + 0.01 * s, "consistency": 0.8} for s in range(1, 5)]
              for name in ("GRPO", "no-KL", "GRPO-CARE")}
    (d / "curves.json").write_text(json.dumps(curves))


def test_summarize_study_writes_every_seed_and_the_paired_rows(tmp_path):
    from grpo_care.demo.pipeline import QUICK

    _fake_seed(tmp_path, 0, [60, 70, 72, 75], [90, 70, 65, 88])
    _fake_seed(tmp_path, 1, [50, 65, 66, 64], [88, 60, 62, 85], reached=False)
    summary = summarize_study(tmp_path, QUICK, [0, 1, 2])
    assert summary["seeds"] == [0, 1] and summary["missing_seeds"] == [2]
    care_grpo = summary["paired"]["GRPO-CARE minus GRPO"]
    assert care_grpo["consistency"]["values"] == [18.0, 25.0] and care_grpo["overall"]["values"] == [5.0, -1.0]
    drift = summary["paired"]["GRPO minus warm start"]  # each arm's change from the warm start, per seed
    assert drift["consistency"]["values"] == [-20.0, -28.0] and drift["overall"]["values"] == [10.0, 15.0]
    assert summary["arms"]["GRPO"]["overall"]["n"] == 2
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["protocol"]["rl_steps"] == QUICK.rl_steps and set(saved["per_seed"]) == {"0", "1"}
    text = (tmp_path / "study.md").read_text()
    assert "(n = 2)" in text and "not finished: [2]" in text and "(missed)" in text
    assert "| GRPO-CARE minus no-KL | 2 |" in text and "80% / 20%" in text
    assert "| 100 / 90 / 85 | 0.91 / 0.04 |" in text  # item 1's warm-start checks, per seed
    pytest.importorskip("matplotlib")
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_markdown_single_seed_has_no_interval():
    summary = {"seeds": [0], "missing_seeds": [], "protocol": {"perception_target": 0.9},
               "arms": {"GRPO": {k: mean_interval([v]) for k, v in (
                   ("overall", 70.0), ("consistency", 60.0), ("L1", 1.0), ("L2", 1.0), ("L3", 1.0),
                   ("consistency_when_correct", 1.0))}},
               "paired": {}, "per_seed": {"0": {"perception_L1": 0.95, "reached_perception_target": True,
                                                "arms": {"GRPO": {"overall": 70.0, "consistency": 60.0}}}}}
    text = study_markdown(summary)
    assert "| GRPO | 1 | 70.0 | 60.0 |" in text
