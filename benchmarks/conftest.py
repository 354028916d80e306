"""`pytest benchmarks/`: care_kernels against the peers, side by side, with ratios in the JSON.

Each test is one (case, provider, head, N, dtype). The `run_case` fixture times it with pytest-benchmark
(median of a few rounds), measures its peak memory (see memory.py), and stores in `extra_info`: the FLOP
formula and effective TFLOP/s, the peak extra memory, and the time / memory ratio to every other
provider of the same case and shape, and to the bare matmuls. Then `python benchmarks/report.py`.

Environment (besides those in shapes.py):
  CK_BENCH_BUDGET_S=780     wall-clock budget of the session: a test whose estimated time does not fit in
                            what is left is skipped with the reason (the CPU headline included)
  CK_BENCH_MEMORY=0         skip the memory measurement (no subprocesses on CPU)
  CK_BENCH_JSON=PATH|0      where the pytest-benchmark JSON goes when --benchmark-json is not given
                            (default .benchmarks/care_kernels-<device>.json; 0 = nowhere)
  CK_BENCH_JSONL=PATH       also append each finished result as a JSON line (survives a killed run)
  CK_BENCH_TAG=TEXT         record care_kernels' providers as "<provider>@TEXT", labelled "... [TEXT]" (one
                            provider measured under two settings in one report, e.g. gpu_check's phases)
  CK_BENCH_PICKS=PATH       after each test, append the Triton autotuner's and the logits GEMM strategy's new
                            picks, and any candidate dropped for failing, as JSON lines
  CK_BENCH_CASES, CK_BENCH_PROVIDERS   only these cases / providers (comma-separated; _params.py)
  CK_BENCH_WARMUP=N         untimed rounds before the timed ones (default: chosen from the case's cost)
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import devinfo  # noqa: E402
import memory  # noqa: E402
import providers  # noqa: E402
from ratios import add_ratios  # noqa: E402
from shapes import HEADS, Spec, batch_layout, device  # noqa: E402

_START = time.monotonic()
_RESULTS: dict[tuple, dict[str, dict]] = {}  # spec.key -> provider -> extra_info (the dict in the JSON)
_INFO = devinfo.info()


def _budget_s() -> float:
    return float(os.environ.get("CK_BENCH_BUDGET_S", "780"))


def _elapsed() -> float:
    return time.monotonic() - _START


# -------------------------------------------------------------------------------------------- pytest hooks


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "headline: the big CPU goal case, run when the time budget allows "
        "(CK_BENCH_HEADLINE=1 forces it, 0 skips it)",
    )
    target = os.environ.get("CK_BENCH_JSON", "")
    if getattr(config.option, "benchmark_json", None) is None and target != "0":
        root = Path(__file__).resolve().parent.parent
        path = Path(target) if target else root / ".benchmarks" / f"care_kernels-{_INFO['device_slug']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = path


def pytest_report_header(config):
    return (
        f"care_kernels benchmarks on {_INFO['device_name']}: torch {_INFO['torch']}, "
        f"triton {_INFO['triton']}, care_kernels {_INFO['care_kernels']}; budget {_budget_s():.0f} s"
    )


# The order cases run in: if the budget runs out, what is left out is the least informative.
_CASE_PRIORITY = (
    (
        "grpo_head",
        "forward",
        "dual",
        "fwd_bwd",
        "entropy",
        "group_advantages",
        "care_bonus",
        "answer_likelihood",
    )
    if torch.cuda.is_available()  # the GPU sweep's required cases first
    else (
        "grpo_head",
        "fwd_bwd",
        "forward",
        "dual",
        "entropy",
        "group_advantages",
        "care_bonus",
        "answer_likelihood",
    )
)


def pytest_collection_modifyitems(config, items):
    """Most informative cases first, the bare matmuls first within a case, the headline cases last."""

    def key(item):
        spec = getattr(getattr(item, "callspec", None), "params", {}).get("spec")
        if not isinstance(spec, Spec):  # none, or pytest's placeholder of an empty parameter set
            return (0, 0, 0, 0)
        case = _CASE_PRIORITY.index(spec.case) if spec.case in _CASE_PRIORITY else len(_CASE_PRIORITY)
        return (int(spec.headline), case, spec.n, providers.PROVIDERS[spec.provider].order)

    items.sort(key=key)


def pytest_sessionfinish(session, exitstatus):
    memory.close_server()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["care_kernels_bench"] = {**_INFO, "loadavg_end": devinfo.loadavg()}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["care_kernels_bench"] = {
        **_INFO,
        "loadavg_end": devinfo.loadavg(),
        "session_s": round(_elapsed(), 1),
        "budget_s": _budget_s(),
        "triton_autotuned": _autotuned_configs(),
        "dropped_candidates": _dropped_candidates(),
    }


def _autotuned_configs() -> list[dict]:
    """The Triton autotuner's picks in this session (tile, loop shape, warps, stages per kernel and key)."""
    if device().type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return []
    try:
        from care_kernels.losses import fused_head_chunks
        from care_kernels.triton import linear_logprobs
    except ImportError:  # a CUDA machine without Triton
        return []
    return linear_logprobs.autotuned_configs() + fused_head_chunks.picks()


