"""benchmarks/gpu_check.sh's control flow, on a CPU: the dry run walks every phase at toy sizes, the config
verification survives a config that crashes, hangs, raises or computes wrong results, and the key-numbers summary
states each goal as measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CK_", "CARE_KERNELS_"))}
    return {**env, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **extra}


def test_the_scripts_parse_and_explain_themselves():
    for script in ("gpu_check.sh", "fetch_wheels.sh"):
        subprocess.run(["bash", "-n", str(BENCH / script)], check=True)
        out = subprocess.run(["bash", str(BENCH / script), "--help"], capture_output=True, text=True, check=True)
        assert "carry" in out.stdout, script
    bad = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


@pytest.mark.slow
def test_dry_run_walks_every_phase(tmp_path):
    """The whole script at toy sizes (the Triton kernels under the interpreter): every phase runs and writes its
    part to OUT, the key numbers come first, and at most 8 files come back."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=_env(OUT=str(out), CK_GPU_CHECK_S="500"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    log = (out / "log.txt").read_text()
    assert summary.startswith("--- key numbers (all phases)"), summary[:500]
    for phase in ("a1 peers", "a2 ours", "b ours", "c every Triton config and code path", "d ours", "e profiler",
                  "f1 GPU tests"):  # fmt: skip
        line = next((ln for ln in summary.splitlines() if ln.startswith(phase)), None)
        assert line is not None and ": ok," in line, f"{phase}: {line}\n{log[-3000:]}"
    assert "f2 extension build: SKIPPED (dry run" in summary
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "summary.txt",
            "log.txt",
            "bench.jsonl",
            "picks.jsonl",
            "verified.json",
            "profile.txt",
            "tests.log",
            "results.tar.gz",
        ]  # fmt: skip
    )
    records = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    providers = {r["provider"] for r in records}
    assert {"torch_mm", "torch_mm_x4", "ck_fused", "ck_triton@b-shipped", "ck_triton_x2@b-shipped",
            "ck_triton@d-verified", "ck_triton_cublas@d-verified", "ck_fused@d-verified",
            "ck_fused_trainer@d-verified"} <= providers, providers  # fmt: skip
    assert {r["case"] for r in records} == {"grpo_head", "dual", "fwd_bwd"}
    assert "dual pass vs two single passes (N=64, b-shipped)" in summary
    [record] = json.loads((out / "verified.json").read_text())["records"]
    assert record["arch"] == "interpreter" and set(record["passed"]) == {
        "forward 16-bit", "dlogits 16-bit", "forward fp32", "dlogits fp32", "slab stats", "slab dlogits",
        "row pass"}  # fmt: skip
    # --max-per-family 1: the paths passed their own checks, but their passes' other configs were not run
    assert set(record["not_checked"]["logits GEMM strategy"]) == {"cublas", "cublas16"}
    assert "one_sweep" in record["not_checked"]["fused head variant"]
    assert set(record["fingerprints"]) == {"configs", "logits GEMM strategy", "fused head variant"}
    assert "held back: logits GEMM strategy/cublas" in summary
    profile = (out / "profile.txt").read_text()
    assert "care_kernels impl=triton (ck_triton)" in profile and "FusedLinearGRPOLoss (ck_fused)" in profile


