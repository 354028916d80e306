"""Row epilogues of the fused GRPO head: Triton (interpreted on CPU, compiled on GPU) and C++ vs torch."""

import pytest
import torch

import care_kernels as ck
from care_kernels import backends, row_epilogue

IGNORE = -100


def _torch_stats(z, y, t):
    """float64 truth: (logprobs, lse, entropy), logprobs and entropy 0 at ignored targets."""
    zz = z.double() / t
    lse = torch.logsumexp(zz, 1)
    valid = y != IGNORE
    logp = torch.where(valid, zz.gather(1, y.clamp(min=0)[:, None])[:, 0] - lse, torch.zeros_like(lse))
    entropy = torch.where(valid, lse - (torch.softmax(zz, 1) * zz).sum(1), torch.zeros_like(lse))
    return logp, lse, entropy


def _torch_grad(z, y, lse, g, t):
    p = torch.exp(z.double() / t - lse.double()[:, None])
    valid = (y != IGNORE).double()
    onehot = torch.zeros_like(p).scatter_(1, y.clamp(min=0)[:, None], 1.0)
    return (g.double() * valid)[:, None] * (onehot - p) / t


def _triton_rows(device):
    ok, why = backends.triton_status()
    if not ok or (device.type == "cpu" and not __import__("os").environ.get("TRITON_INTERPRET")):
        pytest.skip(f"Triton unavailable here: {why}")
    from care_kernels.triton import row_epilogue as rows

    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v,t", [(1, 7, 1.0), (5, 1000, 0.7), (3, 5000, 1.3)])
def test_triton_rows_match_torch(device, dtype, n, v, t):
    rows = _triton_rows(device)
    z = (torch.randn(n, v, device=device) * 3).to(dtype)
    y = torch.randint(0, v, (n,), device=device)
    y[0] = IGNORE
    logp, lse, entropy = rows.row_stats(z, y, t, IGNORE, with_entropy=True)
    want_logp, want_lse, want_entropy = _torch_stats(z, y, t)
    torch.testing.assert_close(logp.double(), want_logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy.double(), want_entropy, rtol=0, atol=2e-5)
    assert rows.row_stats(z, y, t, IGNORE)[2] is None
    g = torch.randn(n, device=device)
    want = _torch_grad(z, y, lse, g, t)
    got = rows.row_grad_(z.clone(), y, lse, g, t, IGNORE)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("path", ["cpp", "torch"])
def test_cpu_rows_match_float64(path, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(row_epilogue, "_use_cpp", lambda logits: False)
    elif not backends.cpp_status()[0]:
        pytest.skip("the C++ extension is not built")
    z = torch.randn(6, 3000) * 2
    z[4] += 40.0  # large logits: the entropy must not cancel
    y = torch.randint(0, 3000, (6,))
    y[2] = IGNORE
    logp, lse, entropy = row_epilogue.row_stats(z, y, 0.8, IGNORE, with_entropy=True)
    want_logp, want_lse, want_entropy = _torch_stats(z, y, 0.8)
    assert lse.dtype == (torch.float64 if path == "cpp" else torch.float32)
    torch.testing.assert_close(logp.double(), want_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=0)
    torch.testing.assert_close(entropy.double(), want_entropy, rtol=0, atol=1e-5)
    assert row_epilogue.row_stats(z, y, 0.8, IGNORE)[2] is None
    g = torch.randn(6)
    got = row_epilogue.row_grad_(z.clone(), y, lse, g, 0.8, IGNORE)
    torch.testing.assert_close(got.double(), _torch_grad(z, y, lse, g, 0.8), rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_head_on_gpu_matches_composed_ops(dtype):
    """bf16 buffers + Triton epilogues + fp32-accumulated dW agree with linear_logprobs -> policy_loss."""
    b, t, h, v = 4, 300, 512, 151936
    x = torch.randn(b, t, h, device="cuda", dtype=dtype)
    w = (torch.randn(v, h, device="cuda") / h**0.5).to(dtype)
    ids = torch.randint(0, v, (b, t), device="cuda")
    mask = (torch.rand(b, t, device="cuda") > 0.2).float()
    adv = torch.randn(b, device="cuda")
    loss_fn = ck.FusedLinearGRPOLoss(beta=0.0, loss_type="grpo", max_buffer_bytes=64 << 20)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = loss_fn(xx, ww, ids, mask, adv)
    loss.backward()
    x2, w2 = x.float().requires_grad_(), w.float().requires_grad_()
    logp = ck.linear_logprobs(x2, w2, ids, impl="torch")
    ref_loss, _ = ck.policy_loss(logp, adv, mask, loss_type="grpo")
    ref_loss.backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(loss.float(), ref_loss, rtol=tol, atol=1e-5)
    for got, want in ((xx.grad, x2.grad), (ww.grad, w2.grad)):
        err = (got.float() - want).abs().max() / want.abs().max()
        assert err < tol, f"relative gradient error {err:.2e}"
