"""The fused GRPO head's chunk-loop variants (care_kernels.losses.fused_head_chunks) and the one-sweep row pass:
the same log-probs and gradients as the two-sweep loop, and as the materialized float64 computation within 2x the
same-dtype torch error; the timed choice drops a failing variant, never the call."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import triton

import care_kernels as ck
from care_kernels import row_epilogue
from care_kernels.losses import fused_head_chunks as chunks
from care_kernels.testing import assert_error_within
from care_kernels.triton import logits_gemm, tuning, verified

IGNORE = -100


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    chunks.reset()
    monkeypatch.delenv(chunks.ENV, raising=False)
    monkeypatch.delenv(verified.MODE_ENV, raising=False)
    monkeypatch.delenv(verified.EXTRA_ENV, raising=False)
    monkeypatch.setattr(tuning, "_DROPPED", {})
    yield
    chunks.reset()


def _torch_rows(z, y, t):
    """float64 (logprobs, lse, entropy, q = (onehot - p) / T) of z / T; ignored rows: 0, 0, -p / T."""
    zz = z.double() / t
    lse = zz.logsumexp(-1)
    p = (zz - lse[:, None]).exp()
    valid = y != IGNORE
    logp = torch.where(valid, zz.gather(1, y.clamp(min=0)[:, None])[:, 0] - lse, 0.0)
    ent = torch.where(valid, lse - (p * zz).sum(-1), 0.0)
    onehot = torch.zeros_like(p).scatter_(1, y.clamp(min=0)[:, None], 1.0) * valid[:, None]
    return logp, lse, ent, (onehot - p) / t


def _row_backends(device):
    """(name, module) pairs to check: the dispatcher (torch/C++ off CUDA), and Triton (interpreted off CUDA)."""
    from care_kernels import backends

    found = [("dispatcher", row_epilogue)]
    if backends.triton_status()[0]:
        from care_kernels.triton import row_epilogue as triton_rows

        found.append(("triton", triton_rows))
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,v,t", [(1, 7, 1.0), (5, 3000, 0.7), (3, 5000, 1.3)])
def test_one_sweep_row_pass_matches_torch(device, dtype, n, v, t):
    z = (torch.randn(n, v, device=device) * 3).to(dtype)
    y = torch.randint(0, v, (n,), device=device)
    y[0] = IGNORE
    want = _torch_rows(z, y, t)
    for name, rows in _row_backends(device):
        buf = z.clone()
        logp, lse, ent = rows.row_stats_probs_(buf, y, t, IGNORE, with_entropy=True)
        for what, got, w in zip(("logp", "lse", "entropy"), (logp, lse, ent), want):
            torch.testing.assert_close(got.double(), w, rtol=0, atol=2e-5, msg=f"{name} {what}")
        tol = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]  # the buffer's rounding
        torch.testing.assert_close(buf.double(), want[3], rtol=tol, atol=tol * 1e-2, msg=f"{name} q")
        stats = rows.row_stats(z, y, t, IGNORE, with_entropy=True)
        torch.testing.assert_close(stats[2].double(), want[2], rtol=0, atol=2e-5, msg=f"{name} row_stats entropy")
        assert rows.row_stats_probs_(z.clone(), y, t, IGNORE)[2] is None


# ------------------------------------------------------------------------------------------ the loop variants


def _head(n, h, v, dtype, device, *, bias=True, ref=True, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=gen) * (2 / h**0.5)).to(dtype).to(device)
    b = (torch.randn(v, generator=gen) * 0.5).to(dtype).to(device) if bias else None
    y = torch.randint(0, v, (n,), generator=gen).to(device)
    y[1] = IGNORE
    refs = None
    if ref:
        refs = ((hidden.float() + 0.1).to(dtype), (weight.float() * 0.9).to(dtype), None if b is None else b + 0.1)
    g_of = torch.randn(n, generator=gen).to(device)  # d loss / d logp, a function of the token (as policy_loss's)
    calls = []

    def loss_grad(logp, ref_logp, rows):
        calls.append((rows, logp[rows].clone()))
        return g_of[rows] * (1 + 0.1 * logp[rows])  # depends on the row's own log-prob, as the GRPO losses do

    return chunks.HeadInputs(hidden, y, weight, b, refs, 0.8, IGNORE), loss_grad, g_of, calls


def _truth(inp: chunks.HeadInputs, g_of, dtype):
    """(logp, ref_logp, entropy, grad_hidden, grad_weight, grad_bias) of the materialized computation in dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None
              for t in (inp.hidden, inp.weight, inp.bias)]  # fmt: skip
    h, w, b = leaves
    from care_kernels.reference.naive import naive_linear_logprobs

    logp, ent = naive_linear_logprobs(h, w, inp.targets, b, temperature=inp.temperature, compute_dtype=dtype)
    g = g_of.to(logp.dtype) * (1 + 0.1 * logp.detach())
    (logp * g).sum().backward()
    ref_h, ref_w, ref_b = inp.ref
    ref_logp, _ = naive_linear_logprobs(ref_h, ref_w, inp.targets, ref_b, temperature=inp.temperature,
                                        compute_dtype=dtype)  # fmt: skip
    return logp.detach(), ref_logp.detach(), ent.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [40, 13, 1])  # one chunk, several (the last short), one row each
