"""Bit-reproducibility of the CPU paths, and independence from the machine's instruction set.

The same inputs and the same number of threads must give bitwise-identical log-probs, entropy and gradients,
whatever the threads' timing: each case below runs several times while a busy process competes for the cores
(so the threads finish their work in a different order each time) and must match a quiet run bit for bit.
The shapes make the threads' work uneven on purpose: a vocabulary that leaves short tiles, several token tiles,
and the ignored rows clustered at the start. The row epilogues' SIMD builds (AVX-512, AVX2, scalar) must
return the same bits as each other.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import care_kernels as ck
from care_kernels import _ext, cpu_backend

pytestmark = pytest.mark.skipif(
    not cpu_backend.available(), reason=f"care_kernels._C is not built ({_ext.why_not('_C')}); run `pip install .`"
)

IGNORE = -100
N, H, V = 1100, 24, 3000  # 3 token tiles of <= 512 rows; V splits into ranges with short last tiles


@contextlib.contextmanager
def _busy_core():
    """A process that keeps one core busy, so the kernel's threads run at uneven speeds."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.6).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[: N // 3] = IGNORE  # all on the first token tile
    ref_hidden = torch.randn(N, H, generator=g)
    ref_weight = torch.randn(V, H, generator=g) * 0.6
    return hidden, weight, bias, targets, ref_hidden, ref_weight


def _single(dtype, impl="cpp", vocab=V):
    hidden, weight, bias, targets, _, _ = _inputs(dtype)
    weight, bias, targets = weight[:vocab], bias[:vocab], targets.where(targets < vocab, IGNORE)
    h, w, b = (x.detach().requires_grad_() for x in (hidden, weight, bias))
    logprobs, entropy = ck.linear_logprobs(h, w, targets, b, temperature=0.8, return_entropy=True, impl=impl)
    g = torch.Generator().manual_seed(1)
    (logprobs * torch.randn(N, generator=g) + entropy * torch.randn(N, generator=g)).sum().backward()
    return [logprobs, entropy, h.grad, w.grad, b.grad]


def _dual(dtype):
    hidden, weight, bias, targets, ref_hidden, ref_weight = _inputs(dtype)
    h, w = (x.detach().requires_grad_() for x in (hidden, weight))
    logprobs, ref_logprobs, entropy = ck.dual_linear_logprobs(
        h, w, ref_hidden, ref_weight, targets, bias, temperature=1.3, return_entropy=True, impl="cpp"
    )
    (logprobs.sum() - 0.3 * entropy.sum()).backward()
    return [logprobs, ref_logprobs, entropy, h.grad, w.grad]


def _fused_loss(dtype):
    hidden, weight, bias, targets, _, _ = _inputs(dtype)
    b, t = 20, N // 20
    h = hidden.view(b, t, H).detach().requires_grad_()
    w, bb = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    mask = (targets != IGNORE).view(b, t).float()
    ids = targets.clamp(min=0).view(b, t)
    adv = torch.linspace(-1, 1, b)
    ref = torch.full((b, t), -8.0)
    loss_fn = ck.FusedLinearGRPOLoss(beta=0.04, loss_type="grpo", temperature=0.9, chunk_size=1)
    loss, metrics = loss_fn(h, w, ids, mask, adv, bias=bb, ref_per_token_logps=ref)
    loss.backward()
    return [loss, *metrics, h.grad, w.grad, bb.grad]


CASES = {
    "linear_logprobs": _single,
    "dual_linear_logprobs": _dual,
    "FusedLinearGRPOLoss": _fused_loss,
    "one vocabulary tile": lambda dtype: _single(dtype, vocab=1000),  # one range: BLAS threads the GEMMs itself
    "impl=torch": lambda dtype: _single(dtype, impl="torch"),
}


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_same_inputs_same_threads_same_bits(case, dtype, threads):
    run = CASES[case]
    with _threads(threads):
        first = [x.detach().clone() for x in run(dtype)]
        with _busy_core():
            repeats = [run(dtype) for _ in range(3)]
    for k, again in enumerate(repeats):
        for i, (a, b) in enumerate(zip(first, again)):
            same = a.dtype == b.dtype and torch.equal(a, b)
            assert same, (
                f"{case} run {k + 1}, output {i}: differs from the first run by up to "
                f"{(a.double() - b.double()).abs().max().item():.3e}"
            )


