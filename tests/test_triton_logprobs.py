"""The Triton log-prob backend against the float64 ground truth, within 2x the same-dtype naive torch error.

Without CUDA these run the kernels under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes
stay small. The tests marked `gpu` run the compiled kernels at real LM-head sizes.
"""

from __future__ import annotations

import contextvars
import math
import types

import pytest
import torch
import triton

from care_kernels.reference.naive import naive_linear_logprobs
from care_kernels.testing import assert_error_within
from care_kernels.triton import fp32_gemm, logits_gemm
from care_kernels.triton import linear_logprobs as tlp

IGNORE = -100


def make_inputs(n, h, v, dtype, device, *, bias=True, ignored=0.2, ref_dtype=None, logit_scale=2.0):
    """hidden [n, h], weight [v, h] (logits of std ~logit_scale), bias [v], targets (`ignored` ignored)."""
    hidden = torch.randn(n, h, device=device)
    weight = torch.randn(v, h, device=device) * (logit_scale / math.sqrt(h))
    b = torch.randn(v, device=device) * 0.5 if bias else None
    targets = torch.randint(0, v, (n,), device=device)
    targets[torch.rand(n, device=device) < ignored] = IGNORE
    inputs = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), bias=None if b is None else b.to(dtype))
    inputs["targets"] = targets
    if ref_dtype is not None:
        inputs["ref_hidden"] = (hidden + 0.1 * torch.randn_like(hidden)).to(ref_dtype)
        inputs["ref_weight"] = (weight + 0.01 * torch.randn_like(weight)).to(ref_dtype)
        inputs["ref_bias"] = None if b is None else (b + 0.1).to(ref_dtype)
    return inputs


def naive_outputs(hidden, weight, bias, targets, temperature, g_lp, g_ent, compute_dtype):
    """(logprobs, entropy, lse, grad_hidden, grad_weight, grad_bias) of the materialized torch computation."""
    leaves = [
        t.detach().to(compute_dtype).requires_grad_() if t is not None else None
        for t in (hidden, weight, bias)
    ]
    h, w, b = leaves
    logprobs, entropy = naive_linear_logprobs(
        h, w, targets, b, temperature=temperature, ignore_index=IGNORE, compute_dtype=compute_dtype
    )
    with torch.no_grad():
        logits = h @ w.T + (b if b is not None else 0)
        lse = torch.logsumexp(logits.to(logprobs.dtype) / temperature, dim=-1)
    loss = (logprobs * g_lp.to(logprobs.dtype)).sum()
    if g_ent is not None:
        loss = loss + (entropy * g_ent.to(entropy.dtype)).sum()
    loss.backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return (logprobs.detach(), entropy.detach(), lse, *grads)


def check_against_naive(inputs, temperature, *, with_entropy=True, grad_entropy=True, floor=1e-6):
    hidden, weight, bias, targets = (inputs[k] for k in ("hidden", "weight", "bias", "targets"))
    n = hidden.shape[0]
    g_lp = torch.randn(n, device=hidden.device)
    g_ent = torch.randn(n, device=hidden.device) if grad_entropy else None

    logprobs, entropy, lse, ref_logprobs = tlp.forward(
        hidden, weight, bias, targets, temperature=temperature, ignore_index=IGNORE, with_entropy=with_entropy
    )
    assert ref_logprobs is None
    grads = tlp.backward(
        g_lp, g_ent, hidden, weight, bias, targets, lse, entropy, temperature=temperature, ignore_index=IGNORE
    )
    ours = (logprobs, entropy, lse, *grads)

    truth = naive_outputs(hidden, weight, bias, targets, temperature, g_lp, g_ent, torch.float64)
    base = naive_outputs(hidden, weight, bias, targets, temperature, g_lp, g_ent, hidden.dtype)
    names = ("logprobs", "entropy", "lse", "grad_hidden", "grad_weight", "grad_bias")
    for name, got, want, baseline in zip(names, ours, truth, base):
        if name == "entropy" and not with_entropy:
            assert torch.equal(got, torch.zeros_like(got))
            continue
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == (torch.float32 if name in ("logprobs", "entropy", "lse") else hidden.dtype), name
        assert_error_within(got, want, baseline, factor=2.0, floor=floor, name=name)
    valid = targets != IGNORE
    assert torch.all(logprobs[~valid] == 0) and torch.all(entropy[~valid] == 0)
    assert torch.all(logprobs <= 0)
    return ours


