"""Safe by default: a failing candidate (Triton config or logits GEMM strategy) is dropped, never the user's call;
configs never verified on a GPU are opt-in (care_kernels.triton.verified); tuning results outlive the process.

Without CUDA the kernels run under the Triton interpreter (conftest), the autotuner with a fake benchmarker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import types

import pytest
import torch
import triton
import triton.language as tl

import care_kernels as ck
from care_kernels.triton import cublas_logits, logits_gemm, tuning, verified
from care_kernels.triton import linear_logprobs as tlp


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    """No drops, picks or records left over from other tests; only the records a test writes count."""
    monkeypatch.setattr(tuning, "_DROPPED", {})
    monkeypatch.setattr(logits_gemm, "_picks", {})
    monkeypatch.setattr(logits_gemm, "_timings", {})
    monkeypatch.delenv(verified.MODE_ENV, raising=False)
    monkeypatch.delenv(verified.EXTRA_ENV, raising=False)


# ------------------------------------------------------------------------------ SafeAutotuner, fake candidates


@triton.jit
def _fill_kernel(out_ptr, value, n, BLOCK: tl.constexpr, BAD: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if BAD:  # a config whose kernel cannot be built: arange needs a power-of-2 range
        offs = tl.arange(0, 3)
    tl.store(out_ptr + offs, value, mask=offs < n)


def _raising_pre_hook(nargs):
    raise RuntimeError("this config's pre_hook fails")


def _configs():
    broken_hook = triton.Config({"BLOCK": 16, "BAD": False}, pre_hook=_raising_pre_hook)
    good = triton.Config({"BLOCK": 32, "BAD": False})
    broken_kernel = triton.Config({"BLOCK": 64, "BAD": True})
    return [broken_hook, good, broken_kernel]


def _bench(calls: list):
    """A benchmarker that runs the candidate once and reports 1 ms for every one that runs."""

    def do_bench(kernel_call, quantiles):
        calls.append(1)
        kernel_call()
        return [1.0, 1.0, 1.0]

    return do_bench


def test_a_candidate_config_that_raises_is_dropped_and_the_call_succeeds(caplog):
    calls: list = []
    configs = _configs()
    tuner = tuning.autotune(configs, key=["n"], do_bench=_bench(calls))(_fill_kernel)
    out = torch.zeros(32)
    with caplog.at_level(logging.WARNING, logger="care_kernels"):
        tuner[(1,)](out, 2.5, 20)
    assert torch.equal(out, torch.tensor([2.5] * 20 + [0.0] * 12)), "the good config ran"
    assert tuner.cache[(20, "torch.float32")] is configs[1]
    assert tuner.configs_timings[configs[0]][0] == math.inf and tuner.configs_timings[configs[2]][0] == math.inf
    dropped = tuning.dropped()
    assert [d["candidate"] for d in dropped] == [tuning.describe(configs[0]), tuning.describe(configs[2])]
    assert "pre_hook fails" in dropped[0]["error"] and "_fill_kernel" in dropped[0]["where"]
    assert len(caplog.records) == 2 and "BLOCK: 16" in caplog.records[0].getMessage()
    # another key tunes again: the same failures are not logged twice
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="care_kernels"):
        tuner[(1,)](out, 1.0, 7)
    assert tuner.cache[(7, "torch.float32")] is configs[1] and caplog.records == []


def test_tuning_results_are_kept_across_processes_with_their_pre_hooks(monkeypatch, tmp_path):
    """A second tuner (as in a new process) over the same kernel, key and candidates takes the pick from the disk:
    no benchmarking, and the very config object of its own list (a pre_hook survives)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    hooked: list = []

    def make(calls):
        configs = [triton.Config({"BLOCK": 16, "BAD": False}), triton.Config({"BLOCK": 32, "BAD": False}),
                   triton.Config({"BLOCK": 64, "BAD": True})]  # fmt: skip
        configs[1].pre_hook = lambda nargs: hooked.append(nargs["BLOCK"])
        timings = iter([2.0, 1.0])

        def do_bench(kernel_call, quantiles):
            calls.append(1)
            kernel_call()
            return [next(timings)] * 3

        tuner = tuning.autotune(configs, key=["n"], do_bench=do_bench)(_fill_kernel)
        tuner.cache_results = True  # the interpreter turns it off; the disk cache itself does not care
        return tuner, configs

    first_calls, second_calls = [], []
    first, _ = make(first_calls)
    first[(1,)](torch.zeros(32), 1.0, 20)
    assert len(first_calls) == 3, "benchmarked (the third candidate fails in it)"
    assert list(tmp_path.rglob("*.care_kernels_autotune.json"))
    second, configs = make(second_calls)
    hooked.clear()
    out = torch.zeros(32)
    second[(1,)](out, 3.0, 20)
    assert second_calls == [], "taken from the disk, not benchmarked"
    assert second.cache[(20, "torch.float32")] is configs[1] and hooked == [32], (
        "the pick is the list's own config, pre_hook included"
    )
    assert second.configs_timings[configs[2]][0] == math.inf and out[:20].eq(3.0).all()
    monkeypatch.setenv(tuning.CACHE_ENV, "0")
    third_calls: list = []
    third, _ = make(third_calls)
    third[(1,)](out, 3.0, 20)
    assert len(third_calls) == 3, "CARE_KERNELS_AUTOTUNE_CACHE=0: tuned afresh"


