"""ck.FusedLinearGRPOLoss: a drop-in for Liger's LigerFusedLinearGRPOLoss, at 8NHV flops for the head."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import care_kernels as ck
from care_kernels.reference.naive import naive_linear_logprobs

liger_chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is in the [test] extra")

B, T, H, V = 3, 6, 16, 70


def _inputs(dtype=torch.float32, bias=False):
    x = torch.randn(B, T, H, dtype=dtype)
    w = (torch.randn(V, H) / 4).to(dtype)
    b = (torch.randn(V) * 0.1).to(dtype) if bias else None
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    adv = torch.randn(B)
    with torch.no_grad():
        logp, _ = naive_linear_logprobs(x, w, ids, b)
    old = logp + 0.3 * torch.randn(B, T)  # ratios away from 1, so clipping happens
    ref = logp + 0.2 * torch.randn(B, T)
    return x, w, b, ids, mask, adv, old, ref


def _run(loss_cls, x, w, b, ids, mask, adv, **call):
    xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
    bb = None if b is None else b.detach().requires_grad_()
    loss, metrics = loss_cls(xx, ww, ids, mask, adv, bias=bb, **call)
    loss.backward()
    return loss, metrics, xx.grad, ww.grad, None if bb is None else bb.grad


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def _close_runs(got, want):
    """Two `_run` results: loss, every metric, and the gradients w.r.t. input, weight and bias."""
    for what, a, c in zip(("loss", "metrics", "d_input", "d_weight", "d_bias"), got, want):
        for u, v in zip(a, c) if isinstance(a, list) else [(a, c)]:
            _close(u, v, what)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_old", [False, True])
@pytest.mark.parametrize("ref_mode", ["precomputed", "ref_input"])
def test_matches_liger(loss_type, beta, with_old, ref_mode):
    x, w, b, ids, mask, adv, old, ref = _inputs(bias=ref_mode == "ref_input")
    ref_x, ref_w = x + 0.05 * torch.randn_like(x), w * 0.95
    kw = dict(beta=beta, loss_type=loss_type, use_ref_model=beta != 0, max_completion_length=T, temperature=0.9)
    call = dict(old_per_token_logps=old if with_old else None)
    if beta != 0:
        call.update(dict(ref_per_token_logps=ref) if ref_mode == "precomputed" else
                    dict(ref_input=ref_x, ref_weight=ref_w, ref_bias=b))
    ours = _run(ck.FusedLinearGRPOLoss(**kw), x, w, b, ids, mask, adv, **call)
    theirs = _run(liger_chunked.LigerFusedLinearGRPOLoss(compiled=False, **kw), x, w, b, ids, mask, adv, **call)
    _close(ours[0], theirs[0], "loss")
    assert len(ours[1]) == len(theirs[1]) == (2 if beta != 0 else 1)
    for mine, liger in zip(ours[1], theirs[1]):
        _close(mine, liger, "metric")
    for name, mine, liger in zip(("d_input", "d_weight", "d_bias"), ours[2:], theirs[2:]):
        if liger is not None:
            _close(mine, liger, name)


def test_equals_linear_logprobs_then_policy_loss():
    """The fused head is the composition of the two public pieces, not a second copy of the math."""
    x, w, b, ids, mask, adv, old, _ = _inputs(bias=True)
    fused = _run(ck.FusedLinearGRPOLoss(beta=0.0, loss_type="grpo", temperature=1.3), x, w, b, ids, mask, adv,
                 old_per_token_logps=old)

    def composed(xx, ww, ids, mask, adv, bias):
        logp = ck.linear_logprobs(xx, ww, ids, bias, temperature=1.3)
        loss, m = ck.policy_loss(logp, adv, mask, old_logprobs=old, loss_type="grpo", epsilon_high=0.2)
        return loss, [m["clip_ratio"]]

    _close_runs(fused, _run(composed, x, w, b, ids, mask, adv))


def test_kl_clamp_reaches_the_loss():
    """kl_clamp goes into the per-token gradient formed in the forward, as policy_loss applies it."""
    x, w, b, ids, mask, adv, old, ref = _inputs(bias=True)
    ref = ref.clone()
    ref[0, :2] += 15.0  # two tokens the clamp binds on
    kw = dict(beta=0.5, loss_type="bnpo", kl_clamp=10.0)
    fused = _run(ck.FusedLinearGRPOLoss(**kw), x, w, b, ids, mask, adv, ref_per_token_logps=ref)

    def composed(xx, ww, ids, mask, adv, bias):
        logp = ck.linear_logprobs(xx, ww, ids, bias)
        loss, m = ck.policy_loss(logp, adv, mask, ref_logprobs=ref, epsilon_high=0.2, **kw)
        return loss, [m["kl"], m["clip_ratio"]]

    _close_runs(fused, _run(composed, x, w, b, ids, mask, adv))
    unclamped = _run(ck.FusedLinearGRPOLoss(beta=0.5, loss_type="bnpo"), x, w, b, ids, mask, adv,
                     ref_per_token_logps=ref)
    assert unclamped[0] > fused[0] * 100
    with pytest.raises(ValueError, match="kl_clamp"):
        ck.FusedLinearGRPOLoss(kl_clamp=-1.0)


def test_head_costs_eight_nhv():
    """Policy forward + backward + reference forward: 8NHV matmul flops (10NHV for log-prob op + loss)."""
    x, w, _, ids, _, adv, _, _ = _inputs()
    mask = torch.ones(B, T)
    loss_fn = ck.FusedLinearGRPOLoss(beta=0.04, loss_type="grpo", max_buffer_bytes=V * 4 * 5)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    with MatmulFlops() as counter:
        loss, _ = loss_fn(xx, ww, ids, mask, adv, ref_input=x, ref_weight=w)
        loss.backward()
    assert counter.flops == 8 * B * T * H * V


class MatmulFlops(TorchDispatchMode):
    """Counts 2*m*k*n for every aten mm / addmm call, whatever the overload (out= variants included)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def test_fully_masked_sequence_gives_no_nan():
    x, w, _, ids, mask, adv, old, ref = _inputs()
    mask[1] = 0
    loss, metrics, gx, gw, _ = _run(ck.FusedLinearGRPOLoss(beta=0.04, loss_type="grpo"), x, w, None, ids, mask,
                                    adv, ref_per_token_logps=ref, old_per_token_logps=old)
    for t in (loss, *metrics, gx, gw):
        assert torch.isfinite(t).all()
    assert (gx[1] == 0).all()