SHAPES = [
    (1, 16, 1),
    (7, 16, 5),
    (7, 100, 1000),
    (130, 16, 5),
    (1, 100, 1000),
    (130, 100, 1000),
    (7, 300, 1000),
]
# (temperature, bias) cases, crossed with every shape and dtype
SETTINGS = [(1.0, True), (0.7, False), (1.3, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("temperature,bias", SETTINGS)
def test_matches_naive(device, dtype, n, h, v, temperature, bias):
    if device.type == "cuda" and (dtype, temperature) != (torch.bfloat16, 0.7):
        pytest.skip("on GPU the odd shapes run once (bf16, T=0.7); real sizes are in the gpu tests")
    check_against_naive(make_inputs(n, h, v, dtype, device, bias=bias), temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_entropy(device, dtype):
    """with_entropy=False and grad_entropy=None: the kernels' no-entropy variants."""
    inputs = make_inputs(130, 100, 1000, dtype, device)
    check_against_naive(inputs, 0.7, with_entropy=False, grad_entropy=False)


def test_entropy_forward_without_entropy_gradient(device):
    check_against_naive(make_inputs(7, 100, 1000, torch.float16, device), 1.0, grad_entropy=False)


@pytest.mark.parametrize(
    "dtype,ref_dtype,bias,ref_bias",
    [
        (torch.float16, torch.float32, True, True),
        (torch.bfloat16, torch.bfloat16, False, False),
        (torch.float32, torch.float16, True, True),
        (torch.bfloat16, torch.bfloat16, True, False),  # a bias on one model only
    ],
    ids=str,
)
def test_dual_scores_reference_in_same_launch(device, dtype, ref_dtype, bias, ref_bias):
    inputs = make_inputs(130, 100, 1000, dtype, device, bias=bias, ref_dtype=ref_dtype)
    if not ref_bias:
        inputs["ref_bias"] = None
    temperature = 0.7
    single = tlp.forward(
        inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"],
        temperature=temperature, ignore_index=IGNORE, with_entropy=True,
    )  # fmt: skip
    logprobs, entropy, lse, ref_logprobs = tlp.forward(
        inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"], temperature=temperature,
        ignore_index=IGNORE, with_entropy=True, ref_hidden=inputs["ref_hidden"],
        ref_weight=inputs["ref_weight"], ref_bias=inputs["ref_bias"],
    )  # fmt: skip
    for got, alone in zip((logprobs, entropy, lse), single[:3]):
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)

    ref_args = (inputs["ref_hidden"], inputs["ref_weight"], inputs["ref_bias"], inputs["targets"])
    n = inputs["targets"].shape[0]
    zeros = torch.zeros(n, device=device)
    truth = naive_outputs(*ref_args, temperature, zeros, None, torch.float64)[0]
    base = naive_outputs(*ref_args, temperature, zeros, None, ref_dtype)[0]
    assert ref_logprobs.dtype == torch.float32
    assert_error_within(ref_logprobs, truth, base, name="ref_logprobs")
    assert torch.all(ref_logprobs[inputs["targets"] == IGNORE] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_many_vocab_splits_and_dlogits_chunks(device, dtype, monkeypatch):
    """Many splits per row block (merge path) and a backward that needs several column chunks (fp32 dH)."""
    monkeypatch.setattr(tlp, "_num_programs_per_wave", lambda _device: 64)
    monkeypatch.setattr(tlp, "DLOGITS_SLAB_BYTES", 130 * 256 * 4)
    assert tlp._num_splits(2, 1000, 64) == 4
    inputs = make_inputs(130, 100, 1000, dtype, device, ref_dtype=dtype)
    check_against_naive(inputs, 1.3)


FORWARD_VARIANTS = {
    "flat": {"FLAT_LOOP": True, "USE_TMA": False, "WARP_SPECIALIZE": False},
    "flat_tma": {"FLAT_LOOP": True, "USE_TMA": True, "WARP_SPECIALIZE": False},
    # the interpreter runs a warp-specialized config's code as one program: its nested TMA loop
    "nested_tma_ws": {"FLAT_LOOP": False, "USE_TMA": True, "WARP_SPECIALIZE": True},
    # the target logits from one dot product per row instead of a select in every tile
    "nested_gather": {"FLAT_LOOP": False, "USE_TMA": False, "WARP_SPECIALIZE": False, "GATHER_TARGET": True},
    "flat_tma_gather": {"FLAT_LOOP": True, "USE_TMA": True, "WARP_SPECIALIZE": False, "GATHER_TARGET": True},
    "nested_tma_ws_gather": {"FLAT_LOOP": False, "USE_TMA": True, "WARP_SPECIALIZE": True, "GATHER_TARGET": True},
}


@pytest.mark.parametrize("variant", list(FORWARD_VARIANTS))
@pytest.mark.parametrize(
    "n,h,v,dtype,ref_dtype,no_bias",
    [
        (130, 100, 1000, torch.float32, None, None),  # H not a multiple of BLOCK_K, several tiles per split
        (130, 96, 1000, torch.bfloat16, None, None),  # TMA: the K tile (128) runs past H, rows past N
        (7, 304, 1000, torch.float16, None, None),  # several K steps per tile
        (1, 16, 1, torch.bfloat16, None, None),
        (130, 96, 1000, torch.float16, torch.float32, None),  # dual, mixed dtypes: pointer loads
        (7, 304, 1000, torch.bfloat16, torch.bfloat16, None),  # dual, TMA for both models
        (130, 96, 1000, torch.bfloat16, torch.bfloat16, "ref_bias"),  # dual, a bias on the policy only
        (130, 96, 1000, torch.float16, torch.float16, "bias"),  # dual, a bias on the reference only
    ],
    ids=str,
)
def test_forward_variants(device, monkeypatch, variant, n, h, v, dtype, ref_dtype, no_bias):
    """The flat (tile, K step) loop with pointer or TMA loads, and the nested loop with TMA loads, give what the
    nested loop with pointer loads gives, single and dual; so do the target logits gathered by a dot product per
    row (the same products summed in another order: to fp32 rounding)."""
    if device.type == "cuda":
        pytest.skip("on GPU every autotuner config is checked in test_gpu_every_forward_config")
    inputs = make_inputs(n, h, v, dtype, device, ref_dtype=ref_dtype)
    if no_bias:
        inputs[no_bias] = None
    ref = {k: inputs.get("ref_" + k) for k in ("hidden", "weight", "bias")}
    expect_tma = "_tma" in variant and dtype != torch.float32 and ref_dtype in (None, dtype)
    made = []
    monkeypatch.setattr(tlp.tma, "descriptor", lambda *a, real=tlp.tma.descriptor: made.append(a) or real(*a))

    def forward():
        return tlp.forward(
            inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"], temperature=0.7,
            ignore_index=IGNORE, with_entropy=True, ref_hidden=ref["hidden"], ref_weight=ref["weight"],
            ref_bias=ref["bias"],
        )  # fmt: skip

    nested = forward()
    monkeypatch.setattr(tlp, "INTERPRETER_FORWARD", FORWARD_VARIANTS[variant])
    outputs = forward()
    assert len(made) == 4 * expect_tma, "TMA descriptors made (or not) as expected"
    tol = 2e-5 if variant.endswith("gather") else 1e-6
    for want, got in zip(nested, outputs):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if ref_dtype is None:
        check_against_naive(inputs, 0.7)  # this variant against the float64 truth, gradients included


BACKWARD_VARIANTS = {
    "persistent": {"PERSISTENT": True, "USE_TMA": False, "PROGRAMS_PER_SM": 1, "WARP_SPECIALIZE": False},
    "persistent_tma": {"PERSISTENT": True, "USE_TMA": True, "PROGRAMS_PER_SM": 1, "WARP_SPECIALIZE": False},
    # a warp-specialized config's code as one program: a loop over tiles with a TMA K-loop inside
    "persistent_tma_ws": {"PERSISTENT": True, "USE_TMA": True, "PROGRAMS_PER_SM": 1, "WARP_SPECIALIZE": True},
}


@pytest.mark.parametrize("variant", list(BACKWARD_VARIANTS))
@pytest.mark.parametrize(
    "n,h,v,dtype,grad_entropy",
    [
        (130, 100, 1000, torch.float32, True),  # pointer loads only (fp32), K tail
        (130, 96, 1000, torch.bfloat16, True),  # TMA: K tile (128) past H, rows past N, several chunks
        (7, 304, 1000, torch.float16, False),  # several K steps per tile
    ],
    ids=str,
)
def test_backward_variants(device, monkeypatch, variant, n, h, v, dtype, grad_entropy):
    """Persistent dlogits programs (several tiles each; flat loop with pointer or TMA loads, or the
    warp-specialized tile loop) give the per-tile gradients."""
    if device.type == "cuda":
        pytest.skip("on GPU every autotuner config is checked in test_gpu_every_dlogits_config")
    monkeypatch.setattr(tlp, "_num_programs_per_wave", lambda _device: 2)  # 2 persistent programs, many tiles
    monkeypatch.setattr(tlp, "DLOGITS_SLAB_BYTES", 130 * 512 * 4)  # chunks of 512 columns: col_begin > 0
    inputs = make_inputs(n, h, v, dtype, device)
    made = []
    monkeypatch.setattr(tlp.tma, "descriptor", lambda *a, real=tlp.tma.descriptor: made.append(a) or real(*a))
    torch.manual_seed(1)  # the same output gradients in both runs
    per_tile = check_against_naive(inputs, 0.7, grad_entropy=grad_entropy)
    monkeypatch.setattr(tlp, "INTERPRETER_BACKWARD", BACKWARD_VARIANTS[variant])
    torch.manual_seed(1)
    variant_out = check_against_naive(inputs, 0.7, grad_entropy=grad_entropy)
    expect_tma = variant.startswith("persistent_tma") and dtype != torch.float32
    assert len(made) == 2 * expect_tma, "TMA descriptors made (or not) as expected"
    for name, want, got in zip(("grad_hidden", "grad_weight", "grad_bias"), per_tile[3:], variant_out[3:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)  # same products, same order


def test_triton_fp32_accumulating_matmul(device, monkeypatch):
    """The Triton C (+)= A @ B used when cuBLAS cannot write fp32 from 16-bit inputs, for row-major and transposed
    operands (the fused GRPO head passes dlogits.T, the cuBLAS forward weight[cols].T)."""
    monkeypatch.setattr(fp32_gemm, "cublas_writes_fp32", lambda _device, _dtype: False)
    for m, k, n, dtype, transposed in [
        (130, 300, 100, torch.float16, ""),
        (1, 256, 16, torch.bfloat16, "a"),
        (7, 5, 3, torch.float16, "b"),
        (130, 100, 300, torch.bfloat16, "ab"),
    ]:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        if "a" in transposed:
            a = a.T.contiguous().T
        if "b" in transposed:
            b = b.T.contiguous().T
        acc = torch.randn(m, n, device=device)
        want = acc.double() + a.double() @ b.double()
        fp32_gemm.addmm_fp32_(acc, a, b, accumulate=True)
        torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-4)
        acc.fill_(float("nan"))
        fp32_gemm.addmm_fp32_(acc, a, b, accumulate=False)
        torch.testing.assert_close(acc.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-4)


def test_ignore_index_inside_vocabulary_and_all_ignored(device):
    inputs = make_inputs(7, 16, 5, torch.float32, device, ignored=0.0)
    targets = inputs["targets"]
    targets[:3] = 2
    lp, ent, lse, _ = tlp.forward(
        inputs["hidden"], inputs["weight"], None, targets, temperature=1.0, ignore_index=2, with_entropy=True
    )
    assert torch.all(lp[:3] == 0) and torch.all(ent[:3] == 0) and torch.all(lp[3:][targets[3:] != 2] < 0)
    targets.fill_(IGNORE)
    lp, ent, lse, _ = tlp.forward(
        inputs["hidden"],
        inputs["weight"],
        None,
        targets,
        temperature=1.0,
        ignore_index=IGNORE,
        with_entropy=True,
    )
    g = torch.randn(7, device=device)
    hidden, weight = inputs["hidden"], inputs["weight"]
    gh, gw, gb = tlp.backward(
        g, g, hidden, weight, None, targets, lse, ent, temperature=1.0, ignore_index=IGNORE
    )
    assert torch.all(lp == 0) and torch.all(ent == 0) and gb is None
    assert torch.all(gh == 0) and torch.all(gw == 0)


def test_peaked_distribution_keeps_logprob_nonpositive_and_entropy_nonnegative(device):
    """Near one-hot rows (logits of std 60), scored at their argmax: logprob <= 0 and entropy >= 0 exactly."""
    inputs = make_inputs(130, 100, 1000, torch.float32, device, ignored=0.0, logit_scale=60.0)
    hidden, weight = inputs["hidden"], inputs["weight"]
    targets = (hidden @ weight.T).argmax(dim=-1)
    lp, ent, _, _ = tlp.forward(
        hidden, weight, None, targets, temperature=1.0, ignore_index=IGNORE, with_entropy=True
    )
    assert torch.all(lp <= 0) and torch.all(ent >= 0)
    truth_lp, truth_ent = naive_linear_logprobs(hidden, weight, targets, compute_dtype=torch.float64)
    torch.testing.assert_close(lp.double(), truth_lp, rtol=0, atol=1e-4)
    torch.testing.assert_close(ent.double(), truth_ent, rtol=0, atol=1e-4)


def test_empty_batch(device):
    hidden = torch.empty(0, 16, device=device)
    weight = torch.randn(5, 16, device=device)
    targets = torch.empty(0, dtype=torch.long, device=device)
    lp, ent, lse, ref = tlp.forward(hidden, weight, None, targets, temperature=1.0, ignore_index=IGNORE,
                                    with_entropy=True, ref_hidden=hidden, ref_weight=weight)  # fmt: skip
    assert lp.shape == ent.shape == lse.shape == ref.shape == (0,)
    gh, gw, gb = tlp.backward(
        lp, ent, hidden, weight, None, targets, lse, ent, temperature=1.0, ignore_index=IGNORE
    )
    assert gh.shape == (0, 16) and torch.all(gw == 0) and gb is None


def test_split_heuristic_covers_the_vocabulary():
    for row_blocks, vocab, wave in [(1, 1, 132), (1, 152064, 132), (128, 152064, 132), (547, 151936, 132),
                                    (3, 1000, 4), (1, 5, 4)]:  # fmt: skip
        splits = tlp._num_splits(row_blocks, vocab, wave)
        units = -(-vocab // 256)
        assert 1 <= splits <= units
        per_split = -(-units // splits)
        assert -(-units // per_split) == splits  # every split owns at least one column
    # small batches spread the vocabulary over the whole GPU, big ones still give each SM whole tiles
    assert tlp._num_splits(1, 152064, 132) >= 100
    assert tlp._num_splits(128, 152064, 132) >= 132 // 8


# ------------------------------------------------------------------------------------------------------------
# Real sizes on a GPU. The references run chunk by chunk over rows so that [N, V] never has to fit at once.


def chunked_naive(inputs, temperature, g_lp, g_ent, compute_dtype, rows_per_chunk):
    """naive_outputs over row chunks; weight/bias grads summed over chunks in float64."""
    hidden, weight, bias, targets = (inputs[k] for k in ("hidden", "weight", "bias", "targets"))
    pieces, grad_w, grad_b = [], None, None
    for start in range(0, hidden.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        gent = g_ent[rows] if g_ent is not None else None
        out = naive_outputs(
            hidden[rows], weight, bias, targets[rows], temperature, g_lp[rows], gent, compute_dtype
        )
        pieces.append(out[:4])
        grad_w = out[4].double() if grad_w is None else grad_w + out[4].double()
        if out[5] is not None:
            grad_b = out[5].double() if grad_b is None else grad_b + out[5].double()
        del out
    cat = [torch.cat([p[i] for p in pieces]) for i in range(4)]
    return (*cat, grad_w, grad_b)


def check_real_size(inputs, temperature, *, dual=False):
    hidden, weight, bias, targets = (inputs[k] for k in ("hidden", "weight", "bias", "targets"))
    n, vocab = hidden.shape[0], weight.shape[0]
    g_lp, g_ent = torch.randn(n, device=hidden.device), torch.randn(n, device=hidden.device)
    ref_kwargs = {k: inputs[k] for k in ("ref_hidden", "ref_weight", "ref_bias")} if dual else {}
    lp, ent, lse, ref_lp = tlp.forward(
        hidden,
        weight,
        bias,
        targets,
        temperature=temperature,
        ignore_index=IGNORE,
        with_entropy=True,
        **ref_kwargs,
    )
    grads = tlp.backward(g_lp, g_ent, hidden, weight, bias, targets, lse, ent, temperature=temperature,
                         ignore_index=IGNORE)  # fmt: skip
    ours = (lp, ent, lse, *grads)
    torch.cuda.synchronize()

    valid = targets != IGNORE
    assert torch.all(lp <= 0), "a log-probability above 0"
    assert torch.all(ent >= 0) and torch.all(ent <= math.log(vocab) + 1e-4), "entropy outside [0, log V]"
    assert torch.all(lp[~valid] == 0) and torch.all(ent[~valid] == 0)

    names = ("logprobs", "entropy", "lse", "grad_hidden", "grad_weight", "grad_bias")
    truth = chunked_naive(inputs, temperature, g_lp, g_ent, torch.float64, 1024)
    base = chunked_naive(inputs, temperature, g_lp, g_ent, hidden.dtype, 4096)
    for name, got, want, baseline in zip(names, ours, truth, base):
        if want is None:
            assert got is None
            continue
        assert_error_within(got, want, baseline, name=name)
    del truth, base
    if dual:
        ref_inputs = dict(hidden=inputs["ref_hidden"], weight=inputs["ref_weight"], bias=inputs["ref_bias"])
        ref_inputs["targets"] = targets
        zeros = torch.zeros_like(g_lp)
        want = chunked_naive(ref_inputs, temperature, zeros, None, torch.float64, 1024)[0]
        baseline = chunked_naive(ref_inputs, temperature, zeros, None, ref_inputs["hidden"].dtype, 4096)[0]
        assert torch.all(ref_lp <= 0)
        assert_error_within(ref_lp, want, baseline, name="ref_logprobs")


GPU_CASES = [
    # n, h, v, dtype, temperature, bias
    (1, 3584, 152064, torch.bfloat16, 1.0, False),
    (1000, 896, 151936, torch.bfloat16, 0.7, True),
    (4096, 3584, 152064, torch.bfloat16, 1.0, False),
    (70000, 896, 151936, torch.bfloat16, 1.0, False),  # > 65535 rows
    (70000, 3584, 152064, torch.bfloat16, 1.3, False),
    (1, 896, 151936, torch.float32, 1.0, True),
    (1000, 3584, 152064, torch.float32, 0.7, False),
    (4096, 896, 151936, torch.float32, 1.0, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "n,h,v,dtype,temperature,bias", GPU_CASES, ids=lambda p: str(p).replace("torch.", "")
)
def test_gpu_real_sizes(monkeypatch, n, h, v, dtype, temperature, bias):
    """The fused kernels (auto would run whichever strategy is faster here; test_triton_logits_gemm checks cuBLAS)."""
    monkeypatch.setenv(logits_gemm.ENV, "fused")
    check_real_size(make_inputs(n, h, v, dtype, torch.device("cuda"), bias=bias), temperature)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "n,h,v,dtype,ref_dtype",
    [
        (4096, 3584, 152064, torch.bfloat16, torch.bfloat16),
        (1000, 896, 151936, torch.bfloat16, torch.float32),
    ],
    ids=lambda p: str(p).replace("torch.", ""),
)
def test_gpu_dual_real_sizes(monkeypatch, n, h, v, dtype, ref_dtype):
    monkeypatch.setenv(logits_gemm.ENV, "fused")
    inputs = make_inputs(n, h, v, dtype, torch.device("cuda"), bias=False, ref_dtype=ref_dtype)
    check_real_size(inputs, 1.0, dual=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dual", [False, True], ids=["single", "dual"])
@pytest.mark.parametrize(
    "n,h,v,bias",
    [
        (2304, 3584, 152064, False),  # Qwen2.5-VL-7B's head, whole tiles
        (2300, 1000, 151937, True),  # rows past N, a K tail (1000 = 15 x 64 + 40), columns past V, a bias
        (2300, 1000, 151937, "policy"),  # the same, a bias on the policy only (dual: a run-time flag in ws)
    ],
)
def test_gpu_every_forward_config(monkeypatch, dual, n, h, v, bias):
    """Each config the autotuner may pick (tiles, loop shapes, TMA, warp specialization) gives the same bf16
    forward.

    The autotuner runs one of them per shape: a config that is wrong only in its own compile would otherwise
    pass every other test on the GPU where it happens to lose.
    """
    if bias == "policy" and not dual:
        pytest.skip("the same as bias=True for a single model")
    monkeypatch.setenv("CARE_KERNELS_TRITON_CONFIGS", "all")  # verified or not: every config
    inputs = make_inputs(n, h, v, torch.bfloat16, torch.device("cuda"), bias=bool(bias),
                         ref_dtype=torch.bfloat16 if dual else None)  # fmt: skip
    if bias == "policy":
        inputs["ref_bias"] = None
    ref = {k: inputs.get("ref_" + k) for k in ("hidden", "weight", "bias")}
    assert tlp.tma.usable(inputs["hidden"], inputs["weight"], interpret=False), "TMA configs would not run"
    monkeypatch.setattr(tlp, "_TUNE_FROM_N_CLASS", 99)  # launch the list's first config, untuned
    # every 16-bit config (pointer and TMA loads) the autotuner may try for this launch
    flags = dict(DUAL=dual, HAS_BIAS=inputs["bias"] is not None, REF_HAS_BIAS=ref["bias"] is not None)
    configs = tlp._prune_configs(tlp._FWD_CONFIGS_16_TMA, {"h_ptr": inputs["hidden"], "ref_h_ptr": ref["hidden"]},
                                 **flags)  # fmt: skip
    tensors = (inputs["hidden"], inputs["weight"], ref["hidden"], ref["weight"])
    results = []
    monkeypatch.setenv(logits_gemm.ENV, "fused")
    for config in configs:
        monkeypatch.setitem(tlp._FWD_LISTS, "16-bit TMA", (tlp._fwd_tuned_16_tma, [config]))
        plan = tlp._plan_launch(tlp.linear_logprob_stats_kernel, tlp._FWD_LISTS, {}, 2, *tensors)
        assert plan[2] is config and plan[0] is tlp.linear_logprob_stats_kernel, "the config is launched as is"
        results.append(tlp.forward(
            inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"], temperature=1.0, ignore_index=IGNORE,
            with_entropy=True, ref_hidden=ref["hidden"], ref_weight=ref["weight"], ref_bias=ref["bias"],
        ))  # fmt: skip
    truth = chunked_naive(inputs, 1.0, torch.zeros(n, device="cuda"), None, torch.float64, 512)
    for config, outputs in zip(configs, results):
        # Every config sums the same fp32 products in its own order: ~1e-6 relative apart.
        for got, want in zip(outputs, results[0]):
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, c=config: f"{c}: {m}")
        torch.testing.assert_close(outputs[0].double(), truth[0], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_every_dlogits_config(monkeypatch):
    """Each backward config the autotuner may pick (tiles, persistent, TMA, warp specialization) gives gradients
    within 2x of the bf16 torch error, on a shape with tails (rows past N, a K tail, columns past V, several
    column chunks)."""
    inputs = make_inputs(2300, 1000, 151937, torch.bfloat16, torch.device("cuda"), bias=True)
    assert tlp.tma.usable(inputs["hidden"], inputs["weight"], interpret=False), "TMA configs would not run"
    monkeypatch.setattr(tlp, "_TUNE_FROM_N_CLASS", 99)  # launch the list's first config, untuned
    monkeypatch.setenv(logits_gemm.ENV, "fused")
    monkeypatch.setenv("CARE_KERNELS_TRITON_CONFIGS", "all")  # verified or not: every config
    # every 16-bit config (pointer and TMA loads) the autotuner may try here
    for config in tlp._prune_configs(tlp._BWD_CONFIGS_16_TMA, {"h_ptr": inputs["hidden"]}, HAS_BIAS=True):
        monkeypatch.setitem(tlp._BWD_LISTS, "16-bit TMA", (tlp._bwd_tuned_16_tma, [config]))
        plan = tlp._plan_launch(tlp.dlogits_kernel, tlp._BWD_LISTS, {}, 2, inputs["hidden"], inputs["weight"])
        assert plan[2] is config and plan[0] is tlp.dlogits_kernel, "the config is launched as is"
        torch.manual_seed(0)
        try:
            check_real_size(inputs, 0.7)
        except AssertionError as error:
            raise AssertionError(f"{tlp.config_label(config)}: {error}") from error


@pytest.mark.gpu
def test_gpu_cublas_fp32_accumulation_probe():
    """Reports whether cuBLAS accumulates bf16 GEMMs into fp32 on this stack (both dH paths are tested)."""
    works = fp32_gemm.cublas_writes_fp32(torch.device("cuda"), torch.bfloat16)
    print(f"cuBLAS fp32-output bf16 addmm usable: {works}")


@pytest.mark.gpu
def test_gpu_triton_dh_accumulation(monkeypatch):
    """The Triton fp32 dH accumulation (used when cuBLAS cannot write fp32 from bf16), over many chunks."""
    monkeypatch.setattr(tlp, "DLOGITS_SLAB_BYTES", 256 << 20)
    monkeypatch.setattr(fp32_gemm, "cublas_writes_fp32", lambda _device, _dtype: False)
    check_real_size(make_inputs(4096, 896, 151936, torch.bfloat16, torch.device("cuda")), 1.0)


def test_autotuned_configs_lists_the_autotuner_picks(monkeypatch):
    """What benchmarks record: per kernel and key (dual / entropy included), the pick and every config's time."""
    pick = next(c for c in tlp._FWD_CONFIGS_16 if c.maxnreg)
    key = (3584, 152064, 2, True, False, "torch.bfloat16", "torch.bfloat16")
    tuner = tlp._fwd_tuned_16
    for other in tlp._tuners().values():
        monkeypatch.setattr(other, "cache", {}, raising=False)
    monkeypatch.setattr(tlp, "_TUNING_MS", {})
    # as Triton leaves a tuner after tuning a key: the pick cached, the timings of that tuning alone
    monkeypatch.setattr(tuner, "cache", {key: pick})
    monkeypatch.setattr(tuner, "configs_timings", {c: [1.0 + i, 0.9, 1.1] for i, c in enumerate(tlp._FWD_CONFIGS_16)},
                        raising=False)  # fmt: skip
    tlp._note_tuning(tuner)
    monkeypatch.setattr(tuner, "configs_timings", {}, raising=False)  # a later key's tuning does not erase it
    tlp._note_tuning(tuner)
    [entry] = tlp.autotuned_configs()
    assert entry["kernel"] == "forward 16-bit"
    assert dict(zip(entry["key_args"], entry["key"]))["DUAL"] == "True"
    assert entry["config"] == {**pick.kwargs, "num_warps": 8, "num_stages": 3, "maxnreg": 128}
    assert entry["label"] == "128x128x64 w8 s3 flat r128"
    assert entry["timings_ms"] == {tlp.config_label(c): 1.0 + i for i, c in enumerate(tlp._FWD_CONFIGS_16)}


def test_autotuner_prunes_what_cannot_run_here_or_spills(monkeypatch):
    """The autotuner tries warp-specialized configs on sm_90 only (checked by sm90_report), and for a dual launch
    only when both models share a dtype (one loop nest, one element type, serves both); with a bias, none of the
    configs that spill with one. (Every config counts as verified here: test_triton_tuning checks that gate.)"""
    monkeypatch.setenv("CARE_KERNELS_TRITON_CONFIGS", "all")
    configs = tlp._FWD_CONFIGS_16_TMA
    specialized = [c for c in configs if tlp.warp_specialized(c)]
    assert specialized and all(c.kwargs["USE_TMA"] and not c.kwargs["FLAT_LOOP"] for c in specialized)

    def tensor(dtype, kind="cuda"):  # what the prune reads of a tensor argument
        return types.SimpleNamespace(device=torch.device(kind, 0) if kind == "cuda" else torch.device(kind),
                                     dtype=dtype)  # fmt: skip

    bf16, fp16 = torch.bfloat16, torch.float16
    for major, want in [(9, configs), (8, None), (10, None)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device, major=major: (major, 0))
        kept = tlp._prune_configs(configs, {"h_ptr": tensor(bf16), "ref_h_ptr": tensor(bf16)}, DUAL=False)
        assert kept == (want or [c for c in configs if not tlp.warp_specialized(c)]), major
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device: (9, 0))
    same = tlp._prune_configs(configs, {"h_ptr": tensor(bf16), "ref_h_ptr": tensor(bf16)}, DUAL=True)
    mixed = tlp._prune_configs(configs, {"h_ptr": tensor(bf16), "ref_h_ptr": tensor(fp16)}, DUAL=True)
    on_cpu = tlp._prune_configs(configs, {"h_ptr": tensor(bf16, "cpu")}, DUAL=False)
    assert same == configs
    assert mixed == on_cpu == [c for c in configs if not tlp.warp_specialized(c)]
    monkeypatch.setenv("CARE_KERNELS_WARP_SPECIALIZE", "0")
    assert tlp._prune_configs(configs, {"h_ptr": tensor(bf16)}, DUAL=False) == mixed
    monkeypatch.delenv("CARE_KERNELS_WARP_SPECIALIZE")
    # a bias on either model: the configs that spill with one go (the register caps, the ws 128x256 tile)
    for flags in [dict(HAS_BIAS=True, DUAL=False), dict(REF_HAS_BIAS=True, DUAL=True)]:
        kept = tlp._prune_configs(configs, {"h_ptr": tensor(bf16), "ref_h_ptr": tensor(bf16)}, **flags)
        assert kept == [c for c in configs if not tlp.spills_with_bias(c)], flags
        assert not any(c.maxnreg for c in kept) and any(tlp.warp_specialized(c) for c in kept)
    # keyword or positional, the flags count the same (Triton hands keyword arguments apart)
    assert tlp._prune_configs(configs, {"h_ptr": tensor(bf16), "HAS_BIAS": True, "DUAL": False}) == kept
    dlogits = tlp._BWD_CONFIGS_16_TMA  # the backward's prune: no DUAL, no reference
    assert any(tlp.warp_specialized(c) for c in dlogits)
    assert tlp._prune_configs(dlogits, {"h_ptr": tensor(bf16)}) == dlogits
    assert tlp._prune_configs(dlogits, {"h_ptr": tensor(bf16)}, HAS_BIAS=True) == dlogits  # no dlogits config spills
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device: (8, 0))
    assert tlp._prune_configs(dlogits, {"h_ptr": tensor(bf16)}) == [
        c for c in dlogits if not tlp.warp_specialized(c)
    ]


def test_scratch_allocator_is_set_once_and_never_replaces_the_users():
    """Warp-specialized configs build descriptors in the kernel, which takes Triton's global-scratch allocator."""
    from triton.runtime import _allocation

    def run_in_fresh_context(fn):
        return contextvars.Context().run(fn)  # no allocator set, as in a new process or thread

    def ours_after_ensure():
        tlp.tma.ensure_scratch_allocator()
        return _allocation._allocator.get()

    assert run_in_fresh_context(ours_after_ensure) is tlp.tma._torch_scratch

    def users_after_ensure():
        mine = lambda size, alignment, stream: None  # noqa: E731
        triton.set_allocator(mine)
        tlp.tma.ensure_scratch_allocator()
        return _allocation._allocator.get() is mine

    assert run_in_fresh_context(users_after_ensure)


def test_tma_descriptors_take_each_configs_tile(device):
    """The autotuners' pre_hook gives hidden descriptors [BLOCK_M, BLOCK_K] blocks, weight ones [BLOCK_N, BLOCK_K];
    only configs that read the host's descriptors have one (warp-specialized ones build theirs in the kernel)."""
    hidden, weight = torch.zeros(300, 64, dtype=torch.bfloat16), torch.zeros(1000, 64, dtype=torch.bfloat16)
    assert tlp.tma.usable(hidden, weight, interpret=True)
    assert not tlp.tma.usable(hidden[:, :60].contiguous(), interpret=True)  # rows of 120 bytes
    assert not tlp.tma.usable(hidden.float(), interpret=True)
    tensors = {"h_desc": hidden, "w_desc": weight, "ref_h_desc": hidden, "ref_w_desc": weight}
    descriptors = {name: tlp.tma.descriptor(t, 16, 16) for name, t in tensors.items()}
    lists = [(tlp._FWD_CONFIGS_16_TMA, list(descriptors)), (tlp._BWD_CONFIGS_16_TMA, ["h_desc", "w_desc"])]
    for configs, names in lists:
        assert any(c.pre_hook for c in configs)
        for config in configs:
            if not (config.kwargs["USE_TMA"] and not config.kwargs["WARP_SPECIALIZE"]):
                assert config.pre_hook is None, tlp.config_label(config)
                continue
            config.pre_hook({**{n: descriptors[n] for n in names}, **config.kwargs})
            tiles = config.kwargs
            for name in names:
                rows = tiles["BLOCK_N"] if name.endswith("w_desc") else tiles["BLOCK_M"]
                assert descriptors[name].block_shape == [rows, tiles["BLOCK_K"]], (name, tlp.config_label(config))