def test_shipped_tuners_are_safe_and_cache_on_disk():
    tuners = tlp._tuners()
    assert tuners and all(isinstance(t, tuning.SafeAutotuner) for t in tuners.values())


# ------------------------------------------------------------------------------ logits GEMM strategies


def _fake_events(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", lambda **_: types.SimpleNamespace(
        record=lambda: None, synchronize=lambda: None, elapsed_time=lambda _end: 1.0))  # fmt: skip


def test_a_strategy_that_raises_while_timed_is_dropped_and_logged_once(monkeypatch, caplog):
    _fake_events(monkeypatch)
    monkeypatch.setenv(verified.MODE_ENV, "all")  # every strategy offered, as where a record verified them

    def broken():
        raise RuntimeError("cuBLAS said no")

    key = ("forward", 3584, None, 152064, 2, 15, False, True, False, False, "torch.bfloat16", "cuda:0")
    with caplog.at_level(logging.WARNING, logger="care_kernels"):
        assert logits_gemm.choose(key, {"fused": lambda: "ok", "cublas": broken}, tune=True) == "fused"
        other = (*key[:5], 12, *key[6:])
        assert logits_gemm.choose(other, {"fused": lambda: "ok", "cublas": broken}, tune=True) == "fused"
    assert logits_gemm.picks()[0]["timings_ms"] == {"fused": 1.0, "cublas": math.inf}
    assert [d["candidate"] for d in tuning.dropped()] == ["cublas", "cublas"]  # one per key
    assert "cuBLAS said no" in tuning.dropped()[0]["error"] and "N_BITS" in tuning.dropped()[0]["where"]
    assert len(caplog.records) == 2
    with pytest.raises(RuntimeError, match="cuBLAS said no"):  # every strategy fails: the first one's error
        logits_gemm.choose(("forward", "k"), {"cublas": broken, "fused": broken}, tune=True)


def test_a_call_whose_strategy_raises_runs_the_next_one(monkeypatch):
    ran = []

    def broken():
        ran.append("cublas")
        raise RuntimeError("illegal instruction")

    candidates = {"fused": lambda: ran.append("fused") or "fused result", "cublas": broken}
    monkeypatch.setenv(verified.MODE_ENV, "all")  # every strategy offered, as where a record verified them
    key = ("backward", "k")
    monkeypatch.setitem(logits_gemm._picks, key, "cublas")  # as if cublas had won the timing
    assert tlp._run_chosen(key, candidates, 10, torch.device("cpu")) == "fused result"
    assert ran == ["cublas", "fused"]
    assert tlp._run_chosen(key, candidates, 10, torch.device("cpu")) == "fused result"
    assert ran == ["cublas", "fused", "fused"], "the key keeps the strategy that works"
    # out of memory: this call falls back, the key keeps its pick (another shape of the key may fit)
    oom_key = ("forward", "k")
    monkeypatch.setitem(logits_gemm._picks, oom_key, "cublas")
    candidates["cublas"] = lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("the slab"))
    assert tlp._run_chosen(oom_key, candidates, 10, torch.device("cpu")) == "fused result"
    assert logits_gemm._picks[oom_key] == "cublas"
    # every strategy fails: the caller gets the error
    candidates["fused"] = broken
    with pytest.raises(RuntimeError, match="illegal instruction"):
        tlp._run_chosen(("forward", "k3"), candidates, 10, torch.device("cpu"))