def test_loop_variants_match_the_materialized_computation(device, monkeypatch, dtype, rows):
    """two_sweeps and one_sweep (on a 16-bit buffer where the dtype is 16-bit, as on a GPU): log-probs, entropy and
    the gradients within 2x the same-dtype torch error of float64; each calls loss_grad once per chunk, with the
    chunk's log-probs filled in."""
    monkeypatch.setattr(chunks, "buffer_dtype", lambda weight: weight.dtype)
    inp, loss_grad, g_of, calls = _head(40, 24, 300, dtype, device)
    truth = _truth(inp, g_of, torch.float64)
    base = _truth(inp, g_of, dtype)
    results = {}
    for variant in (chunks.two_sweeps, chunks.one_sweep):
        calls.clear()
        got = variant(inp, loss_grad, rows, True)
        assert len(calls) == math.ceil(40 / rows) and all(torch.all(lp == got.logp[r]) for r, lp in calls)
        assert got.grad_weight.dtype == (inp.weight.dtype if variant is chunks.one_sweep and rows >= 40 else
                                         torch.float32)  # fmt: skip
        outs = (got.logp, got.ref_logp, got.entropy, got.grad_hidden, got.grad_weight, got.grad_bias)
        names = ("logp", "ref_logp", "entropy", "grad_hidden", "grad_weight", "grad_bias")
        for name, x, t, b in zip(names, outs, truth, base):
            x = x.to(b.dtype) if name.startswith("grad") else x
            assert_error_within(x, t, b, name=f"{variant.__name__} {name}")
        results[variant.__name__] = outs
    assert torch.equal(results["one_sweep"][0], results["two_sweeps"][0])


def test_ignored_targets_get_no_gradient(device, monkeypatch):
    """A token whose target is ignore_index: log-prob 0, and no gradient whatever loss_grad says (two_sweeps zeroes
    its dlogits; one_sweep its row scale)."""
    inp, _, _, _ = _head(6, 8, 50, torch.float32, device, ref=False)
    inp.targets[:] = IGNORE
    for variant in (chunks.two_sweeps, chunks.one_sweep):
        got = variant(inp, lambda logp, ref, rows: torch.ones(len(range(*rows.indices(6)))), 4, False)
        assert torch.all(got.logp == 0) and torch.all(got.grad_hidden == 0) and torch.all(got.grad_weight == 0)
        assert torch.all(got.grad_bias == 0)


# ------------------------------------------------------------------------------------------ the timed choice


def _fake_variants(monkeypatch, behaviour: dict, offered: str = "all"):
    """candidates() -> thunks that return their name, or raise (behaviour[name] an exception); `auto` may choose
    every variant (offered "all": as where a record verified them) or the always-on one ("verified", no record)."""
    ran = []

    def thunk(name):
        def run():
            ran.append(name)
            if isinstance(behaviour[name], Exception):
                raise behaviour[name]
            return name

        return run

    monkeypatch.setattr(chunks, "candidates", lambda *a, **k: {name: thunk(name) for name in behaviour})
    monkeypatch.setattr(chunks, "_capturing", lambda: False)
    monkeypatch.setenv(verified.MODE_ENV, offered)
    return ran


def _inputs_of(n):
    h = torch.zeros(n, 4)
    return chunks.HeadInputs(h, torch.zeros(n, dtype=torch.long), torch.zeros(8, 4), None, None, 1.0, IGNORE)


def test_the_fastest_variant_is_kept_and_a_failing_one_dropped(monkeypatch):
    ran = _fake_variants(monkeypatch, {"two_sweeps": 3.0, "one_sweep": RuntimeError("boom"), "one_sweep_tall": 1.0})
    times = {"two_sweeps": 3.0, "one_sweep_tall": 1.0}
    monkeypatch.setattr(logits_gemm, "_median_ms", lambda run: times[run()])
    assert chunks.run(_inputs_of(4096), None, buffer_bytes=1 << 30, bounded=False) == "one_sweep_tall"
    assert [d["candidate"] for d in tuning.dropped()] == ["one_sweep"]
    [pick] = chunks.picks()
    assert pick["label"] == "one_sweep_tall" and pick["timings_ms"]["one_sweep"] == math.inf
    ran.clear()
    assert chunks.run(_inputs_of(4096), None, buffer_bytes=1 << 30, bounded=False) == "one_sweep_tall"
    assert ran == ["one_sweep_tall"], "a shape is timed once"
    assert chunks.run(_inputs_of(100), None, buffer_bytes=1 << 30, bounded=False) == "two_sweeps", "short: untimed"