_EPILOGUE_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, numpy as np, torch
    from care_kernels import cpu_backend
    # numpy's generator: torch.randn's own vectorized kernels differ between ATen's AVX2 and default builds.
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.standard_normal((37, 5011), dtype=np.float32) * 4)
    targets = torch.from_numpy(rng.integers(0, 5011, 37))
    targets[3] = -100
    g_lp, g_ent = (torch.from_numpy(rng.standard_normal(37, dtype=np.float32)) for _ in range(2))
    lp, ent, lse = cpu_backend.logits_stats(logits, targets, temperature=0.7, ignore_index=-100, with_entropy=True)
    grad = logits.clone()
    cpu_backend.logits_grad_(grad, targets, lse, ent, g_lp, g_ent, temperature=0.7, ignore_index=-100)
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in (lp, ent, lse, grad))).hexdigest()
    print(json.dumps({"isa": cpu_backend.isa(), "digest": digest}))
    """
)


_FULL_OP_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, numpy as np, torch
    import care_kernels as ck
    from care_kernels import cpu_backend
    rng = np.random.default_rng(1)
    h = torch.from_numpy(rng.standard_normal((300, 24), dtype=np.float32)).requires_grad_()
    w = torch.from_numpy(rng.standard_normal((3000, 24), dtype=np.float32) * 0.6).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(3000, dtype=np.float32) * 0.5)  # the epilogues' bias path
    y = torch.from_numpy(rng.integers(0, 3000, 300))
    lp, ent = ck.linear_logprobs(h, w, y, b, temperature=0.7, return_entropy=True, impl="cpp")
    (lp.sum() - 0.5 * ent.sum()).backward()
    digest = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in (lp, ent, h.grad, w.grad))).hexdigest()
    print(json.dumps({"isa": cpu_backend.isa(), "digest": digest}))
    """
)


def _epilogues_under(capability, script, env, cwd):
    out = subprocess.run([sys.executable, "-c", script], env=env(ATEN_CPU_CAPABILITY=capability), cwd=cwd,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "script", [_EPILOGUE_SCRIPT, _FULL_OP_SCRIPT], ids=["epilogue_ops", "linear_logprobs_with_bias"]
)
def test_row_epilogue_builds_return_the_same_bits(script, package_env, tmp_path):
    native = torch.backends.cpu.get_cpu_capability().lower()
    results = {cap: _epilogues_under(cap, script, package_env, tmp_path) for cap in ("default", "avx2", "avx512")}
    assert results["default"]["isa"] == "default"
    if native in ("avx2", "avx512"):
        assert results["avx2"]["isa"] == "avx2"  # ATen's choice is followed (and clamped to the CPU)
    if native == "avx512":
        assert results["avx512"]["isa"] == "avx512"
    digests = {cap: r["digest"] for cap, r in results.items()}
    assert len(set(digests.values())) == 1, f"the SIMD builds disagree: {digests}"


def test_backward_in_several_row_passes_gives_the_same_bits(monkeypatch):
    """With more scored rows than the dH partials' budget, the backward runs in passes over the rows; the
    passes start at token-tile boundaries, so every sum keeps its order and the bits do not change."""
    with _threads(2):
        one_pass = [x.detach().clone() for x in _single(torch.float32)]
        monkeypatch.setenv("CARE_KERNELS_CPU_PARTIAL_DH_BYTES", str(512 * H * 4))  # 512 rows per pass: 2 passes
        passes = _single(torch.float32)
    for a, b in zip(one_pass, passes):
        assert torch.equal(a, b)