def _dropped_candidates() -> list[dict]:
    try:
        from care_kernels.triton import tuning
    except ImportError:
        return []
    return tuning.dropped()


_PICKS_WRITTEN: set[str] = set()


def _append_picks(test: str) -> None:
    """New autotuner / strategy picks and dropped candidates since the last call, one JSON line each."""
    path = os.environ.get("CK_BENCH_PICKS")
    if not path:
        return
    entries = [{"type": "pick", **p} for p in _autotuned_configs()]
    entries += [{"type": "dropped", **d} for d in _dropped_candidates()]
    with open(path, "a") as fh:
        for entry in entries:
            ident = json.dumps(entry, sort_keys=True)
            if ident not in _PICKS_WRITTEN:
                _PICKS_WRITTEN.add(ident)
                fh.write(json.dumps({**entry, "after_test": test, "tag": os.environ.get("CK_BENCH_TAG", "")}) + "\n")


# -------------------------------------------------------------------------------------------- the fixture


def _estimate_run_s(spec: Spec) -> float:
    """Seconds for one run of `spec`, from what this session already measured."""
    same = _RESULTS.get(spec.key, {})
    if spec.provider in same:
        return same[spec.provider]["median_s"]
    # the same provider at a smaller N of the same case: scale linearly in N
    smaller = [
        (k[2], r[spec.provider]["median_s"])
        for k, r in _RESULTS.items()
        if k[0] == spec.case
        and k[1] == spec.head
        and k[3] == spec.dtype
        and k[2] < spec.n
        and spec.provider in r
    ]
    if smaller:
        n0, t0 = max(smaller)
        return t0 * spec.n / n0
    if "torch_mm" in same:
        return same["torch_mm"]["median_s"] * 2.5
    f = cases.flops(spec)
    if f is None:
        return 0.05
    rate = 3e14 if device().type == "cuda" else 1e11
    return 2.0 * f / rate


def _rounds(spec: Spec, est_s: float) -> tuple[int, int]:
    """(warmup rounds, timed rounds)."""
    forced = os.environ.get("CK_BENCH_ROUNDS")
    if os.environ.get("CK_BENCH_WARMUP"):
        return int(os.environ["CK_BENCH_WARMUP"]), int(forced or 1)
    compiles = providers.PROVIDERS[spec.provider].compiles
    if device().type == "cuda":  # warmup: Triton compiles and autotunes on the first calls
        return (2, int(forced or 5)) if est_s < 0.5 else (1, int(forced or 3))
    if spec.headline:
        return int(compiles), int(forced or 1)
    if est_s < 1.5:
        return 1, int(forced or 3)
    return int(compiles), int(forced or (2 if est_s < 4.0 else 1))


def _check_budget(spec: Spec, est_total_s: float) -> None:
    budget, elapsed = _budget_s(), _elapsed()
    if spec.headline:
        mode = os.environ.get("CK_BENCH_HEADLINE", "auto")
        if mode == "0":
            pytest.skip("headline case disabled (CK_BENCH_HEADLINE=0)")
        if mode == "1":
            return
        if elapsed + est_total_s > budget:
            pytest.skip(
                f"headline case needs ~{est_total_s:.0f} s, {budget - elapsed:.0f} s of the "
                f"{budget:.0f} s budget left; run it with CK_BENCH_HEADLINE=1"
            )
    elif elapsed + est_total_s > budget:
        pytest.skip(
            f"time budget: needs ~{est_total_s:.0f} s, {max(0.0, budget - elapsed):.0f} s of the "
            f"{budget:.0f} s left (CK_BENCH_BUDGET_S)"
        )