def test_a_variant_failing_on_a_call_hands_it_to_two_sweeps(monkeypatch):
    _fake_variants(monkeypatch, {"two_sweeps": 2.0, "one_sweep": RuntimeError("illegal address")})
    monkeypatch.setenv(chunks.ENV, "one_sweep")
    assert chunks.run(_inputs_of(4096), None, buffer_bytes=1 << 30, bounded=False) == "two_sweeps"
    assert [d["candidate"] for d in tuning.dropped()] == ["one_sweep"]
    _fake_variants(monkeypatch, {"two_sweeps": RuntimeError("real error")})
    with pytest.raises(RuntimeError, match="real error"):
        chunks.run(_inputs_of(4096), None, buffer_bytes=1 << 30, bounded=False)
    monkeypatch.setenv(chunks.ENV, "sideways")
    with pytest.raises(ValueError, match="one_sweep_tall"):
        chunks.run(_inputs_of(4096), None, buffer_bytes=1 << 30, bounded=False)


def _head_record(passed=(), failed=None, **overrides):
    return {"arch": "sm_90", "device": "NVIDIA H200", "triton": triton.__version__,
            "kernel_fingerprint": verified.kernel_fingerprint(), "fingerprints": verified.fingerprints(),
            "passed": {verified.HEAD_FAMILY: list(passed)}, "failed": {verified.HEAD_FAMILY: failed or {}},
            **overrides}  # fmt: skip


def test_variants_never_run_on_a_gpu_are_off_until_a_record_says_they_passed_there(monkeypatch, tmp_path):
    """one_sweep and one_sweep_tall ran on no GPU: `auto` times and picks them only where a counting record (this
    arch, Triton and head sources) passed them and none failed them, however fast; forcing one runs it."""
    _fake_variants(monkeypatch, {"two_sweeps": 3.0, "one_sweep": 2.0, "one_sweep_tall": 1.0}, offered="verified")
    monkeypatch.setattr(verified, "device_arch", lambda device: "sm_90")  # the inputs stand for a GPU's
    timed: list = []
    monkeypatch.setattr(logits_gemm, "_median_ms", lambda run: timed.append(run()) or {"two_sweeps": 3.0,
                        "one_sweep": 2.0, "one_sweep_tall": 1.0}[timed[-1]])  # fmt: skip

    def run(n=4096):
        chunks.reset()
        return chunks.run(_inputs_of(n), None, buffer_bytes=1 << 30, bounded=False)

    assert run() == "two_sweeps" and timed == [], "no record: the two-sweep loop, nothing timed"
    path = tmp_path / "verified.json"
    monkeypatch.setenv(verified.EXTRA_ENV, str(path))
    path.write_text(json.dumps({"format": 1, "records": [_head_record(["one_sweep"])]}))
    assert run() == "one_sweep" and timed == ["two_sweeps", "one_sweep"], "one_sweep_tall: not verified"
    stale = {**verified.fingerprints(), verified.HEAD_FAMILY: "0" * 64}
    for other in (_head_record(["one_sweep"], arch="sm_80"), _head_record(["one_sweep"], triton="2.9.0"),
                  _head_record(["one_sweep"], fingerprints=stale)):  # fmt: skip
        path.write_text(json.dumps({"format": 1, "records": [other]}))
        assert run() == "two_sweeps", other
    path.write_text(
        json.dumps(
            {
                "format": 1,
                "records": [
                    _head_record(["one_sweep", "one_sweep_tall"]),
                    _head_record(failed={"one_sweep_tall": "wrong grad_weight"}),
                ],
            }
        )
    )
    assert run() == "one_sweep"
    monkeypatch.setenv(chunks.ENV, "one_sweep_tall")
    assert run() == "one_sweep_tall", "forced: whatever the records say"
    monkeypatch.delenv(chunks.ENV)
    monkeypatch.setenv(verified.MODE_ENV, "all")
    assert run() == "one_sweep_tall"
    monkeypatch.setenv(verified.MODE_ENV, "baseline")
    assert run() == "two_sweeps"