def test_the_public_op_survives_a_failing_strategy(device, monkeypatch):
    """ck.linear_logprobs with the cuBLAS strategy forced, whose forward and backward both raise: the fused
    kernels answer, with the fused kernels' values and gradients."""
    if device.type == "cuda":
        pytest.skip("forces a failure into the strategy under the interpreter; the GPU runs the real ones")

    def fail(*args, **kwargs):
        raise RuntimeError("planted failure")

    hidden = torch.randn(7, 16).bfloat16()
    weight = (torch.randn(300, 16) / 4).bfloat16()
    targets = torch.randint(0, 300, (7,))
    results = {}
    for name in ("fused", "cublas"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with logits_gemm.use(name):
            if name == "cublas":
                monkeypatch.setattr(cublas_logits, "partial_stats", fail)
                monkeypatch.setattr(cublas_logits, "dlogits_", fail)
            lp = ck.linear_logprobs(h, w, targets, impl="triton")
            lp.sum().backward()
        results[name] = (lp, h.grad, w.grad)
    for got, want in zip(results["cublas"], results["fused"]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert {d["candidate"] for d in tuning.dropped()} == {"cublas"} and len(tuning.dropped()) == 2


# ------------------------------------------------------------------------------ verification records


def _write_records(path, records):
    path.write_text(json.dumps({"format": verified.FORMAT, "records": records}))
    return path


def _record(arch="sm_90", passed=None, failed=None, **overrides):
    """A record of this Triton and these sources (every group's fingerprint; kernel_fingerprint= overrides the
    configs' one, fingerprints= all of them)."""
    fingerprints = {
        **verified.fingerprints(),
        verified.CONFIGS: overrides.get("kernel_fingerprint", verified.kernel_fingerprint()),
    }
    return {"arch": arch, "device": "NVIDIA H200", "triton": triton.__version__, "torch": torch.__version__,
            "kernel_fingerprint": verified.kernel_fingerprint(), "fingerprints": fingerprints,
            "passed": passed or {}, "failed": failed or {}, **overrides}  # fmt: skip


def _fake_tensor():
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)


def test_configs_never_run_on_a_gpu_are_off_until_a_record_says_they_passed_there(monkeypatch, tmp_path):
    monkeypatch.setattr(verified, "device_arch", lambda device: "sm_90")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device: (9, 0))
    configs = tlp._FWD_CONFIGS_16_TMA
    args = {"h_ptr": _fake_tensor(), "ref_h_ptr": _fake_tensor()}
    baseline = [c for c in configs if not verified.needs_verification(c)]
    assert baseline == configs[:3] and all(not c.kwargs["USE_TMA"] and c.maxnreg is None for c in baseline)
    assert tlp._prune_configs(configs, args, DUAL=False) == baseline, "no record: the always-on configs only"

    flat_tma = next(c for c in configs if c.kwargs["FLAT_LOOP"] and c.kwargs["USE_TMA"] and c.maxnreg)
    ws = [c for c in configs if c.kwargs["WARP_SPECIALIZE"]]
    labels = [tlp.config_label(c) for c in (flat_tma, *ws)]
    path = _write_records(tmp_path / "verified.json", [_record(passed={"forward 16-bit": labels})])
    monkeypatch.setenv(verified.EXTRA_ENV, str(path))
    assert tlp._prune_configs(configs, args, DUAL=False) == [*baseline, flat_tma, *ws]
    assert tlp._prune_configs(tlp._BWD_CONFIGS_16_TMA, args) == tlp._BWD_CONFIGS_16, "another family: not verified"
    # on another architecture, with another Triton, or for other kernels, the record does not count
    for other in (_record(arch="sm_100"), _record(triton="2.9.0"), _record(kernel_fingerprint="0" * 64)):
        other["passed"] = {"forward 16-bit": labels}
        _write_records(path, [other])
        assert tlp._prune_configs(configs, args, DUAL=False) == baseline, other
    # a failure in any counting record keeps the config off
    _write_records(path, [_record(passed={"forward 16-bit": labels}),
                          _record(failed={"forward 16-bit": {labels[1]: "wrong logprobs"}})])  # fmt: skip
    assert tlp._prune_configs(configs, args, DUAL=False) == [*baseline, flat_tma, *ws[1:]]
    # the whole list on request, or the always-on ones alone
    monkeypatch.setenv(verified.MODE_ENV, "all")
    assert tlp._prune_configs(configs, args, DUAL=False) == configs
    monkeypatch.setenv(verified.MODE_ENV, "baseline")
    assert tlp._prune_configs(configs, args, DUAL=False) == baseline
    monkeypatch.setenv(verified.MODE_ENV, "everything")
    with pytest.raises(ValueError, match="verified, all, baseline"):
        tlp._prune_configs(configs, args, DUAL=False)