def _is_oom(exc: BaseException) -> bool:
    return (
        isinstance(exc, torch.cuda.OutOfMemoryError)
        or "can't allocate memory" in str(exc)
        or "out of memory" in str(exc).lower()
    )


def _update_ratios(key: tuple) -> None:
    """time / memory ratios of every provider of `key` to every other one and to the bare matmuls."""
    add_ratios(_RESULTS[key])


def _append_jsonl(info: dict) -> None:
    path = os.environ.get("CK_BENCH_JSONL")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({**info, "machine": {**_INFO, "loadavg_end": devinfo.loadavg()}}) + "\n")


def _sync():
    if device().type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def run_case(benchmark):
    """run_case(spec): time, measure and record one benchmark."""

    def run(spec: Spec):
        dev = device()
        prov = providers.PROVIDERS[spec.provider]
        ok, why = prov.available(spec.case, dev)
        if not ok:
            pytest.skip(f"{prov.label}: {why}")
        est = _estimate_run_s(spec)
        warmup, rounds = _rounds(spec, est)
        measure_memory = os.environ.get("CK_BENCH_MEMORY", "1") != "0"
        subprocess_mem = (
            measure_memory and dev.type == "cpu" and spec.provider not in ("torch_mm", "torch_mm_x4")
        )
        compile_s = 20.0 * (1 + subprocess_mem) if prov.compiles else 0.0
        # 1.5x: estimates come from smaller shapes or other providers, and the budget is a hard promise
        _check_budget(spec, 1.5 * (est * (warmup + rounds + subprocess_mem) + 2 * subprocess_mem + compile_s))

        benchmark.group = spec.group
        inputs = cases.make_inputs(spec, dev)
        built = providers.build(spec.provider, spec.case, inputs, dev)
        note = "; ".join(x for x in (built.note, providers.loader_note(spec.provider)) if x)
        durations: list[float] = []

        def target():
            t0 = time.perf_counter()
            out = built.run()
            _sync()
            durations.append(time.perf_counter() - t0)
            return out

        def setup():
            built.reset()
            _sync()

        oom = ""
        try:
            benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup)
            timed = durations[warmup:] or durations  # --benchmark-disable runs the target once
            median = statistics.median(timed)
            mem: dict = {}
            if built.analytic_bytes is not None:
                mem = {
                    "peak_extra_bytes": built.analytic_bytes,
                    "memory_method": "analytic (preallocated buffers)",
                }
            elif measure_memory and dev.type == "cuda":
                mem = memory.cuda_peak(built)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            # skip only after this block: the exception's frames hold the tensors that did not fit
            oom = f"{prov.label}: out of memory at {spec.group}"
        finally:
            built = inputs = None  # free the tensors before the next case
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if oom:
            pytest.skip(oom)
        if subprocess_mem:
            mem = memory.subprocess_peak(spec, timeout_s=max(120.0, 4 * median + 60))

        head = HEADS.get(spec.head)
        f = cases.flops(spec)
        b, t = batch_layout(spec.n) if head else (None, None)
        tag = os.environ.get("CK_BENCH_TAG", "") if prov.kind == "ours" else ""
        info = benchmark.extra_info
        info.update(
            {
                "case": spec.case,
                "provider": f"{spec.provider}@{tag}" if tag else spec.provider,
                "label": f"{prov.label} [{tag}]" if tag else prov.label,
                "tag": tag,
                "kind": prov.kind,
                "head": spec.head,
                "model": head.model if head else None,
                "H": head.hidden if head else None,
                "V": head.vocab if head else None,
                "N": spec.n,
                "B": b,
                "T": t,
                "dtype": spec.dtype,
                "device": dev.type,
                "device_name": _INFO["device_name"],
                "headline": spec.headline,
                "median_s": median,
                "min_s": min(timed),
                "rounds": len(timed),
                "warmup_rounds": warmup,
                "flops": f,
                "flop_formula": cases.flop_formula(spec),
                "tflops": (f / median / 1e12) if f else None,
                "note": note,
                **mem,
            }
        )
        _RESULTS.setdefault(spec.key, {})[spec.provider] = info
        _update_ratios(spec.key)
        _append_jsonl(info)
        _append_picks(str(spec))

    return run
