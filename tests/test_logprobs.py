"""ck.linear_logprobs / ck.dual_linear_logprobs through the public API, for every available implementation.

Ground truth: the naive materialized computation in float64. Each implementation's error must be at
most twice the error of the same-dtype naive torch computation (plus a tiny floor).
"""

import math

import pytest
import torch

import care_kernels as ck
from care_kernels import backends
from care_kernels.reference.naive import naive_linear_logprobs
from care_kernels.testing import assert_error_within

CPU_IMPLS = ["torch", "cpp", "triton"]


def _require(impl):
    """Skip unless `impl` can run on CPU tensors here (Triton only under TRITON_INTERPRET=1)."""
    try:
        backends.resolve(impl, torch.device("cpu"))
    except ValueError as exc:
        pytest.skip(str(exc))


def _problem(n, h, v, dtype, bias, lead=None, ignore_frac=0.2, scale=1.0):
    shape = (n,) if lead is None else (*lead, n // math.prod(lead))
    hidden = (torch.randn(*shape, h) * scale).to(dtype)
    weight = (torch.randn(v, h) / math.sqrt(h) * 2).to(dtype)
    b = (torch.randn(v) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, v, shape)
    targets[torch.rand(shape) < ignore_frac] = -100
    return hidden, weight, b, targets


def _truth_and_baseline(hidden, weight, bias, targets, temperature, g_lp, g_ent):
    """(float64 truth, same-dtype naive) values and gradients."""
    out = []
    for dtype in (torch.float64, None):
        leaves = [x.detach().to(dtype or x.dtype).requires_grad_() if x is not None else None
                  for x in (hidden, weight, bias)]
        lp, ent = naive_linear_logprobs(leaves[0], leaves[1], targets, leaves[2], temperature=temperature)
        (lp.double() * g_lp.double() + ent.double() * g_ent.double()).sum().backward()
        out.append((lp.detach(), ent.detach(), *[None if x is None else x.grad for x in leaves]))
    return out


CASES = [
    # n, h, v, dtype, bias, temperature, lead
    (1, 16, 1, torch.float32, False, 1.0, None),
    (7, 16, 5, torch.float32, True, 0.7, None),
    (130, 100, 1000, torch.float32, True, 1.3, (2,)),
    (130, 100, 1000, torch.bfloat16, False, 1.0, (5, 2)),
    (130, 100, 1000, torch.float16, True, 0.7, None),
    (1100, 16, 1000, torch.float32, False, 1.0, None),
    (7, 896, 151936, torch.float32, True, 1.0, None),
    (9, 100, 151936, torch.bfloat16, True, 1.3, (3,)),
]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("n,h,v,dtype,bias,temperature,lead", CASES)
def test_matches_float64_truth(impl, n, h, v, dtype, bias, temperature, lead):
    _require(impl)
    if impl == "triton" and n * v > 200_000:
        pytest.skip("interpreted Triton: large shapes are covered on GPU (tests marked gpu)")
    hidden, weight, b, targets = _problem(n, h, v, dtype, bias, lead)
    g_lp, g_ent = torch.randn(targets.shape), torch.randn(targets.shape)
    leaves = [x.detach().requires_grad_() if x is not None else None for x in (hidden, weight, b)]
    lp, ent = ck.linear_logprobs(leaves[0], leaves[1], targets, leaves[2], temperature=temperature,
                                 return_entropy=True, impl=impl)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == targets.shape
    (lp * g_lp + ent * g_ent).sum().backward()
    truth, base = _truth_and_baseline(hidden, weight, b, targets, temperature, g_lp, g_ent)
    ours = (lp, ent, *[None if x is None else x.grad for x in leaves])
    for name, o, t, s in zip(("logprobs", "entropy", "d_hidden", "d_weight", "d_bias"), ours, truth, base):
        if t is None:
            continue
        if o is not None and o.dtype != torch.float32 and name.startswith("d_"):
            assert o.dtype == dtype, f"{name} must come back in the input dtype"
        assert_error_within(o.float(), t, s.float(), name=f"{impl}/{name}")
    valid = targets != -100
    assert (lp[valid] <= 1e-6).all()
    assert (ent >= -1e-5).all() and (ent <= math.log(v) + 1e-4).all()
    assert (lp[~valid] == 0).all() and (ent[~valid] == 0).all()


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_dual_matches_two_single_passes(impl):
    _require(impl)
    hidden, weight, b, targets = _problem(40, 32, 300, torch.float16, True, (4,))
    ref_hidden = hidden.float() + 0.1 * torch.randn(hidden.shape)
    ref_weight, ref_bias = weight.float() * 0.9, b.float()
    h = hidden.detach().requires_grad_()
    lp, ref_lp, ent = ck.dual_linear_logprobs(h, weight, ref_hidden, ref_weight, targets, b, ref_bias,
                                              temperature=0.7, return_entropy=True, impl=impl)
    assert not ref_lp.requires_grad and lp.requires_grad
    truth_ref, _ = naive_linear_logprobs(ref_hidden.double(), ref_weight.double(), targets, ref_bias.double(),
                                         temperature=0.7)
    base_ref, _ = naive_linear_logprobs(ref_hidden, ref_weight, targets, ref_bias, temperature=0.7)
    assert_error_within(ref_lp, truth_ref, base_ref, name="ref_logprobs")
    single = ck.linear_logprobs(hidden, weight, targets, b, temperature=0.7, impl=impl)
    torch.testing.assert_close(lp, single, rtol=0, atol=1e-5)
    lp.sum().backward()
    assert h.grad is not None and h.grad.dtype == torch.float16


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_gradcheck_float64(impl):
    _require(impl)
    hidden, weight, b, targets = _problem(6, 5, 7, torch.float64, True)
    targets[0] = -100

    def f(h, w, bb):
        lp, ent = ck.linear_logprobs(h, w, targets, bb, temperature=0.8, return_entropy=True, impl=impl)
        return lp, ent

    assert torch.autograd.gradcheck(f, [x.requires_grad_() for x in (hidden, weight, b)])


def test_auto_picks_a_live_backend():
    impl = backends.resolve("auto", torch.device("cpu"))
    assert impl == ("cpp" if backends.cpp_status()[0] else "torch")


def test_non_contiguous_inputs():
    hidden = torch.randn(16, 40)[:, ::2]  # [16, 20], stride 2
    weight = torch.randn(20, 50).T  # [50, 20], transposed view
    targets = torch.randint(0, 50, (32,))[::2]
    got = ck.linear_logprobs(hidden, weight, targets)
    want, _ = naive_linear_logprobs(hidden.double(), weight.double(), targets)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_empty_tokens_give_empty_outputs_and_zero_grads():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    lp, ent = ck.linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert lp.shape == ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert weight.grad is not None and (weight.grad == 0).all()


def test_works_under_torch_compile():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (2, 5))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(h, w):
        lp, ent = ck.linear_logprobs(h, w, targets, temperature=0.9, return_entropy=True, check_finite=False)
        return (lp + 0.1 * ent).sum()

    out = step(hidden, weight)
    out.backward()
    want_lp, want_ent = naive_linear_logprobs(hidden.detach().double(), weight.detach().double(), targets,
                                              temperature=0.9)
    torch.testing.assert_close(out.double(), (want_lp + 0.1 * want_ent).sum(), rtol=1e-5, atol=1e-5)
    assert hidden.grad is not None and weight.grad is not None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight=torch.randn(10, 7)), "hidden size"),
        (dict(weight=torch.randn(10, 8, dtype=torch.float16)), "cast both"),
        (dict(targets=torch.tensor([0, 10, 3])), r"targets must lie in \[0, 10\)"),
        (dict(targets=torch.tensor([0, -5, 3])), "found"),
        (dict(targets=torch.zeros(4, dtype=torch.long)), "shape of hidden"),
        (dict(targets=torch.zeros(3)), "integer tensor"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(hidden=torch.tensor([[1.0] * 8, [float("nan")] * 8, [0.0] * 8])), "NaN or inf"),
        (dict(bias=torch.randn(9)), "bias must have shape"),
        (dict(impl="cuda"), "impl must be one of"),
        (dict(hidden=torch.randint(0, 3, (3, 8))), "float32, bfloat16 or float16"),
        (dict(hidden=torch.randn(3, 0), weight=torch.randn(10, 0)), "H = 0"),
    ],
)
def test_bad_input_is_a_clear_value_error(kwargs, match):
    args = dict(hidden=torch.randn(3, 8), weight=torch.randn(10, 8), targets=torch.tensor([0, 9, -100]),
                bias=None, temperature=1.0, impl="torch")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ck.linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def test_non_finite_hidden_is_documented_nan_when_unchecked():
    """With check_finite=False, a non-finite row gives NaN for that row only (never for the others)."""
    hidden = torch.randn(3, 8)
    hidden[1, 2] = float("inf")
    lp = ck.linear_logprobs(hidden, torch.randn(10, 8), torch.tensor([1, 2, 3]), check_finite=False,
                            impl="torch")
    assert torch.isfinite(lp[[0, 2]]).all() and not torch.isfinite(lp[1])


def test_dual_requires_reference():
    with pytest.raises(ValueError, match="ref_hidden and ref_weight"):
        ck.dual_linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), None, None, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="vocabulary size"):
        ck.dual_linear_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(6, 4),
                                torch.tensor([0, 1]))
