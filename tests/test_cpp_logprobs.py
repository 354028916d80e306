"""The native CPU kernels of the log-prob op (csrc/cpu/linear_logprobs.cpp via care_kernels.cpu_backend).

Every value is compared with a float64 ground truth and must be within 2x the error of the same-dtype naive
(materialized) torch computation: forward (logprobs, entropy, lse, ref_logprobs), backward (dH, dW, dbias
with random upstream gradients of both logprobs and entropy), and the fp32 logits-block epilogues.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from care_kernels import _ext, cpu_backend
from care_kernels.reference.naive import naive_linear_logprobs
from care_kernels.testing import assert_error_within

pytestmark = pytest.mark.skipif(
    not cpu_backend.available(),
    reason="care_kernels._C is not built with csrc/cpu/linear_logprobs.cpp "
    f"({_ext.why_not('_C') or 'ops missing'}); run `pip install .`",
)

IGNORE = -100
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _inputs(n, h, v, dtype, *, bias, seed=0, logit_scale=3.0):
    """hidden [n, h], weight [v, h] (logits of std ~logit_scale), bias [v] or None, targets ~20% ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * (logit_scale / math.sqrt(h))).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.2] = IGNORE
    return hidden, weight, b, targets


def _lse(hidden, weight, bias, temperature, dtype):
    """logsumexp of the tempered logits, the matmul in `dtype` (float64 for the truth)."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return torch.logsumexp(
        logits.to(torch.float64 if dtype == torch.float64 else torch.float32) / temperature, -1
    )


def _naive_grads(hidden, weight, bias, targets, g_lp, g_ent, temperature, dtype):
    """Autograd of sum(g_lp * logprobs + g_ent * entropy) through the naive computation in `dtype`."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (hidden, weight)]
    b = None if bias is None else bias.detach().to(dtype).requires_grad_()
    lp, ent = naive_linear_logprobs(
        leaves[0], leaves[1], targets, b, temperature=temperature, ignore_index=IGNORE
    )
    (lp * g_lp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return leaves[0].grad, leaves[1].grad, None if b is None else b.grad


def _check_forward(hidden, weight, bias, targets, temperature, out):
    logprobs, entropy, lse, _ = out
    truth = naive_linear_logprobs(
        hidden.double(),
        weight.double(),
        targets,
        None if bias is None else bias.double(),
        temperature=temperature,
    )
    base = naive_linear_logprobs(hidden, weight, targets, bias, temperature=temperature)
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert lse.dtype == torch.float64  # saved for the backward unrounded (cpu_backend.forward)
    assert_error_within(logprobs, truth[0], base[0], name="logprobs")
    assert_error_within(entropy, truth[1], base[1], name="entropy")
    valid = targets != IGNORE
    assert_error_within(
        lse[valid],
        _lse(hidden, weight, bias, temperature, torch.float64)[valid],
        _lse(hidden, weight, bias, temperature, hidden.dtype)[valid],
        name="lse",
    )


def _check_backward(hidden, weight, bias, targets, temperature, out):
    _, entropy, lse, _ = out
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(hidden.shape[0], generator=g), torch.randn(hidden.shape[0], generator=g)
    gh, gw, gb = cpu_backend.backward(
        g_lp, g_ent, hidden, weight, bias, targets, lse, entropy, temperature=temperature, ignore_index=IGNORE
    )
    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    assert (gb is None) == (bias is None)
    truth = _naive_grads(hidden, weight, bias, targets, g_lp, g_ent, temperature, torch.float64)
    base = _naive_grads(hidden, weight, bias, targets, g_lp, g_ent, temperature, hidden.dtype)
    for name, ours, t, b in zip(("grad_hidden", "grad_weight", "grad_bias"), (gh, gw, gb), truth, base):
        if ours is not None:
            assert ours.dtype == b.dtype
            assert_error_within(ours, t, b, name=name)


SHAPES = [  # (N, H, V)
    (1, 16, 1),
    (7, 16, 5),
    (1, 100, 1000),
    (130, 100, 1000),
    (1100, 16, 1000),
    (130, 896, 1000),
    (7, 16, 151936),
    (2, 100, 151936),
]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
def test_forward_backward_against_float64(shape, dtype):
    n, h, v = shape
    i = SHAPES.index(shape)
    temperature, bias = (1.0, 0.7, 1.3)[i % 3], i % 2 == 1
    hidden, weight, b, targets = _inputs(n, h, v, dtype, bias=bias, seed=i)
    out = cpu_backend.forward(
        hidden, weight, b, targets, temperature=temperature, ignore_index=IGNORE, with_entropy=True
    )
    assert out[3] is None
    _check_forward(hidden, weight, b, targets, temperature, out)
    _check_backward(hidden, weight, b, targets, temperature, out)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_temperature_and_bias(temperature, bias, dtype):
    # 5000 columns: more than one vocabulary tile (N = 1100 above covers several token tiles).
    hidden, weight, b, targets = _inputs(150, 64, 5000, dtype, bias=bias, seed=3)
    out = cpu_backend.forward(
        hidden, weight, b, targets, temperature=temperature, ignore_index=IGNORE, with_entropy=True
    )
    _check_forward(hidden, weight, b, targets, temperature, out)
    _check_backward(hidden, weight, b, targets, temperature, out)


def test_dual_fp32_reference_beside_bf16_policy():
    n, h, v, temperature = 300, 64, 9000, 0.7
    hidden, weight, bias, targets = _inputs(n, h, v, BF16, bias=True, seed=5)
    ref_hidden, ref_weight, ref_bias, _ = _inputs(n, 48, v, F32, bias=True, seed=6)
    single = cpu_backend.forward(
        hidden, weight, bias, targets, temperature=temperature, ignore_index=IGNORE, with_entropy=True
    )
    dual = cpu_backend.forward(
        hidden,
        weight,
        bias,
        targets,
        temperature=temperature,
        ignore_index=IGNORE,
        with_entropy=True,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
    )
    for a, b in zip(single[:3], dual[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref_logprobs = dual[3]
    assert ref_logprobs.dtype == torch.float32 and ref_logprobs.shape == (n,)
    truth = naive_linear_logprobs(
        ref_hidden.double(), ref_weight.double(), targets, ref_bias.double(), temperature=temperature
    )[0]
    base = naive_linear_logprobs(ref_hidden, ref_weight, targets, ref_bias, temperature=temperature)[0]
    assert_error_within(ref_logprobs, truth, base, name="ref_logprobs")
    _check_forward(hidden, weight, bias, targets, temperature, dual)


def test_all_targets_ignored():
    hidden, weight, bias, targets = _inputs(9, 16, 50, F32, bias=True)
    targets.fill_(IGNORE)
    logprobs, entropy, _, ref = cpu_backend.forward(
        hidden,
        weight,
        bias,
        targets,
        temperature=1.0,
        ignore_index=IGNORE,
        with_entropy=True,
        ref_hidden=hidden,
        ref_weight=weight,
    )
    assert not logprobs.any() and not entropy.any() and not ref.any()
    gh, gw, gb = cpu_backend.backward(
        torch.ones(9),
        torch.ones(9),
        hidden,
        weight,
        bias,
        targets,
        torch.zeros(9),
        torch.zeros(9),
        temperature=1.0,
        ignore_index=IGNORE,
    )
    assert not gh.any() and not gw.any() and not gb.any()


def test_without_entropy_returns_zeros_and_same_logprobs():
    hidden, weight, bias, targets = _inputs(40, 32, 700, F32, bias=False)
    with_ent = cpu_backend.forward(
        hidden, weight, bias, targets, temperature=1.0, ignore_index=IGNORE, with_entropy=True
    )
    without = cpu_backend.forward(
        hidden, weight, bias, targets, temperature=1.0, ignore_index=IGNORE, with_entropy=False
    )
    assert not without[1].any()
    torch.testing.assert_close(with_ent[0], without[0], rtol=0, atol=0)
    torch.testing.assert_close(with_ent[2], without[2], rtol=0, atol=0)


class _CppLogprobs(torch.autograd.Function):
    """(logprobs, entropy) through the native forward/backward, for gradcheck."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature):
        logprobs, entropy, lse, _ = cpu_backend.forward(
            hidden, weight, bias, targets, temperature=temperature, ignore_index=IGNORE, with_entropy=True
        )
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature = temperature
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        gh, gw, gb = cpu_backend.backward(
            g_lp.contiguous(),
            g_ent.contiguous(),
            hidden,
            weight,
            bias,
            targets,
            lse,
            entropy,
            temperature=ctx.temperature,
            ignore_index=IGNORE,
        )
        return gh, gw, gb, None, None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck_float64(temperature):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([0, 8, IGNORE, 3, 3, 5])
    assert torch.autograd.gradcheck(
        lambda h, w, b: _CppLogprobs.apply(h, w, b, targets, temperature), (hidden, weight, bias)
    )


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("logit_scale", [0.0, 3.0, 300.0])
def test_logprobs_nonpositive_entropy_within_log_v(logit_scale, dtype):
    v = 3000
    hidden, weight, bias, targets = _inputs(200, 32, v, dtype, bias=False, logit_scale=logit_scale)
    logprobs, entropy, _, _ = cpu_backend.forward(
        hidden, weight, bias, targets, temperature=1.0, ignore_index=IGNORE, with_entropy=True
    )
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all()
    assert (logprobs <= 0).all()
    assert (entropy >= 0).all() and (entropy <= math.log(v)).all()


def test_strided_inputs_match_contiguous():
    hidden, weight, bias, targets = _inputs(60, 16, 3000, F32, bias=True, seed=7)
    wide = torch.stack([targets, torch.zeros_like(targets)], 1)[:, 0]  # stride 2
    hidden_t = hidden.T.contiguous().T  # column-major
    a = cpu_backend.forward(
        hidden, weight, bias, targets, temperature=0.7, ignore_index=IGNORE, with_entropy=True
    )
    b = cpu_backend.forward(
        hidden_t, weight, bias, wide, temperature=0.7, ignore_index=IGNORE, with_entropy=True
    )
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(x, y)
    logits = hidden @ weight.T
    stats = cpu_backend.logits_stats(logits, wide, temperature=0.7, ignore_index=IGNORE, with_entropy=True)
    ref = cpu_backend.logits_stats(logits, targets, temperature=0.7, ignore_index=IGNORE, with_entropy=True)
    for x, y in zip(stats, ref):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    buf_a, buf_b, g = logits.clone(), logits.clone(), torch.randn(60)
    cpu_backend.logits_grad_(buf_a, targets, ref[2], ref[1], g, g, temperature=0.7, ignore_index=IGNORE)
    cpu_backend.logits_grad_(buf_b, wide, ref[2], ref[1], g, g, temperature=0.7, ignore_index=IGNORE)
    torch.testing.assert_close(buf_a, buf_b, rtol=0, atol=0)


def test_nan_stays_in_its_row():
    hidden, weight, _, _ = _inputs(4, 8, 3000, F32, bias=False)
    hidden[1, 3] = float("nan")
    targets = torch.tensor([1, 2, 3, 4])
    logprobs, entropy, lse, ref = cpu_backend.forward(
        hidden,
        weight,
        None,
        targets,
        temperature=1.0,
        ignore_index=IGNORE,
        with_entropy=True,
        ref_hidden=hidden,
        ref_weight=weight,
    )
    for out in (logprobs, entropy, lse, ref):
        assert out[1].isnan() and torch.isfinite(out[[0, 2, 3]]).all()


def _call_fwd(hidden, weight, bias=None, targets=None, **kw):
    targets = torch.zeros(hidden.shape[0], dtype=torch.long) if targets is None else targets
    args = dict(
        ref_hidden=None,
        ref_weight=None,
        ref_bias=None,
        temperature=1.0,
        ignore_index=IGNORE,
        with_entropy=False,
    )
    args.update(kw)
    return torch.ops.care_kernels.linear_logprobs_fwd_cpu(
        hidden,
        weight,
        bias,
        targets,
        args["ref_hidden"],
        args["ref_weight"],
        args["ref_bias"],
        args["temperature"],
        args["ignore_index"],
        args["with_entropy"],
    )


@pytest.mark.parametrize(
    "case, match",
    [
        (lambda h, w: _call_fwd(h, w[:, :7]), r"weight must be \[V, H\] with H"),
        (lambda h, w: _call_fwd(h[0], w), r"hidden must be a 2-D tensor"),
        (lambda h, w: _call_fwd(h, w.double()), r"weight must have the dtype of hidden"),
        (lambda h, w: _call_fwd(h, w, bias=torch.zeros(11)), r"bias must be a 1-D tensor of size V = 10"),
        (
            lambda h, w: _call_fwd(h, w, targets=torch.zeros(3, dtype=torch.long)),
            r"targets must be a 1-D tensor of size N = 4",
        ),
        (
            lambda h, w: _call_fwd(h, w, targets=torch.zeros(4, dtype=torch.int32)),
            r"targets must have dtype int64",
        ),
        (
            lambda h, w: _call_fwd(h, w, targets=torch.tensor([0, 1, 10, 2])),
            r"targets\[2\] = 10 is out of range",
        ),
        (lambda h, w: _call_fwd(h, w, temperature=0.0), r"temperature must be a finite number > 0"),
        (lambda h, w: _call_fwd(h, w, ref_hidden=h), r"ref_hidden and ref_weight go together"),
        (lambda h, w: _call_fwd(h, w, ref_hidden=h[:3], ref_weight=w), r"ref_hidden must have N = 4 rows"),
        (lambda h, w: _call_fwd(h, w, ref_hidden=h, ref_weight=w[:9]), r"ref_weight must have V = 10 rows"),
        (
            lambda h, w: _call_fwd(h, w, ref_hidden=h, ref_weight=w[:, :5]),
            r"ref_weight must be \[V, H\] with H",
        ),
        (
            lambda h, w: torch.ops.care_kernels.linear_logprobs_bwd_cpu(
                torch.zeros(3),
                None,
                h,
                w,
                None,
                torch.zeros(4, dtype=torch.long),
                torch.zeros(4),
                torch.zeros(4),
                1.0,
                IGNORE,
                False,
            ),
            r"grad_logprobs must be a 1-D tensor of size N = 4",
        ),
        (
            lambda h, w: torch.ops.care_kernels.logits_stats_cpu(
                torch.zeros(4, 10, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.long), 1.0, IGNORE, True
            ),
            r"logits must be float32",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(case, match):
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(RuntimeError, match=match):
        case(hidden, weight)


def _torch_row_stats(logits, targets, temperature):
    z = logits / temperature
    lse = torch.logsumexp(z, -1)
    logp = z - lse[:, None]
    valid = targets != IGNORE
    lp = torch.where(valid, logp.gather(1, targets.clamp(min=0)[:, None])[:, 0], torch.zeros_like(lse))
    ent = torch.where(valid, -(logp.exp() * logp).sum(-1), torch.zeros_like(lse))
    return lp, ent, lse


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", [(1, 1), (5, 17), (33, 151936), (70, 5000)])
def test_logits_stats_and_grad_against_torch(shape, temperature):
    n, v = shape
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(n, v, generator=g) * 4
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.2] = IGNORE
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)

    stats = cpu_backend.logits_stats(
        logits, targets, temperature=temperature, ignore_index=IGNORE, with_entropy=True
    )
    truth = _torch_row_stats(logits.double(), targets, temperature)
    base = _torch_row_stats(logits, targets, temperature)
    for name, ours, t, b in zip(("logprobs", "entropy", "lse"), stats, truth, base):
        assert_error_within(ours, t, b, name=name)

    def grad(x):
        x = x.detach().requires_grad_()
        lp, ent, _ = _torch_row_stats(x, targets, temperature)
        (lp * g_lp.to(x.dtype) + ent * g_ent.to(x.dtype)).sum().backward()
        return x.grad

    buf = logits.clone()
    out = cpu_backend.logits_grad_(
        buf, targets, stats[2], stats[1], g_lp, g_ent, temperature=temperature, ignore_index=IGNORE
    )
    assert out is buf
    assert_error_within(buf, grad(logits.double()), grad(logits), name="dlogits")

    # Without grad_entropy: only the log-prob term.
    buf = logits.clone()
    cpu_backend.logits_grad_(
        buf, targets, stats[2], stats[1], g_lp, None, temperature=temperature, ignore_index=IGNORE
    )
    x = logits.double().requires_grad_()
    (_torch_row_stats(x, targets, temperature)[0] * g_lp.double()).sum().backward()
    torch.testing.assert_close(buf.double(), x.grad, rtol=1e-4, atol=1e-6)


def test_logits_stats_agrees_with_blocked_op():
    """One implementation of the math: the logits-block epilogue and the blocked op give the same numbers."""
    hidden, weight, bias, targets = _inputs(50, 32, 9000, F32, bias=True, seed=4)
    logits = hidden @ weight.T + bias
    stats = cpu_backend.logits_stats(logits, targets, temperature=0.7, ignore_index=IGNORE, with_entropy=True)
    out = cpu_backend.forward(
        hidden, weight, bias, targets, temperature=0.7, ignore_index=IGNORE, with_entropy=True
    )
    valid = targets != IGNORE  # the blocked op skips ignored rows: their lse is 0 there
    for a, b in zip(stats, out[:3]):
        torch.testing.assert_close(a[valid], b[valid], rtol=2e-6, atol=2e-6)


def test_fake_implementations_match():
    hidden, weight, bias, targets = _inputs(6, 8, 20, F32, bias=True)
    torch.library.opcheck(
        torch.ops.care_kernels.linear_logprobs_fwd_cpu,
        (hidden, weight, bias, targets, hidden, weight, None, 0.7, IGNORE, True),
    )
    lp, ent, lse, _ = cpu_backend.forward(
        hidden, weight, bias, targets, temperature=0.7, ignore_index=IGNORE, with_entropy=True
    )
    torch.library.opcheck(
        torch.ops.care_kernels.linear_logprobs_bwd_cpu,
        (torch.randn(6), torch.randn(6), hidden, weight, bias, targets, lse, ent, 0.7, IGNORE, True),
    )
    logits = torch.randn(6, 20)
    torch.library.opcheck(torch.ops.care_kernels.logits_stats_cpu, (logits, targets, 0.7, IGNORE, True))
    torch.library.opcheck(
        torch.ops.care_kernels.logits_grad_cpu_,
        (logits, targets, lse, ent, torch.randn(6), None, 0.7, IGNORE),
    )


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from care_kernels import cpu_backend

    def status_kb(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    N, H, V = 4096, 256, 151936
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.2
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -100
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    # Library start-up (BLAS buffers, thread pools) belongs to the baseline, not to the op's workspace.
    lp, ent, lse, _ = cpu_backend.forward(hidden[:8], weight[:4096], None, targets[:8] % 4096,
                                          temperature=1.0, ignore_index=-100, with_entropy=True)
    cpu_backend.backward(g_lp[:8], g_ent[:8], hidden[:8], weight[:4096], None, targets[:8] % 4096, lse, ent,
                         temperature=1.0, ignore_index=-100)
    del lp, ent, lse
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    base_kb = status_kb("VmRSS")
    lp, ent, lse, _ = cpu_backend.forward(hidden, weight, None, targets, temperature=1.0, ignore_index=-100,
                                          with_entropy=True)
    gh, gw, _ = cpu_backend.backward(g_lp, g_ent, hidden, weight, None, targets, lse, ent, temperature=1.0,
                                     ignore_index=-100)
    peak_kb = status_kb("VmHWM")
    outputs = sum(t.numel() * t.element_size() for t in (lp, ent, lse, gh, gw))
    print(json.dumps({"extra": peak_kb * 1024 - base_kb * 1024 - outputs, "logits_bytes": N * V * 4,
                      "finite": bool(torch.isfinite(gw).all() and torch.isfinite(gh).all())}))
""")


def test_peak_memory_far_below_logits(tmp_path):
    """fwd+bwd at N=4096, H=256, V=151936 fp32: workspace < 10% of the [N, V] fp32 logits (249 MB)."""
    # cwd outside the checkout: `python -c` must import the installed package (with its built extension).
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["finite"]
    assert result["extra"] < 0.1 * result["logits_bytes"], (
        f"workspace {result['extra'] / 2**20:.1f} MiB >= 10% of the [N, V] fp32 logits "
        f"({result['logits_bytes'] / 2**20:.0f} MiB)"
    )
