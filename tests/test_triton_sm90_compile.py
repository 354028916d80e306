"""Every GPU config the Triton launchers can pick compiles for Hopper (sm_90) the way its speed depends on.

Runs on any machine: Triton compiles for a named target with the ptxas it ships (care_kernels/triton/
sm90_report.py, also `python -m care_kernels.triton.sm90_report`). Speed is measured on a GPU only
(benchmarks/gpu_check.sh); this catches, on every CI run, a config that spills registers, asks for more
shared memory than an SM has, whose main loop is no longer software-pipelined, or that asks for warp
specialization and does not get it. The compiles run in a subprocess: this process runs the kernels under
TRITON_INTERPRET, which cannot compile them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HOPPER_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on an H100/H200
# fp32 configs (exact fp32 products on CUDA-core FMAs) are not the fast path: Triton 3.6 spills 8-16 bytes
# per thread in the 64x64 forward, Triton 3.8 nothing.
FP32_SPILL_BYTES_ALLOWED = 32
# Configs per kernel and operand dtype in the launchers' lists: a list that changes must be looked at here.
# With a bias, the forward's configs that spill with one are pruned (linear_logprobs.spills_with_bias): 6 of 18
# (9, and each with the target logits gathered).
EXPECTED_CONFIGS = {"forward bf16": 18, "forward dual bf16": 18, "forward fp32": 4, "forward dual fp32": 4,
                    "forward bf16 bias": 12, "forward dual bf16 bias": 12, "forward fp32 bias": 4,
                    "forward dual fp32 bias": 4, "dlogits bf16": 8, "dlogits fp32": 3,
                    "matmul-accumulate bf16": 1, "slab stats fp32": 4, "slab stats fp32 bias": 4,
                    "slab dlogits fp32": 4, "slab stats bf16": 4, "slab stats bf16 bias": 4,
                    "slab dlogits bf16": 4, "row probs bf16": 4, "row probs bf16 entropy": 4}  # fmt: skip


def _compile_in_subprocess(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "care_kernels.triton.sm90_report", "--json", *args],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def reports() -> dict:
    return _compile_in_subprocess()


def test_every_shipped_config_is_reported(reports):
    kernels = [r["kernel"] for r in reports.values()]
    assert {k: kernels.count(k) for k in set(kernels)} == EXPECTED_CONFIGS


def test_configs_compile_for_hopper_pipelined_without_spills(reports):
    problems = []
    for label, r in reports.items():
        if r["kernel"].startswith(("slab ", "row ")):  # passes over a slab or a row buffer (no GEMM): registers only
            if r["spill_bytes"] or r["warp_specialized"] or r["scratch_bytes"]:
                problems.append(f"{label}: {r}")
            continue
        if not r["pipelined"]:
            problems.append(f"{label}: main loop not software-pipelined")
        if r["tma"] != (" tma" in label):
            problems.append(f"{label}: {'no ' if not r['tma'] else ''}TMA copies in the compiled kernel")
        if r["warp_specialized"] != (" ws" in label):
            problems.append(f"{label}: {'not ' if not r['warp_specialized'] else ''}warp-specialized")
        if r["scratch_bytes"] != (256 if " ws" in label else 0):  # two in-kernel descriptors, 128 B each
            problems.append(f"{label}: {r['scratch_bytes']} B of global scratch per program")
        if r["shared_bytes"] > HOPPER_SHARED_BYTES:
            problems.append(f"{label}: {r['shared_bytes']} B of shared memory")
        if " fp32" in r["kernel"]:
            if r["spill_bytes"] > FP32_SPILL_BYTES_ALLOWED:
                problems.append(f"{label}: spills {r['spill_bytes']} B per thread")
        else:
            if r["spill_bytes"]:
                problems.append(f"{label}: spills {r['spill_bytes']} B per thread")
            if not r["wgmma"]:
                problems.append(f"{label}: 16-bit operands without Hopper tensor-core (wgmma) instructions")
    assert not problems, "\n".join(problems)


def test_report_sees_an_unpipelined_loop():
    """The pipelining check can fail: with one stage nothing is in flight, and the report says so (cp.async and
    TMA configs alike)."""
    reports = _compile_in_subprocess("--stages", "1", "--only", "forward bf16")
    assert any(" tma" in label for label in reports) and any(" nested" in label for label in reports)
    assert all(not r["pipelined"] and r["wgmma"] for r in reports.values())
