"""`grpo-care eval` on a tiny Qwen2.5-VL over synthetic SEED-Bench-R1 validation files (L1, L2, L3 with
domains, a missing video): per-level and per-domain counts, the report and per-sample files, resume, the
frame budget, and judges (offline; HTTP against a stub server that times out or answers garbage)."""

import json
from pathlib import Path

import pytest
from grpo_care import cli
from grpo_care.config import GRPOCareConfig
from grpo_care.evaluate import build_report, evaluate_files, level_label, read_sample_records
from grpo_care.judge import HTTPJudge, OfflineJudge

pytest.importorskip("av", reason="the synthetic clips are written with PyAV (pip install av)")

# record index -> (level file, domain); record 3 has no video (image only), record 6's video is deleted
LAYOUT = [
    ("L1", ""),
    ("L1", ""),
    ("L2", ""),
    ("L3", "Work"),
    ("L3", "Work"),
    ("L3", "Hobbies"),
    ("L3", "Recreation"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from grpo_care.synthetic import write_seed_bench_r1, write_tiny_model

    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    paths = write_seed_bench_r1(data, n_train=0, n_val=len(LAYOUT))
    records = [json.loads(line) for line in Path(paths["validation_L1"]).read_text().splitlines()]
    files = {}
    for record, (level, domain) in zip(records, LAYOUT):
        if domain:
            record["domain"] = domain
        files.setdefault(level, []).append(record)
    for level, rows in files.items():
        (data / "annotations" / f"validation_{level}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    missing = records[6]
    (data / "videos" / missing["video_source"] / missing["video_basename"]).unlink()
    return {
        "data": data,
        "files": [str(data / "annotations" / f"validation_{level}.jsonl") for level in ("L1", "L2", "L3")],
        "model": write_tiny_model(root / "model"),
    }


def _config(bench, **overrides) -> GRPOCareConfig:
    values = dict(
        model_name_or_path=bench["model"],
        device="cpu",
        data_root=str(bench["data"]),
        eval_max_new_tokens=6,
        eval_batch_size=2,
        video_min_pixels=3136,
        video_max_pixels=3136,
        image_max_pixels=3136,
    )
    values.update(overrides)
    return GRPOCareConfig(**values)


@pytest.fixture(scope="module")
def model(bench):
    from grpo_care.modeling import load_model

    model, processor, _ = load_model(_config(bench))
    return model.eval(), processor


def _cli_args(bench, out) -> list[str]:
    return [
        "eval", "--model", bench["model"], "--data", *bench["files"], "--data_root", str(bench["data"]),
        "--output_dir", str(out), "--judge", "offline", "--eval_max_new_tokens", "6", "--eval_batch_size", "2",
        "--video_max_pixels", "3136", "--video_min_pixels", "3136", "--image_max_pixels", "3136",
        "--device", "cpu",
    ]  # fmt: skip


def test_eval_cli_report_per_level_and_domain(bench, tmp_path, capsys):
    out = tmp_path / "eval"
    with pytest.warns(UserWarning, match="evaluation skips sample"):
        code = cli.main(_cli_args(bench, out))
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert printed["per_level"] == report["per_level"]
    levels = report["per_level"]
    assert {k: v["num_samples"] for k, v in levels.items()} == {"L1": 2, "L2": 1, "L3": 3}
    assert {k: v["num_samples"] for k, v in levels["L3"]["per_domain"].items()} == {"Hobbies": 1, "Work": 2}
    assert levels["L1"]["per_domain"] == {}
    assert report["num_samples"] == 6 and report["num_skipped"] == 1  # the sample without its video
    for summary in [*levels.values(), *levels["L3"]["per_domain"].values()]:
        assert summary["accuracy"] == summary["num_correct"] / summary["num_samples"]
    assert report["protocol"]["temperature"] == 0.1 and report["protocol"]["top_p"] == 0.001
    assert report["protocol"]["video_max_frames"] == 16
    assert report["judge"] == {"name": "offline"}
    # random tiny model: no <think>, so every sample is judged inconsistent, none unjudged
    assert report["consistency"]["num_judged"] == 6 and report["consistency"]["num_unjudged"] == 0
    assert report["files"][bench["files"][2]]["num_skipped"] == 1

    lines = (out / "samples.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["meta"]["model"] == bench["model"]
    records = read_sample_records(out / "samples.jsonl")
    assert len(records) == 6 and len(lines) == 7
    record = records["validation_L3.jsonl:1"]
    assert record["level"] == "validation_L3" and record["domain"] == "Work" and record["gold"] in "ABCD"
    assert record["consistency"]["reason"] == "no_think" and record["consistency"]["judge"] == "offline"
    assert {"completion", "think", "answer", "correct", "format_ok", "sample_id", "data_file"} <= set(record)


def test_data_parallel_eval_under_torchrun_matches_one_process(bench, tmp_path):
    """2 gloo ranks split the unfinished samples of each file; rank 0 merges their records into one
    samples.jsonl and writes the report, whose counts are those of one process; a rerun resumes everything."""
    import os
    import socket
    import subprocess
    import sys

    out = tmp_path / "eval"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "python"), os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
              "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "grpo_care.cli"]  # fmt: skip
    done = subprocess.run([*launch, *_cli_args(bench, out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    printed = json.loads(done.stdout[done.stdout.index("{"):])  # rank 0 alone prints the report
    report = json.loads((out / "report.json").read_text())
    assert printed["per_level"] == report["per_level"]
    levels = report["per_level"]
    assert {k: v["num_samples"] for k, v in levels.items()} == {"L1": 2, "L2": 1, "L3": 3}
    assert {k: v["num_samples"] for k, v in levels["L3"]["per_domain"].items()} == {"Hobbies": 1, "Work": 2}
    assert report["num_samples"] == 6 and report["num_skipped"] == 1
    assert report["consistency"]["num_judged"] == 6
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "samples.jsonl"]  # rank files merged
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 7 and "meta" in json.loads(lines[0])  # each sample once, from either rank
    # rank 0 ran every file's unfinished samples 1, 3, ..., rank 1 samples 2, 4, ... (L3:4 has no video)
    assert [json.loads(line)["key"] for line in lines[1:]] == [
        "validation_L1.jsonl:1", "validation_L2.jsonl:1", "validation_L3.jsonl:1", "validation_L3.jsonl:3",
        "validation_L1.jsonl:2", "validation_L3.jsonl:2",
    ]  # fmt: skip
    records = read_sample_records(out / "samples.jsonl")
    assert sorted(records) == sorted(
        ["validation_L1.jsonl:1", "validation_L1.jsonl:2", "validation_L2.jsonl:1"]
        + [f"validation_L3.jsonl:{i}" for i in (1, 2, 3)]
    )

    # as if interrupted before the final merge: rank 1's records still in its own file; one process resumes
    # (merging that file first): nothing left to generate
    (out / "samples.rank1.jsonl").write_text("".join(line + "\n" for line in [lines[0], *lines[5:]]))
    (out / "samples.jsonl").write_text("".join(line + "\n" for line in lines[:5]))
    with pytest.warns(UserWarning, match="evaluation skips sample"):  # the missing video is retried
        assert cli.main(_cli_args(bench, out)) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["per_level"] == report["per_level"]
    assert sum(f["num_resumed"] for f in again["files"].values()) == 6
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "samples.jsonl"]
    assert len((out / "samples.jsonl").read_text().splitlines()) == 7


def _count_generated(model, monkeypatch) -> list:
    rows = []
    generate = model.generate

    def counting(*args, **kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting)
    return rows


def test_resume_runs_only_unfinished_samples(bench, model, tmp_path, monkeypatch):
    model, processor = model
    config = _config(bench, eval_video_max_frames=4)
    budgets = []
    import grpo_care.evaluate as ev

    load_visuals = ev.load_visuals
    monkeypatch.setattr(
        ev, "load_visuals", lambda s, b, m: budgets.append(b.max_frames) or load_visuals(s, b, m)
    )
    out = tmp_path / "eval"
    with pytest.warns(UserWarning, match="evaluation skips sample"):
        first = evaluate_files(model, processor, bench["files"], config, output_dir=out)
    assert set(budgets) == {4}  # eval_video_max_frames, not the training video_max_frames
    assert first["num_samples"] == 6 and first["consistency"] is None

    # interrupted after 2 samples, in the middle of writing the third line
    samples = out / "samples.jsonl"
    lines = samples.read_text().splitlines()
    samples.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    rows = _count_generated(model, monkeypatch)
    with pytest.warns(UserWarning) as caught:
        second = evaluate_files(model, processor, bench["files"], config, output_dir=out)
    messages = [str(w.message) for w in caught]
    assert any("truncated last line" in m for m in messages) and any("skips sample" in m for m in messages)
    assert sum(rows) == 4  # 6 minus the 2 finished ones (the torn line is run again)
    assert second["num_samples"] == 6 and second["num_skipped"] == 1
    assert {k: v["num_samples"] for k, v in second["per_level"].items()} == {"L1": 2, "L2": 1, "L3": 3}
    resumed = second["results"][bench["files"][0]]
    assert resumed["num_resumed"] == 2
    assert [r["completion"] for r in resumed["records"]] == [
        r["completion"] for r in first["results"][bench["files"][0]]["records"]
    ]

    # finished: a rerun generates nothing, and a judge given now only judges
    rows.clear()
    with pytest.warns(UserWarning, match="evaluation skips sample"):
        third = evaluate_files(model, processor, bench["files"], config, output_dir=out, judge=OfflineJudge())
    assert rows == [] and third["consistency"]["num_judged"] == 6
    assert all(r["consistency"] for r in read_sample_records(samples).values())

    # other settings than the file's: refused, unless starting over
    with pytest.raises(ValueError, match="other evaluation settings"):
        evaluate_files(
            model, processor, bench["files"][:1], _config(bench, eval_max_new_tokens=5), output_dir=out
        )
    rows.clear()
    fresh = evaluate_files(
        model,
        processor,
        bench["files"][:1],
        _config(bench, eval_max_new_tokens=5),
        output_dir=out,
        resume=False,
    )
    assert sum(rows) == 2 and fresh["num_samples"] == 2 and len(read_sample_records(samples)) == 2


def test_http_judge_failures_are_counted_unjudged_and_the_eval_goes_on(bench, model, tmp_path):
    from test_grpo_care_judge import stub_server

    model, processor = model
    config = _config(bench)
    out = tmp_path / "eval"
    files = bench["files"][:2]  # L1 (2 samples) and L2 (1)
    evaluate_files(model, processor, files, config, output_dir=out)
    # the samples' completions, rewritten as a trained model's would be (finished: judging only)
    samples = out / "samples.jsonl"
    lines = samples.read_text().splitlines()
    thinks = ["GOOD: option A it is", "SLOW: option A", "GARBAGE: option A"]
    rewritten = [lines[0]]
    for line, think in zip(lines[1:], thinks):
        record = json.loads(line)
        record["completion"] = f"<think>{think}</think><answer>A</answer>"
        rewritten.append(json.dumps(record))
    samples.write_text("\n".join(rewritten) + "\n")

    with stub_server(slow_seconds=1.0) as (url, received):
        judge = HTTPJudge(url=url, api_key="", timeout=0.3, max_retries=0)
        report = evaluate_files(model, processor, files, config, output_dir=out, judge=judge)
    assert report["num_samples"] == 3
    assert report["consistency"] == {
        "rate": 1.0,
        "rate_unjudged_as_inconsistent": 1 / 3,
        "num_consistent": 1,
        "num_judged": 1,
        "num_unjudged": 2,
    }
    assert report["per_level"]["L1"]["consistency"]["num_unjudged"] == 1
    assert report["judge"]["url"] == url and report["judge"]["model"]
    verdicts = {json.loads(lines[i + 1])["key"]: v for i, v in enumerate(thinks)}
    assert len(verdicts) == 3 and len(received) == 3
    written = read_sample_records(samples)
    assert sorted(r["consistency"]["status"] for r in written.values()) == ["judged", "unjudged", "unjudged"]


def test_files_sharing_a_name_are_refused_and_repeats_run_once(bench, model, tmp_path):
    model, processor = model
    config = _config(bench)
    twin = tmp_path / "other" / Path(bench["files"][0]).name  # same name: its keys would collide
    twin.parent.mkdir()
    twin.write_text(Path(bench["files"][0]).read_text())
    with pytest.raises(ValueError, match="same name"):
        evaluate_files(model, processor, [bench["files"][0], str(twin)], config)
    report = evaluate_files(model, processor, [bench["files"][0]] * 2, config)
    assert list(report["files"]) == [bench["files"][0]] and report["num_samples"] == 2


def test_report_tables_from_records():
    def record(level, domain, correct, consistent):
        verdict = {"consistent": consistent, "status": "judged" if consistent is not None else "unjudged"}
        return {
            "level": level,
            "domain": domain,
            "correct": correct,
            "format_ok": True,
            "consistency": verdict,
        }

    records = [
        record("validation_L3", "Work", True, True),
        record("validation_L3", "Work", False, None),
        record("validation_L3", "Hobbies", True, False),
        record("validation_L1", "", False, True),
    ]
    config = GRPOCareConfig()
    report = build_report({"f": {"records": records, "num_skipped": 2}}, config, judge=OfflineJudge())
    l3 = report["per_level"]["L3"]
    assert l3["accuracy"] == pytest.approx(2 / 3) and l3["num_correct"] == 2
    assert l3["per_domain"]["Work"]["accuracy"] == 0.5 and l3["per_domain"]["Hobbies"]["accuracy"] == 1.0
    assert l3["consistency"]["rate"] == 0.5 and l3["consistency"]["num_unjudged"] == 1
    assert report["per_level"]["L1"]["accuracy"] == 0.0 and report["num_skipped"] == 2
    assert report["consistency"]["num_consistent"] == 2 and report["consistency"]["num_judged"] == 3
    assert [level_label(x) for x in ("validation_L1", "L2", "val-l3", "mmvu")] == ["L1", "L2", "L3", "mmvu"]


@pytest.mark.parametrize("style", ["paper", "short"])
def test_the_judge_gets_the_question_without_the_instructions(style):
    """An LLM judge is shown the question and its options only, whatever the prompt style."""
    from grpo_care.data import Sample, question_text
    from grpo_care.evaluate import _question

    question = "What next? Options:\nA. up\nB. down\n"
    for template in ("train", "eval"):
        sample = Sample(sample_id="1", text=question_text(question, template=template, prompt_style=style),
                        solution="<answer>A</answer>")
        assert _question(sample) == question