def test_the_loss_needs_no_triton_off_a_gpu(tmp_path, package_env):
    """FusedLinearGRPOLoss on CPU in a Python without Triton (an optional extra): the same loss, token statistics and
    gradients as here (the chunk loop's choice never imports Triton when only the two-sweep loop can run)."""
    script = tmp_path / "no_triton.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        if __name__ == "__main__":  # (imported by the test for its own run: Triton left alone)
            sys.modules["triton"] = None  # import triton fails
        import torch
        import care_kernels as ck

        def run():
            torch.manual_seed(0)
            x, w = torch.randn(2, 5, 8, requires_grad=True), (torch.randn(30, 8) / 3).requires_grad_()
            ids, mask, adv = torch.randint(0, 30, (2, 5)), torch.ones(2, 5), torch.randn(2)
            loss, metrics, stats = ck.FusedLinearGRPOLoss(beta=0.04)(
                x, w, ids, mask, adv, ref_per_token_logps=torch.randn(2, 5) - 3, return_token_stats=True,
                return_entropy=True)
            loss.backward()
            return [loss, *metrics, stats.logprobs, stats.entropy, x.grad, w.grad]

        if __name__ == "__main__":
            torch.save(run(), sys.argv[1])
            assert "triton" not in {m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}
    """)
    )
    out = tmp_path / "out.pt"
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True,
                          env=package_env(), cwd=tmp_path, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    sys.path.insert(0, str(tmp_path))
    try:
        import no_triton
    finally:
        sys.path.remove(str(tmp_path))
    for got, want in zip(torch.load(out), no_triton.run()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_candidates_off_a_gpu_and_the_tall_variant_only_unbounded(monkeypatch):
    inp, loss_grad, _, _ = _head(40, 8, 50, torch.float32, torch.device("cpu"))
    assert list(chunks.candidates(inp, loss_grad, 1 << 20, False, False)) == ["two_sweeps"]
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(chunks, "tall_fits", lambda inp: True)
    assert list(chunks.candidates(inp, loss_grad, 8 * 50 * 4, False, False)) == ["two_sweeps", "one_sweep",
                                                                                 "one_sweep_tall"]  # fmt: skip
    assert "one_sweep_tall" not in chunks.candidates(inp, loss_grad, 8 * 50 * 4, True, False), "the caller bounded it"
    assert "one_sweep_tall" not in chunks.candidates(inp, loss_grad, 1 << 20, False, False), "one chunk already"


def test_the_loss_gives_the_same_result_under_each_variant(monkeypatch):
    """FusedLinearGRPOLoss end to end with the one-sweep loop (offered here as on a GPU): the loss, metrics and
    gradients of the two-sweep loop."""
    b, t, h, v = 3, 6, 16, 70
    x, w = torch.randn(b, t, h), torch.randn(v, h) / 4
    ids, mask, adv = torch.randint(0, v, (b, t)), torch.ones(b, t), torch.randn(b)
    mask[0, 4:] = 0
    ref_x, ref_w = x + 0.05, w * 0.95
    results = {}
    for variant in ("two_sweeps", "one_sweep"):

        def offered(inp, loss_grad, buffer_bytes, bounded, with_entropy, variant=variant):
            return {variant: lambda: getattr(chunks, variant)(inp, loss_grad, 5, with_entropy)}

        monkeypatch.setattr(chunks, "candidates", offered)
        monkeypatch.setenv(chunks.ENV, variant)
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss_fn = ck.FusedLinearGRPOLoss(beta=0.04, loss_type="grpo", max_buffer_bytes=5 * v * 4)
        loss, metrics = loss_fn(xx, ww, ids, mask, adv, ref_input=ref_x, ref_weight=ref_w)
        loss.backward()
        results[variant] = (loss, *metrics, xx.grad, ww.grad)
    for got, want in zip(results["one_sweep"], results["two_sweeps"]):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.gpu
def test_gpu_every_variant_gives_the_two_sweep_result(monkeypatch):
    """On a GPU, bf16, two chunks by default (4096 tokens x V = 151936): each variant forced, then `auto` (every
    variant offered, as where verified: timed, its pick recorded), give the two-sweep loop's loss and gradients to
    bf16 rounding."""
    b, t, h, v = 8, 512, 512, 151936
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, t, h, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5).bfloat16()
    ids = torch.randint(0, v, (b, t), device="cuda", generator=gen)
    mask, adv = torch.ones(b, t, device="cuda"), torch.randn(b, device="cuda", generator=gen)
    results = {}
    monkeypatch.setenv(verified.MODE_ENV, "all")
    for variant in (*chunks.VARIANTS, "auto"):
        monkeypatch.setenv(chunks.ENV, variant)
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = ck.FusedLinearGRPOLoss(beta=0.0, loss_type="grpo")(xx, ww, ids, mask, adv)
        loss.backward()
        results[variant] = (loss.float(), xx.grad.float(), ww.grad.float())
    assert chunks.picks() and chunks.picks()[0]["label"] in chunks.VARIANTS
    for variant, got in results.items():
        for a, want in zip(got, results["two_sweeps"]):
            torch.testing.assert_close(a, want, rtol=3e-2, atol=1e-3 * want.abs().max().item(), msg=variant)