def test_bfloat16_head_gradients_in_input_dtype():
    x, w, _, ids, mask, adv, _, _ = _inputs(torch.bfloat16)
    loss, _, gx, gw, _ = _run(ck.FusedLinearGRPOLoss(beta=0.0, loss_type="grpo"), x, w, None, ids, mask, adv)
    assert gx.dtype == gw.dtype == torch.bfloat16 and torch.isfinite(loss)
    ref = _run(ck.FusedLinearGRPOLoss(beta=0.0, loss_type="grpo"), x.float(), w.float(), None, ids, mask, adv)
    torch.testing.assert_close(gx.float(), ref[2], rtol=0.05, atol=2e-3)


def test_bad_input_errors():
    x, w, _, ids, mask, adv, _, _ = _inputs()
    loss_fn = ck.FusedLinearGRPOLoss(beta=0.04, loss_type="grpo")
    with pytest.raises(ValueError, match="ref_per_token_logps, or ref_input"):
        loss_fn(x, w, ids, mask, adv)
    with pytest.raises(ValueError, match=r"advantages must be \[B\]"):
        ck.FusedLinearGRPOLoss(beta=0.0)(x, w, ids, mask, adv[:2])
    with pytest.raises(ValueError, match="loss_type"):
        ck.FusedLinearGRPOLoss(beta=0.0, loss_type="ppo")(x, w, ids, mask, adv)
    with pytest.raises(ValueError, match=r"_input must be \[B, T, H\]"):
        ck.FusedLinearGRPOLoss(beta=0.0)(x[0], w, ids[0], mask[0], adv)


@pytest.mark.parametrize("rows_per_chunk", [1, 4, 5, 13])
def test_chunking_does_not_change_the_result(rows_per_chunk):
    """16 active tokens in chunks of at most 1, 4, 5 (balanced to 4 x 4) or 13 (2 x 8) rows: the same loss,
    metrics and gradients as one chunk holding every row."""
    x, w, b, ids, mask, adv, old, _ = _inputs(bias=True)
    ref_x, ref_w = x + 0.05 * torch.randn_like(x), w * 0.95
    kw = dict(beta=0.04, loss_type="dapo", use_ref_model=True, temperature=1.3)
    call = dict(old_per_token_logps=old, ref_input=ref_x, ref_weight=ref_w, ref_bias=b)
    whole = _run(ck.FusedLinearGRPOLoss(**kw, max_buffer_bytes=B * T * V * 4), x, w, b, ids, mask, adv, **call)
    split = _run(ck.FusedLinearGRPOLoss(**kw, max_buffer_bytes=rows_per_chunk * V * 4), x, w, b, ids, mask, adv,
                 **call)
    _close_runs(split, whole)