@pytest.mark.slow
def test_config_verification_survives_crashes_hangs_errors_and_wrong_results(tmp_path):
    """Planted failures, one per family: each config is failed with what happened, the others still pass."""
    sys.path.insert(0, str(BENCH))
    plants = {
        "forward 16-bit/128x128x64 w8 s3 flat r128": "crash",
        "dlogits 16-bit/128x128x64 w8 s2 persistent x2 tma r128": "hang",
        "forward fp32/64x64x32 w4 s3 flat": "raise",
        "slab stats/8x512 w4 s3": "wrong",
        "fused head variant/one_sweep": "wrong",
    }
    out = tmp_path / "verified.json"
    env = _env(CK_VERIFY_PLANT=";".join(f"{k}={v}" for k, v in plants.items()), TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, str(BENCH / "verify_configs.py"), "--toy", "--max-per-family", "1",
                           "--config-timeout-s", "30", "--workers", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # some configs failed
    [record] = json.loads(out.read_text())["records"]
    failed = {f"{family}/{label}": why for family, labels in record["failed"].items() for label, why in labels.items()}
    # the cuBLAS strategy passed its own checks, but a slab config it may run failed
    assert set(failed) == {*plants, "logits GEMM strategy/cublas"}, failed
    assert "worker died" in failed["forward 16-bit/128x128x64 w8 s3 flat r128"]
    assert "no verdict within 30 s" in failed["dlogits 16-bit/128x128x64 w8 s2 persistent x2 tma r128"]
    assert "planted failure" in failed["forward fp32/64x64x32 w4 s3 flat"]
    assert "wrong results" in failed["slab stats/8x512 w4 s3"]
    assert "wrong results" in failed["fused head variant/one_sweep"]
    assert "logprobs" in failed["fused head variant/one_sweep"]
    assert "slab stats/8x512 w4 s3" in failed["logits GEMM strategy/cublas"]
    assert record["passed"] == {"dlogits fp32": ["64x64x32 w4 s3"], "slab dlogits": ["16x256 w4 s3"],
                                "row pass": ["4096 x1/SM w8 s3"]}  # fmt: skip
    assert "verified: 4 passed, 5 failed" in proc.stdout


def test_a_path_is_recorded_as_passed_only_with_every_config_it_may_run(monkeypatch):
    """verify_configs' record: a strategy or head variant whose own checks passed counts as passed only when every
    config of the passes its autotuner may pick (slab passes; the row pass) passed too; the always-on two-sweep loop
    runs none of them."""
    sys.path.insert(0, str(BENCH))
    import verify_configs

    all_jobs = verify_configs.jobs()
    index = {job: i for i, job in enumerate(all_jobs)}
    strategy, head = ("logits GEMM strategy", "cublas16"), ("fused head variant", "one_sweep")
    for family, label in all_jobs:
        assert family in ("logits GEMM strategy", "fused head variant") or verify_configs._config(family, label)
    assert index[strategy] < min(i for (f, _), i in index.items() if f.startswith("slab")), "gated paths first"

    def record(status_of):
        verdicts = {i: {"status": status_of(job), "detail": "planted"} for i, job in enumerate(all_jobs)}
        return verify_configs._record(verdicts, all_jobs, True, {})["records"][0]

    everything = record(lambda job: "passed")
    assert strategy[1] in everything["passed"][strategy[0]] and head[1] in everything["passed"][head[0]]
    assert everything["held_back"] == []
    slab_failed = record(lambda job: "failed" if job == ("slab dlogits", "8x256 w4 s3") else "passed")
    assert strategy[0] not in slab_failed["passed"], "no strategy left passed"
    assert "slab dlogits/8x256 w4 s3" in slab_failed["failed"][strategy[0]][strategy[1]]
    assert head[1] in slab_failed["passed"][head[0]], "the head variants run no slab pass"
    row_unchecked = record(lambda job: "not run" if job[0] == "row pass" else "passed")
    assert row_unchecked["passed"][head[0]] == ["two_sweeps"], "always-on: no row pass"
    assert set(row_unchecked["not_checked"][head[0]]) == {"one_sweep", "one_sweep_tall"}
    assert "4 configs it may run unchecked" in " ".join(row_unchecked["held_back"])


def test_key_numbers_state_each_goal_as_measured(tmp_path):
    sys.path.insert(0, str(BENCH))
    import key_numbers

    def rec(case, provider, ms, peak=None, label=None):
        return {"case": case, "head": "h", "N": 16384, "dtype": "bfloat16", "provider": provider,
                "label": label or provider, "median_s": ms / 1e3, "tflops": 1.0, "peak_extra_bytes": peak}  # fmt: skip

    records = [
        rec("grpo_head", "trl_chunked", 142.5, 3 << 30),
        rec("grpo_head", "liger_triton", 107.2, 6 << 30),
        rec("grpo_head", "ck_fused", 100.0, 4 << 30),
        rec("grpo_head", "ck_triton@b-shipped", 147.1, 2 << 30),
        rec("grpo_head", "ck_triton@d-verified", 140.0, 4 << 30),
        rec("dual", "ck_triton@b-shipped", 50.0),
        rec("dual", "ck_triton_x2@b-shipped", 60.0),
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n{cut by a kill")
    lines = key_numbers.goals(key_numbers._load(path))
    text = "\n".join(lines)
    assert "autograd GRPO head vs TRL ChunkedLogProbFunction (N=16384, b-shipped): 147.1 vs 142.5 ms" in text
    assert next(ln for ln in lines if "b-shipped" in ln and "TRL" in ln).endswith("not met")
    assert next(ln for ln in lines if "d-verified" in ln).endswith("not met"), "faster, but more memory"
    assert next(ln for ln in lines if "fused loss" in ln).endswith("MET")
    assert next(ln for ln in lines if "dual pass" in ln).endswith("MET")
    assert "grpo_head h N=16384 bfloat16:" in "\n".join(key_numbers.tables(key_numbers._load(path)))
