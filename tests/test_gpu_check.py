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
    for phase in ("a1 peers", "a2 ours", "b ours", "c every Triton config", "d ours", "e profiler", "f1 GPU tests"):
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
            "ck_triton@d-verified", "ck_triton_cublas@d-verified"} <= providers, providers  # fmt: skip
    assert {r["case"] for r in records} == {"grpo_head", "dual", "fwd_bwd"}
    assert "dual pass vs two single passes (N=64, b-shipped)" in summary
    [record] = json.loads((out / "verified.json").read_text())["records"]
    assert record["arch"] == "interpreter" and set(record["passed"]) == {
        "forward 16-bit", "dlogits 16-bit", "forward fp32", "dlogits fp32", "slab stats", "slab dlogits"}  # fmt: skip
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
    }
    out = tmp_path / "verified.json"
    env = _env(CK_VERIFY_PLANT=";".join(f"{k}={v}" for k, v in plants.items()), TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, str(BENCH / "verify_configs.py"), "--toy", "--max-per-family", "1",
                           "--config-timeout-s", "30", "--workers", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # some configs failed
    [record] = json.loads(out.read_text())["records"]
    failed = {f"{family}/{label}": why for family, labels in record["failed"].items() for label, why in labels.items()}
    assert set(failed) == set(plants), failed
    assert "worker died" in failed["forward 16-bit/128x128x64 w8 s3 flat r128"]
    assert "no verdict within 30 s" in failed["dlogits 16-bit/128x128x64 w8 s2 persistent x2 tma r128"]
    assert "planted failure" in failed["forward fp32/64x64x32 w4 s3 flat"]
    assert "wrong results" in failed["slab stats/8x512 w4 s3"]
    assert record["passed"] == {"dlogits fp32": ["64x64x32 w4 s3"], "slab dlogits": ["16x256 w4 s3"]}
    assert "verified: 2 passed, 4 failed" in proc.stdout


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