def test_fully_masked_batch_gives_zero_gradients_and_no_nan():
    """No active token: the dW buffer is never written by a chunk, so it must come back zero (not uninitialised)."""
    x, w, b, ids, _, adv, _, _ = _inputs(bias=True)
    loss, _, dx, dw, db = _run(ck.FusedLinearGRPOLoss(beta=0.0, loss_type="grpo"), x, w, b, ids,
                               torch.zeros(B, T), adv)
    assert torch.isfinite(loss)
    for g in (dx, dw, db):
        assert torch.equal(g, torch.zeros_like(g))


def test_backward_scales_by_the_upstream_gradient():
    x, w, b, ids, mask, adv, _, _ = _inputs()
    loss_fn = ck.FusedLinearGRPOLoss(beta=0.0, loss_type="grpo")
    grads = []
    for scale in (1.0, -2.5):
        xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
        loss, _ = loss_fn(xx, ww, ids, mask, adv)
        (loss * scale).backward()
        grads.append((xx.grad, ww.grad))
    for unit, scaled in zip(*grads):
        _close(scaled, -2.5 * unit, "scaled gradient")


@pytest.mark.parametrize("path", ["cpp", "torch"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_stats_are_the_policy_logprobs_and_entropy(path, temperature, monkeypatch):
    """return_token_stats hands back what linear_logprobs(..., return_entropy=True) computes, from the same pass,
    and asking for it changes neither the loss nor the gradients."""
    from care_kernels import backends, row_epilogue

    if path == "torch":
        monkeypatch.setattr(row_epilogue, "_use_cpp", lambda logits: False)
    elif not backends.cpp_status()[0]:
        pytest.skip("the C++ extension is not built")
    x, w, b, ids, mask, adv, old, _ = _inputs(bias=True)
    loss_fn = ck.FusedLinearGRPOLoss(beta=0.0, loss_type="grpo", temperature=temperature)
    plain = _run(loss_fn, x, w, b, ids, mask, adv, old_per_token_logps=old)
    loss, metrics, stats = loss_fn(x, w, ids, mask, adv, bias=b, old_per_token_logps=old, return_token_stats=True,
                                   return_entropy=True)
    with_stats = _run(lambda *a, **k: loss_fn(*a, **k, return_token_stats=True)[:2], x, w, b, ids, mask, adv,
                      old_per_token_logps=old)
    for a, c in zip(plain, with_stats):
        for u, v in zip(a, c) if isinstance(a, list) else [(a, c)]:
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    want_logp, want_entropy = naive_linear_logprobs(x.double(), w.double(), ids, b.double(), temperature=temperature)
    active = mask.bool()
    assert stats.logprobs.shape == stats.entropy.shape == (B, T) and not stats.logprobs.requires_grad
    torch.testing.assert_close(stats.logprobs[active].double(), want_logp[active], rtol=0, atol=1e-5)
    torch.testing.assert_close(stats.entropy[active].double(), want_entropy[active], rtol=0, atol=1e-5)
    assert not stats.logprobs[~active].any() and not stats.entropy[~active].any()
    assert loss_fn(x, w, ids, mask, adv, bias=b, return_token_stats=True)[2].entropy is None


def test_reference_scored_in_the_head_gives_a_zero_kl_gradient_at_equal_weights():
    """With the reference scored by the head's own code (ref_input/ref_weight), a reference equal to the policy
    gives equal log-probs bit for bit: with zero advantages every gradient is exactly 0. (Log-probs from another
    kernel differ by rounding; AdamW would scale that gradient up to full steps.)"""
    x, w, b, ids, mask, _, _, _ = _inputs(bias=True)
    zero_adv = torch.zeros(B)
    loss_fn = ck.FusedLinearGRPOLoss(beta=0.04, loss_type="grpo", temperature=0.8)
    xx, ww, bb = x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_()
    loss, (kl, _), stats = loss_fn(xx, ww, ids, mask, zero_adv, bias=bb, ref_input=x, ref_weight=w, ref_bias=b,
                                   return_token_stats=True)
    loss.backward()
    assert torch.equal(stats.logprobs, stats.ref_logprobs) and kl == 0
    assert not xx.grad.any() and not ww.grad.any() and not bb.grad.any()
    assert loss_fn(x, w, ids, mask, zero_adv, bias=b, ref_per_token_logps=stats.logprobs,
                   return_token_stats=True)[2].ref_logprobs is None