def test_descriptors_are_built_only_when_a_host_tma_config_may_run(monkeypatch):
    """A tuner whose TMA configs are all off here launches without host descriptors (no per-call descriptor
    building, one compile fewer)."""
    monkeypatch.setattr(tlp, "_INTERPRET", False)
    monkeypatch.setattr(tlp.tma, "usable", lambda *t, interpret: True)
    monkeypatch.setattr(verified, "device_arch", lambda device: "sm_90")
    hidden, weight = torch.zeros(4096, 64, dtype=torch.bfloat16), torch.zeros(1000, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(tlp.tma, "ensure_scratch_allocator", lambda: None)
    plan = tlp._plan_launch(tlp.linear_logprob_stats_kernel, tlp._FWD_LISTS, {}, 2, hidden, weight)
    assert plan[0] is tlp._fwd_tuned_16_tma and plan[4] is False
    monkeypatch.setenv(verified.MODE_ENV, "all")
    assert tlp._plan_launch(tlp.linear_logprob_stats_kernel, tlp._FWD_LISTS, {}, 2, hidden, weight)[4] is True


def test_the_fingerprint_follows_the_code_not_its_comments_or_docstrings():
    code = 'def f(x):\n    """Doc with é."""\n    y = x + 1  # a comment with ü\n    return y\n'
    same = 'def f(x):\n    """Another doc."""\n\n    y = x + 1\n    return y   \n'
    other = 'def f(x):\n    """Doc with é."""\n    y = x + 2  # a comment with ü\n    return y\n'
    assert verified._code_only(code) == verified._code_only(same) == "def f(x):\n    y = x + 1\n    return y"
    assert verified._code_only(other) != verified._code_only(code)
    assert len(verified.kernel_fingerprint()) == 64


def test_the_committed_records_are_well_formed_and_name_shipped_configs():
    """Every record in the package's file has the fields the gate reads and names only shipped configs (a
    renamed config would silently lose its verdict); records of older kernels are kept for history only."""
    records = verified.load_records([verified.RECORDS_FILE])
    families = {family: {tlp.config_label(c) for c in configs} for family, configs in tlp.config_families().items()}
    for record in records:
        assert {"arch", "triton", "kernel_fingerprint", "passed", "failed"} <= set(record)
        if record["kernel_fingerprint"] != verified.kernel_fingerprint():
            continue
        for family, labels in record["passed"].items():
            if family in families:
                assert set(labels) <= families[family], (family, set(labels) - families[family])
            if family in verified.PATHS and verified.record_fingerprint(record, family) == verified.fingerprint(family):
                assert set(labels) <= set(verified.PATHS[family]), (family, labels)


def test_the_status_and_merge_commands(monkeypatch, tmp_path, capsys):
    assert verified.main(["--arch", "sm_90"]) == 0
    status = capsys.readouterr().out
    assert "128x128x64 w4 s4 nested tma ws" in status and "off (no record for this GPU)" in status
    assert "on (always)" in status
    into = tmp_path / "records.json"
    new = _write_records(tmp_path / "new.json", [_record(passed={"forward 16-bit": ["128x256x64 w8 s3 flat"]})])
    assert verified.main(["--add", str(new), "--into", str(into)]) == 0
    assert verified.main(["--add", str(new), "--into", str(into)]) == 0  # the same run again replaces it
    assert len(json.loads(into.read_text())["records"]) == 1
    monkeypatch.setenv(verified.EXTRA_ENV, str(into))
    assert verified.main(["--arch", "sm_90"]) == 0
    assert "128x256x64 w8 s3 flat                    on (verified)" in capsys.readouterr().out


def test_the_status_lists_the_code_paths_by_family(monkeypatch, tmp_path, capsys):
    path = _write_records(tmp_path / "verified.json", [_record(passed={verified.STRATEGY_FAMILY: ["cublas16"]})])
    monkeypatch.setenv(verified.EXTRA_ENV, str(path))
    assert verified.main(["--arch", "sm_90"]) == 0
    status = capsys.readouterr().out
    for line in ("fused                                    on (always)",
                 "cublas                                   off (no record for this GPU)",
                 "cublas16                                 on (verified)",
                 "two_sweeps                               on (always)",
                 "one_sweep_tall                           off (no record for this GPU)"):  # fmt: skip
        assert line in status, status


# ------------------------------------------------------------------------------ strategies never run on a GPU


def _timed_strategies(monkeypatch, times: dict) -> list:
    """choose() on a fake sm_90 GPU, with fake timings: returns the strategies timed, in order."""
    monkeypatch.setattr(verified, "device_arch", lambda device: "sm_90" if device.type == "cuda" else None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    ran: list = []
    monkeypatch.setattr(logits_gemm, "_median_ms", lambda run: ran.append(run()) or times[ran[-1]])
    return ran


_STRATEGIES = ("fused", "cublas", "cublas16")
_CUDA = torch.device("cuda", 0)


def _choose(key, names=_STRATEGIES, **kwargs):
    kwargs.setdefault("device", _CUDA)
    return logits_gemm.choose(key, {n: (lambda n=n: n) for n in names}, tune=True, **kwargs)


def test_strategies_never_run_on_a_gpu_are_off_until_a_record_says_they_passed_there(monkeypatch, tmp_path):
    """cublas and cublas16 ran on no GPU (benchmarks/results/nvidia-h200 predates them): `auto` times and picks them
    only where a counting record passed them, however fast; a forced strategy runs regardless."""
    ran = _timed_strategies(monkeypatch, {"fused": 3.0, "cublas": 2.0, "cublas16": 1.0})
    assert _choose(("forward", 1)) == "fused" and ran == [], "no record: the fused kernels, nothing timed"
    path = tmp_path / "verified.json"
    monkeypatch.setenv(verified.EXTRA_ENV, str(path))
    _write_records(path, [_record(passed={verified.STRATEGY_FAMILY: ["cublas"]})])
    assert _choose(("forward", 2)) == "cublas" and ran == ["fused", "cublas"], "cublas16: not verified"
    assert _choose(("forward", 3), device=torch.device("cpu")) == "fused", "off a GPU: no record counts"
    # a record of another arch, Triton, or strategy sources, or one that names only the configs' sources (written
    # before the strategies were gated) does not count
    stale = {**verified.fingerprints(), verified.STRATEGY_FAMILY: "0" * 64}
    old_format = {k: v for k, v in _record().items() if k != "fingerprints"}
    for other in (_record(arch="sm_100"), _record(triton="2.9.0"), _record(fingerprints=stale), old_format):
        other["passed"] = {verified.STRATEGY_FAMILY: ["cublas", "cublas16"]}
        _write_records(path, [other])
        ran.clear()
        assert _choose(("forward", id(other))) == "fused" and ran == [], other
    # a config edit (the configs' sources) leaves the strategies' verdicts standing, and the reverse
    configs_edited = {**verified.fingerprints(), verified.CONFIGS: "0" * 64}
    _write_records(path, [_record(passed={verified.STRATEGY_FAMILY: ["cublas16"]}, fingerprints=configs_edited)])
    assert _choose(("forward", 4)) == "cublas16"
    # a failure in any counting record keeps it off
    _write_records(path, [_record(passed={verified.STRATEGY_FAMILY: ["cublas", "cublas16"]}),
                          _record(failed={verified.STRATEGY_FAMILY: {"cublas16": "wrong grad_weight"}})])  # fmt: skip
    assert _choose(("forward", 5)) == "cublas"
    # forced: runs whatever the records say; the whole list on request, or the always-on one alone
    with logits_gemm.use("cublas16"):
        assert _choose(("forward", 6)) == "cublas16"
    monkeypatch.setenv(logits_gemm.ENV, "cublas16")
    assert _choose(("backward", 6)) == "cublas16"
    monkeypatch.delenv(logits_gemm.ENV)
    monkeypatch.setenv(verified.MODE_ENV, "all")
    assert _choose(("forward", 7)) == "cublas16"
    monkeypatch.setenv(verified.MODE_ENV, "baseline")
    assert _choose(("forward", 8)) == "fused"


def test_a_failing_strategy_falls_back_only_to_one_auto_may_choose(monkeypatch):
    """With no record: a forced cublas16 that raises hands the call to the fused kernels, never to the unverified
    cublas; a failing fused call has nothing to fall back to (the caller gets its error)."""
    _timed_strategies(monkeypatch, {})
    candidates = {n: (lambda n=n: n) for n in _STRATEGIES}
    assert logits_gemm.fall_back(("backward", 1), candidates, ["cublas16"], RuntimeError("x"), _CUDA) == "fused"
    assert logits_gemm.fall_back(("backward", 2), candidates, ["fused"], RuntimeError("x"), _CUDA) is None
    monkeypatch.setenv(verified.MODE_ENV, "all")
    assert logits_gemm.fall_back(("backward", 3), candidates, ["fused"], RuntimeError("x"), _CUDA) == "cublas"


def test_a_forward_that_falls_back_pins_the_precision_it_ran_at(monkeypatch):
    """A forward forced to cublas16 (16-bit logits) that raises runs the fused kernels (fp32 logits): its backward
    must then read fp32 logits too, not the 16-bit ones the forced forward pinned."""
    _timed_strategies(monkeypatch, {"fused": 3.0, "cublas": 2.0, "cublas16": 1.0})
    shape = ("shape",)
    with logits_gemm.use("cublas16"):
        assert _choose(("forward", 1), precision_key=shape) == "cublas16"
    assert logits_gemm._pinned[shape] == "16-bit"
    candidates = {n: (lambda n=n: n) for n in _STRATEGIES}
    assert logits_gemm.fall_back(("forward", 1), candidates, ["cublas16"], RuntimeError("x"), _CUDA, shape) == "fused"
    assert logits_gemm._pinned[shape] == "fp32"
    assert _choose(("backward", 1), precision_key=shape) == "fused"


def test_a_backward_follows_a_forward_forced_to_an_unverified_precision(monkeypatch):
    """use("cublas16") around the forward only (no record): the backward, under `auto`, still reads 16-bit logits
    (the forced forward opted the shape in), never an fp32 strategy against its 16-bit statistics."""
    _timed_strategies(monkeypatch, {"fused": 3.0, "cublas": 2.0, "cublas16": 1.0})
    shape = ("shape",)
    with logits_gemm.use("cublas16"):
        _choose(("forward", 1), precision_key=shape)
    assert _choose(("backward", 1), precision_key=shape) == "cublas16"
    assert _choose(("backward", 2), precision_key=("other",)) == "fused"


# ------------------------------------------------------------------------------ what a GPU does that a CPU cannot show


def test_nothing_is_timed_while_a_cuda_graph_is_captured(monkeypatch):
    """Timing synchronizes, which breaks a CUDA graph capture: a key first seen during a capture runs the first
    candidate left after pruning, untimed and not kept; the first call outside a capture tunes it."""
    calls: list = []
    configs = _configs()
    tuner = tuning.autotune(configs, key=["n"], prune=lambda cs, nargs, **kw: cs[1:], do_bench=_bench(calls))(
        _fill_kernel
    )
    monkeypatch.setattr(tuning, "_capturing", lambda: True)
    out = torch.zeros(32)
    tuner[(1,)](out, 2.0, 20)
    assert calls == [] and tuner.cache == {} and out[:20].eq(2.0).all(), "the first candidate after pruning ran"
    assert tuner.configs == configs
    monkeypatch.setattr(tuning, "_capturing", lambda: False)
    tuner[(1,)](out, 3.0, 20)
    assert len(calls) == 2 and tuner.cache[(20, "torch.float32")] is configs[1]
    assert tuner.tuning_key((out, 3.0, 20), {}) in tuner.cache, "the key Triton files tunings under"
    monkeypatch.setattr(tuning, "_capturing", lambda: True)
    tuner[(1,)](out, 4.0, 20)
    assert len(calls) == 2 and out[:20].eq(4.0).all(), "a tuned key runs its pick during a capture"


def test_a_pick_that_raises_when_launched_is_dropped_for_its_key_and_the_call_goes_on(caplog):
    """The fastest config ran when timed, then raises when launched for the call (as a compile for an argument
    specialization the timed call did not have can): the call runs the next one, and the key keeps it."""
    timing = {"now": False}

    def fails_after_timing(nargs):
        if not timing["now"]:
            raise RuntimeError("PTXAS error for this specialization")

    fast = triton.Config({"BLOCK": 32, "BAD": False}, pre_hook=fails_after_timing)
    slow = triton.Config({"BLOCK": 64, "BAD": False})
    benched: list = []

    def do_bench(kernel_call, quantiles):
        timing["now"] = True
        try:
            kernel_call()
        finally:
            timing["now"] = False
        benched.append(1)
        return [1.0 if len(benched) % 2 else 2.0] * 3  # the first timed (fast) wins

    tuner = tuning.autotune([fast, slow], key=["n"], do_bench=do_bench)(_fill_kernel)
    out = torch.zeros(32)
    with caplog.at_level(logging.WARNING, logger="care_kernels"):
        tuner[(1,)](out, 5.0, 20)
    assert out[:20].eq(5.0).all() and tuner.cache[(20, "torch.float32")] is slow
    assert [d["candidate"] for d in tuning.dropped()] == [tuning.describe(fast)]
    assert "PTXAS error" in caplog.records[0].getMessage()
    benched.clear()
    tuner[(1,)](out, 6.0, 20)
    assert benched == [] and out[:20].eq(6.0).all(), "the key keeps the config that works"
    # another key tunes both again; when every candidate raises, the caller gets the first error
    also_fails = triton.Config({"BLOCK": 64, "BAD": False}, pre_hook=fails_after_timing)
    broken = tuning.autotune([fast, also_fails], key=["n"], do_bench=do_bench)(_fill_kernel)
    with pytest.raises(RuntimeError, match="PTXAS error"):
        broken[(1,)](out, 7.0, 9)
    assert broken.cache == {}


def test_tunings_that_would_not_hold_elsewhere_are_not_written_to_disk(monkeypatch, tmp_path):
    """A candidate out of memory (another process, or moment, may have room) or every candidate failing: the
    tuning is used in this process and tuned again in the next, not read back from the disk."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))

    def tuner_with(failure):
        configs = [triton.Config({"BLOCK": 16, "BAD": False}), triton.Config({"BLOCK": 32, "BAD": False})]

        def do_bench(kernel_call, quantiles):
            if failure is not None and tuner._benching is configs[0]:
                raise failure
            kernel_call()
            return [1.0] * 3

        tuner = tuning.autotune(configs, key=["n"], do_bench=do_bench)(_fill_kernel)
        tuner.cache_results = True
        return tuner

    tuner_with(torch.OutOfMemoryError("CUDA out of memory"))[(1,)](torch.zeros(32), 1.0, 20)
    assert not list(tmp_path.rglob("*.care_kernels_autotune.json"))
    tuner_with(RuntimeError("illegal instruction"))[(1,)](torch.zeros(32), 1.0, 20)
    assert len(list(tmp_path.rglob("*.care_kernels_autotune.json"))) == 1, "a failure that stays: written"
    every = tuner_with(None)
    every._do_bench = lambda kernel_call, quantiles: (_ for _ in ()).throw(RuntimeError("no"))
    every[(1,)](torch.zeros(32), 1.0, 21)
    assert len(list(tmp_path.rglob("*.care_kernels_autotune.json"))) == 1


def test_a_disk_entry_naming_a_config_the_list_lost_is_tuned_again(monkeypatch, tmp_path):
    """After an upgrade that renames a config (same kernel, same key), a cached entry naming the old one is not
    trusted: the tuner times its own list again."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    calls: list = []
    configs = [triton.Config({"BLOCK": 16, "BAD": False}), triton.Config({"BLOCK": 32, "BAD": False})]
    tuner = tuning.autotune(configs, key=["n"], do_bench=_bench(calls))(_fill_kernel)
    tuner.cache_results = True
    tuner[(1,)](torch.zeros(32), 1.0, 20)
    [entry] = list(tmp_path.rglob("*.care_kernels_autotune.json"))
    stored = json.loads(entry.read_text())
    stored["timings"][0][0] = stored["timings"][0][0].replace("BLOCK: 16", "BLOCK: 64")
    entry.write_text(json.dumps(stored))
    again = tuning.autotune(configs, key=["n"], do_bench=_bench(calls))(_fill_kernel)
    again.cache_results = True
    calls.clear()
    again[(1,)](torch.zeros(32), 1.0, 20)
    assert len(calls) == 2 and again.cache[(20, "torch.float32")] in configs


def test_descriptors_follow_a_pick_kept_from_when_more_configs_were_allowed(monkeypatch):
    """A tuner that picked a host-TMA config while the records (or CARE_KERNELS_TRITON_CONFIGS) allowed it keeps
    running it for that key: its descriptors are built even after the config is no longer allowed."""
    monkeypatch.setattr(tlp, "_INTERPRET", False)
    monkeypatch.setattr(tlp.tma, "usable", lambda *t, interpret: True)
    monkeypatch.setattr(tlp.tma, "ensure_scratch_allocator", lambda: None)
    monkeypatch.setattr(verified, "device_arch", lambda device: "sm_90")
    hidden, weight = torch.zeros(4096, 64, dtype=torch.bfloat16), torch.zeros(1000, 64, dtype=torch.bfloat16)
    host_tma = next(c for c in tlp._FWD_CONFIGS_16_TMA if tlp._host_tma(c))
    monkeypatch.setattr(tlp._fwd_tuned_16_tma, "cache", {("some key",): host_tma})
    assert tlp._plan_launch(tlp.linear_logprob_stats_kernel, tlp._FWD_LISTS, {}, 2, hidden, weight)[4] is True


def test_a_broken_record_file_is_a_clear_error(monkeypatch, tmp_path):
    """A verification record file cut short (a killed gpu_check) or of another format: an error that names the file
    and what to do, not a JSON traceback from deep in a kernel launch."""
    path = tmp_path / "verified.json"
    monkeypatch.setenv(verified.EXTRA_ENV, str(path))
    for text in ('{"format": 1, "records": [{"arch": "sm_', '["not", "records"]', '{"format": 99, "records": []}'):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"{path}: not a .*verification record file.*{verified.EXTRA_ENV}"):
            verified.verified_labels("forward 16-bit", "sm_90")


def test_sources_missing_from_the_installation_verify_nothing(monkeypatch, tmp_path):
    """An installation without the Python sources (bytecode only) cannot tell its kernels from a record's: its
    fingerprint matches no record, so only the always-on configs and paths run, and nothing raises."""
    record = _record(passed={verified.HEAD_FAMILY: ["one_sweep"]})
    assert verified.counting_records("sm_90", [record], family=verified.HEAD_FAMILY) == [record]
    monkeypatch.setattr(verified, "PACKAGE", tmp_path)
    verified.fingerprint.cache_clear()
    try:
        assert verified.fingerprint(verified.HEAD_FAMILY).startswith("unavailable")
        assert verified.counting_records("sm_90", [record], family=verified.HEAD_FAMILY) == []
    finally:
        verified.fingerprint.cache_clear()


def test_each_source_group_follows_its_own_files(monkeypatch, tmp_path):
    """An edit to the fused head's chunk loop changes the head variants' fingerprint only; an edit to a kernel file
    the strategies and configs share changes both; comments change nothing."""
    for group in verified.SOURCES.values():
        for name in group:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text((verified.PACKAGE / name).read_text())
    monkeypatch.setattr(verified, "PACKAGE", tmp_path)

    def current():
        verified.fingerprint.cache_clear()
        return verified.fingerprints()

    try:
        before = current()
        assert before == {g: verified.fingerprint.__wrapped__(g) for g in verified.SOURCES}
        head = tmp_path / "losses/fused_head_chunks.py"
        head.write_text(head.read_text() + "\n# a comment\n")
        assert current() == before
        head.write_text(head.read_text() + "\nX = 1\n")
        after = current()
        assert after[verified.HEAD_FAMILY] != before[verified.HEAD_FAMILY]
        assert after[verified.CONFIGS] == before[verified.CONFIGS]
        kernels = tmp_path / "triton/_forward_kernels.py"
        kernels.write_text(kernels.read_text() + "\nY = 2\n")
        last = current()
        assert last[verified.CONFIGS] != after[verified.CONFIGS]
        assert last[verified.STRATEGY_FAMILY] != after[verified.STRATEGY_FAMILY]
        assert last[verified.HEAD_FAMILY] == after[verified.HEAD_FAMILY]
    finally:
        verified.fingerprint.cache_clear()
