"""The cuBLAS strategy for the logits GEMM (cuBLAS into an fp32 slab, read back by a Triton pass: the forward's
statistics, the backward's dlogits) and the choice between it and the fused kernels (logits_gemm): the same
results, within 2x the same-dtype torch error, and a choice that follows timing, the environment and `use`.

Without CUDA the strategy runs under the Triton interpreter (its GEMM in Triton: no cuBLAS here).
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from test_triton_logprobs import IGNORE, check_against_naive, check_real_size, make_inputs

import care_kernels as ck
from care_kernels.triton import cublas_logits, fp32_gemm, logits_gemm, verified
from care_kernels.triton import linear_logprobs as tlp


@pytest.fixture(autouse=True)
def _fresh_picks(monkeypatch):
    monkeypatch.delenv(logits_gemm.ENV, raising=False)
    monkeypatch.delenv(verified.MODE_ENV, raising=False)
    monkeypatch.delenv(verified.EXTRA_ENV, raising=False)
    logits_gemm.reset()
    yield
    logits_gemm.reset()


@pytest.fixture
def every_strategy_offered(monkeypatch):
    """`auto` may choose every strategy, as where a record verified them (the choice's logic is under test here;
    the gate itself: tests/test_triton_tuning.py)."""
    monkeypatch.setenv(verified.MODE_ENV, "all")


def _spy_cublas(monkeypatch, name="partial_stats") -> list:
    """Records the calls of cublas_logits.`name` (partial_stats: the forward, per model; dlogits_: the backward,
    per chunk)."""
    calls = []
    real = getattr(cublas_logits, name)
    monkeypatch.setattr(cublas_logits, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def _forward(inputs, temperature=0.7, with_entropy=True, dual=False):
    ref = {k: inputs.get("ref_" + k) for k in ("hidden", "weight", "bias")} if dual else {}
    return tlp.forward(
        inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"], temperature=temperature,
        ignore_index=IGNORE, with_entropy=with_entropy, ref_hidden=ref.get("hidden"), ref_weight=ref.get("weight"),
        ref_bias=ref.get("bias"),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "n,h,v,temperature,bias,chunk_bytes,backward_chunks",
    [
        (130, 100, 1000, 0.7, True, None, 1),  # one chunk each
        (130, 100, 1000, 1.3, True, 130 * 256 * 4, 4),  # 4 chunks of 256 columns, the last short (232)
        (7, 16, 5, 1.0, False, None, 1),
        (1, 100, 1000, 1.0, True, 300 * 4, 4),  # one row, 4 chunks each
        (7, 300, 1000, 0.7, False, 7 * 512 * 4, 2),  # several K tiles in the GEMM, 2 chunks each
    ],
)
def test_cublas_strategy_matches_truth_and_the_fused_kernels(device, monkeypatch, dtype, n, h, v, temperature, bias,
                                                               chunk_bytes, backward_chunks):  # fmt: skip
    """Log-probs, entropy, lse and the gradients within 2x the same-dtype torch error of the float64 truth, and
    within fp32 rounding (gradients: one rounding of dlogits to the input dtype) of the fused kernels'."""
    if chunk_bytes:
        monkeypatch.setattr(cublas_logits, "SLAB_BYTES", chunk_bytes)
        # the backward's two slabs (fp32 logits + dlogits: 4 + 4 bytes per element under the interpreter)
        monkeypatch.setattr(tlp, "DLOGITS_SLAB_BYTES", 2 * chunk_bytes)
    inputs = make_inputs(n, h, v, dtype, device, bias=bias)
    torch.manual_seed(1)  # the same output gradients in both runs
    with logits_gemm.use("fused"):
        fused = check_against_naive(inputs, temperature)
    calls, backward_calls = _spy_cublas(monkeypatch), _spy_cublas(monkeypatch, "dlogits_")
    torch.manual_seed(1)
    with logits_gemm.use("cublas"):
        ours = check_against_naive(inputs, temperature)
        assert len(calls) == 1 and len(backward_calls) == backward_chunks, "the cuBLAS strategy ran"
        without_entropy = _forward(inputs, temperature, with_entropy=False)
    for got, want in zip(ours[:3], fused[:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(ours[3:], fused[3:]):
        if want is not None:  # dlogits of both round to the input dtype: at most one ulp apart
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(without_entropy[0], ours[0], rtol=0, atol=0)
    assert torch.equal(without_entropy[1], torch.zeros_like(without_entropy[1]))


@pytest.mark.parametrize("grad_entropy", [True, False])
def test_cublas_backward_without_entropy_gradient_and_ignored_rows(device, monkeypatch, grad_entropy):
    """The backward's pass over the slab: no entropy term when grad_entropy is None; ignored rows give nothing."""
    inputs = make_inputs(130, 96, 1000, torch.bfloat16, device, ignored=0.5)
    calls = _spy_cublas(monkeypatch, "dlogits_")
    with logits_gemm.use("cublas"):
        check_against_naive(inputs, 0.7, grad_entropy=grad_entropy)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "dtype,ref_dtype,no_bias,runs_cublas",
    [
        (torch.bfloat16, torch.bfloat16, None, True),
        (torch.bfloat16, torch.bfloat16, "ref_bias", True),  # a bias on the policy only
        (torch.float16, torch.bfloat16, "bias", True),  # each model its own 16-bit dtype, a bias on the reference
        (torch.bfloat16, torch.float32, None, False),  # an fp32 model: the fused kernel
    ],
    ids=str,
)
def test_cublas_strategy_dual(device, monkeypatch, dtype, ref_dtype, no_bias, runs_cublas):
    """Both models through one slab, in several chunks; the reference's log-probs as the fused dual gives them."""
    monkeypatch.setattr(cublas_logits, "SLAB_BYTES", 130 * 256 * 4)
    inputs = make_inputs(130, 96, 1000, dtype, device, ref_dtype=ref_dtype)
    if no_bias:
        inputs[no_bias] = None
    with logits_gemm.use("fused"):
        fused = _forward(inputs, dual=True)
    calls = _spy_cublas(monkeypatch)
    with logits_gemm.use("cublas"):
        ours = _forward(inputs, dual=True)
    assert len(calls) == (2 if runs_cublas else 0)
    for got, want in zip(ours, fused):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cublas_strategy_ignore_index_inside_the_vocabulary(device, monkeypatch):
    """Targets equal to an in-vocabulary ignore_index score 0; targets in every chunk are found."""
    monkeypatch.setattr(cublas_logits, "SLAB_BYTES", 7 * 256 * 4)
    inputs = make_inputs(7, 16, 1000, torch.bfloat16, device, ignored=0.0)
    inputs["targets"] = torch.tensor([2, 2, 255, 256, 511, 768, 999], device=device)
    with logits_gemm.use("fused"):
        want = tlp.forward(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"], temperature=1.0,
                           ignore_index=2, with_entropy=True)  # fmt: skip
    with logits_gemm.use("cublas"):
        got = tlp.forward(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"], temperature=1.0,
                          ignore_index=2, with_entropy=True)  # fmt: skip
    assert torch.all(got[0][:2] == 0) and torch.all(got[1][:2] == 0) and torch.all(got[0][2:] < 0)
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_chunks_are_equal_bounded_and_aligned():
    for n_rows, vocab in [(1, 1), (1, 152064), (16384, 152064), (16384, 151936), (70000, 152064), (3, 1000)]:
        cols = cublas_logits.chunk_columns(n_rows, vocab)
        assert cols % 256 == 0 or cols == vocab, "chunks start on 256-column boundaries"
        assert n_rows * cols * 4 <= cublas_logits.SLAB_BYTES, "the slab stays bounded"
        most = cublas_logits.SLAB_BYTES // (4 * n_rows) // 256 * 256
        assert -(-vocab // cols) == -(-vocab // most), "no more chunks than the bound needs"
        assert cols < 256 + -(-vocab // -(-vocab // most)), "equal chunks, rounded up to 256 columns"
        assert cublas_logits.slab_elements(n_rows, vocab) == n_rows * cols
    assert cublas_logits.chunk_columns(16384, 152064) == 15360  # 10 chunks of 960 MiB for Qwen2.5-VL-7B's head


@pytest.mark.parametrize("element_bytes", [2, 4, 6])
def test_backward_chunks_are_equal_and_bounded(element_bytes):
    """The backward's chunks (dlogits slab, + the fp32 logits slab for cuBLAS: 6 bytes per element)."""
    for n_rows, vocab in [(1, 5), (16384, 152064), (4096, 151936), (70000, 152064), (300000, 152064)]:
        cols = tlp._slab_columns(n_rows, vocab, element_bytes)
        chunks = -(-vocab // cols)
        if chunks > 1:
            assert cols % 256 == 0 and cols <= tlp.MAX_SLAB_COLUMNS
            assert n_rows * cols * element_bytes <= max(tlp.DLOGITS_SLAB_BYTES, n_rows * 256 * element_bytes)
            assert vocab - (chunks - 1) * cols > cols - 256 * chunks, "equal chunks, rounded up to 256 columns"
        else:
            assert cols == vocab
    assert tlp._slab_columns(16384, 152064, 6) == 10240  # 15 chunks of 960 MiB (both slabs), the last 8704 columns


def test_chunk_loop_multiplies_every_column_once(device, monkeypatch):
    """The GEMMs partial_stats issues cover the vocabulary exactly, in order, each into the slab's start."""
    monkeypatch.setattr(cublas_logits, "SLAB_BYTES", 7 * 256 * 4)
    inputs = make_inputs(7, 16, 1000, torch.bfloat16, device)
    columns, real = [], cublas_logits.fp32_gemm.addmm_fp32_
    slab = torch.empty(cublas_logits.slab_elements(7, 1000), device=device)

    def spy(acc, a, b, *, accumulate):
        assert acc.data_ptr() == slab.data_ptr() and not accumulate and acc.shape == (7, b.shape[1])
        torch.testing.assert_close(b.T, inputs["weight"][sum(columns) : sum(columns) + b.shape[1]], rtol=0, atol=0)
        columns.append(b.shape[1])
        real(acc, a, b, accumulate=accumulate)

    monkeypatch.setattr(cublas_logits.fp32_gemm, "addmm_fp32_", spy)
    part = cublas_logits.partial_stats(inputs["hidden"], inputs["weight"], None, inputs["targets"], scale2=1.0,
                                        planes=3, slab=slab)  # fmt: skip
    assert columns == [256, 256, 256, 232] and part.shape == (3, 4, 7)


def test_usable_only_for_16bit_operands(device, monkeypatch):
    bf16 = torch.zeros(2, 2, device=device, dtype=torch.bfloat16)
    fp16 = bf16.half()
    fp32 = bf16.float()
    expect = device.type == "cpu" or fp32_gemm.cublas_writes_fp32(device, torch.bfloat16)
    assert cublas_logits.usable(bf16, bf16, None, None) == expect
    assert not cublas_logits.usable(bf16, bf16, fp32, bf16)
    assert not cublas_logits.usable(fp32, fp32)
    if device.type == "cuda":  # a torch without the fp32-output GEMM for one dtype: only the fused forward there
        monkeypatch.setattr(fp32_gemm, "cublas_writes_fp32", lambda _device, dtype: dtype == torch.float16)
        assert cublas_logits.usable(fp16, fp16) and not cublas_logits.usable(fp16, bf16)


# ------------------------------------------------------------------------------------------ cublas16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "n,h,v,temperature,bias,chunk_bytes,chunks",
    [
        (130, 100, 1000, 0.7, True, None, 1),  # one chunk each
        (130, 96, 1000, 1.3, True, 130 * 256 * 2, 4),  # 4 chunks of 256 columns each way, the last short (232)
        (7, 300, 1000, 0.7, False, 7 * 512 * 2, 2),  # several K tiles in the GEMM, 2 chunks each
    ],
)
def test_cublas16_strategy_matches_truth_with_16bit_logits(device, monkeypatch, dtype, n, h, v, temperature, bias,
                                                           chunk_bytes, chunks):  # fmt: skip
    """cuBLAS writes 16-bit logits (as `hidden @ W.T` in the input dtype): log-probs, entropy, lse and gradients within
    2x the same-dtype torch error of the float64 truth; the forward's slab is 16-bit, under its own budget, and the
    backward's dlogits overwrite the logits in place (one slab, the dlogits slab's budget)."""
    if chunk_bytes:
        monkeypatch.setattr(cublas_logits, "SLAB16_BYTES", chunk_bytes)
        monkeypatch.setattr(cublas_logits, "SLAB_BYTES", 1)  # the fp32 slab's budget is not the 16-bit one's
        monkeypatch.setattr(tlp, "DLOGITS_SLAB_BYTES", chunk_bytes)
    inputs = make_inputs(n, h, v, dtype, device, bias=bias)
    forward_calls, backward_calls = _spy_cublas(monkeypatch), _spy_cublas(monkeypatch, "dlogits_")
    with logits_gemm.use("cublas16"):
        ours = check_against_naive(inputs, temperature)
    [forward_args] = forward_calls
    assert len(backward_calls) == chunks
    for out, z, *_ in backward_calls:
        assert z.data_ptr() == out.data_ptr() and z.dtype == dtype, "dlogits written over the 16-bit logits"
    with logits_gemm.use("fused"):
        fused = _forward(inputs, temperature)
    for got, want in zip(ours[:3], fused[:3]):  # 16-bit logits against fp32 ones: within their rounding
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert forward_args[0] is inputs["hidden"]


def test_cublas16_forward_slab_is_16bit_and_bounded_on_its_own(device, monkeypatch):
    for n_rows, vocab in [(16384, 152064), (4096, 151936), (1, 5)]:
        cols = cublas_logits.chunk_columns(n_rows, vocab, 2)
        assert n_rows * cols * 2 <= max(cublas_logits.SLAB16_BYTES, n_rows * 256 * 2) or cols == vocab
    assert cublas_logits.chunk_columns(16384, 152064, 2) == 30464  # 5 chunks at Qwen2.5-VL-7B's head, not 10
    seen = []
    real = cublas_logits._logits_gemm_
    monkeypatch.setattr(cublas_logits, "_logits_gemm_", lambda z, h, w: seen.append(z) or real(z, h, w))
    monkeypatch.setattr(cublas_logits, "SLAB16_BYTES", 7 * 256 * 2)
    inputs = make_inputs(7, 16, 1000, torch.bfloat16, device, ref_dtype=torch.bfloat16)
    with logits_gemm.use("cublas16"):
        _forward(inputs, dual=True)
    assert [z.shape[1] for z in seen] == [256, 256, 256, 232] * 2, "4 chunks per model, through one slab"
    assert all(z.dtype == torch.bfloat16 and z.data_ptr() == seen[0].data_ptr() for z in seen)


def test_cublas16_needs_one_16bit_dtype(device):
    bf16 = torch.zeros(2, 2, device=device, dtype=torch.bfloat16)
    assert cublas_logits.usable16(bf16, bf16, None, None) and cublas_logits.usable16(bf16.half(), bf16.half())
    assert not cublas_logits.usable16(bf16, bf16.half())  # one slab, one dtype
    assert not cublas_logits.usable16(bf16.float(), bf16.float()) and not cublas_logits.usable16(None)
    inputs = make_inputs(130, 96, 1000, torch.float16, device, ref_dtype=torch.bfloat16)
    with logits_gemm.use("cublas16"):  # not usable here: the fused kernels, values unchanged
        forced = _forward(inputs, dual=True)
    with logits_gemm.use("fused"):
        fused = _forward(inputs, dual=True)
    for got, want in zip(forced, fused):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ the choice


def _timed(monkeypatch, times: dict[str, float]) -> list[str]:
    """Fake timings: `_median_ms` runs the thunk (a name) and returns that name's time; returns the runs made."""
    ran = []
    monkeypatch.setattr(logits_gemm, "_median_ms", lambda run: times[run()])
    return ran


def _candidates(ran: list[str], names=("fused", "cublas")) -> dict:
    return {name: (lambda name=name: ran.append(name) or name) for name in names}


def test_auto_times_each_candidate_once_per_key_and_keeps_the_fastest(monkeypatch, every_strategy_offered):
    ran = _timed(monkeypatch, {"fused": 3.0, "cublas": 2.0})
    key = ("forward", 3584, None, 152064, 2, 15, False, True, False, False, "torch.bfloat16", "cuda:0")
    assert len(key) == 1 + len(logits_gemm.KEY_ARGS["forward"])
    assert logits_gemm.choose(key, _candidates(ran), tune=True) == "cublas"
    assert ran == ["fused", "cublas"]
    assert logits_gemm.choose(key, _candidates(ran), tune=True) == "cublas"
    assert ran == ["fused", "cublas"], "a tuned key is not timed again"
    other = (*key[:5], 12, *key[6:])
    monkeypatch.setattr(logits_gemm, "_median_ms", lambda run: {"fused": 1.0, "cublas": 2.0}[run()])
    assert logits_gemm.choose(other, _candidates(ran), tune=True) == "fused"
    [first, second] = logits_gemm.picks()
    assert first["label"] == "cublas" and first["timings_ms"] == {"fused": 3.0, "cublas": 2.0}
    assert first["key"][4] == "15" and len(first["key"]) == len(first["key_args"])
    assert second["label"] == "fused"
    assert {e["label"] for e in tlp.autotuned_configs() if e["kernel"] == "forward strategy"} == {"cublas", "fused"}
    backward = ("backward", 3584, 152064, 2, 15, False, True, "torch.bfloat16", "cuda:0")
    assert len(backward) == 1 + len(logits_gemm.KEY_ARGS["backward"])
    logits_gemm.choose(backward, _candidates(ran), tune=True)
    assert logits_gemm.picks()[-1]["kernel"] == "backward strategy" and logits_gemm.picks()[-1]["label"] == "fused"


def test_a_candidate_out_of_gpu_memory_is_never_picked(monkeypatch, every_strategy_offered):
    """The cuBLAS strategy's slab may not fit where the fused kernel's buffers do: timing drops it for the key."""

    def run_cublas():
        raise torch.OutOfMemoryError("CUDA out of memory (the slab)")

    candidates = {"fused": lambda: "fused", "cublas": run_cublas}
    monkeypatch.setattr(torch.cuda, "Event", lambda **_: types.SimpleNamespace(
        record=lambda: None, synchronize=lambda: None, elapsed_time=lambda _end: 1.0))  # fmt: skip
    assert logits_gemm.choose(("forward", "k"), candidates, tune=True) == "fused"
    assert logits_gemm.picks()[0]["timings_ms"] == {"fused": 1.0, "cublas": math.inf}
    with pytest.raises(torch.OutOfMemoryError):  # nothing fits: the caller gets the error, nothing is cached
        logits_gemm.choose(("forward", "k2"), {"cublas": run_cublas, "other": run_cublas}, tune=True)
    assert len(logits_gemm.picks()) == 1


def test_a_backward_reads_the_logits_at_the_precision_its_forward_pinned(monkeypatch, every_strategy_offered):
    """16-bit logits (cublas16) only in a backward whose shape's forward ran on them: never mixed with an fp32 lse."""
    ran = _timed(monkeypatch, {"fused": 3.0, "cublas": 2.5, "cublas16": 1.0})
    names = ("fused", "cublas", "cublas16")
    shape = (3584, 152064, 2, 15, False, "torch.bfloat16", "cuda:0")
    assert len(shape) == len(logits_gemm.PRECISION_KEY_ARGS)
    backward = ("backward", "b")
    # no forward pinned this shape: a backward stays with fp32 logits, however fast cublas16 would be
    assert logits_gemm.choose(backward, _candidates(ran, names), tune=True, precision_key=shape) == "cublas"
    logits_gemm.reset()
    assert logits_gemm.choose(("forward", "f"), _candidates(ran, names), tune=True, precision_key=shape) == "cublas16"
    assert logits_gemm.choose(backward, _candidates(ran, names), tune=True, precision_key=shape) == "cublas16"
    # later forwards of the shape, other keys included, stay at 16 bits; another shape is free
    assert logits_gemm.choose(("forward", "f2"), _candidates(ran, ("fused", "cublas16")), tune=True,
                              precision_key=shape) == "cublas16"  # fmt: skip
    assert logits_gemm.choose(("forward", "f3"), _candidates(ran, ("fused", "cublas")), tune=False,
                              precision_key=(1,)) == "fused"  # fmt: skip
    assert logits_gemm.choose(("backward", "b3"), _candidates(ran, names), tune=True, precision_key=(1,)) == "cublas"
    # a forced forward runs as asked and re-pins; a forced backward runs as asked
    with logits_gemm.use("fused"):
        assert logits_gemm.choose(("forward", "f"), _candidates(ran, names), tune=True, precision_key=shape) == "fused"
    assert logits_gemm.choose(("backward", "b4"), _candidates(ran, names), tune=True, precision_key=shape) == "cublas"
    with logits_gemm.use("cublas16"):
        assert logits_gemm.choose(backward, _candidates(ran, names), tune=True, precision_key=shape) == "cublas16"
    # isolated(): a block's picks and pins do not outlive it
    with logits_gemm.isolated(), logits_gemm.use("cublas16"):
        logits_gemm.choose(("forward", "f"), _candidates(ran, names), tune=True, precision_key=shape)
    assert logits_gemm._pinned[shape] == "fp32"
    # a failing strategy hands the call to one of its own precision first
    assert logits_gemm.fall_back(backward, _candidates(ran, names), ["cublas16"], RuntimeError("x")) == "fused"
    assert logits_gemm.fall_back(backward, _candidates(ran, names), ["fused"], RuntimeError("x")) == "cublas"


def test_a_forward_forced_to_16bit_logits_gets_a_matching_backward(device, monkeypatch):
    """with use("cublas16") around the forward only: the backward, run outside the block under `auto`, reads 16-bit
    logits too (the shape's forward pinned them), so its gradients are within 2x the bf16 torch error."""
    inputs = make_inputs(130, 96, 1000, torch.bfloat16, device)
    hidden = inputs["hidden"].detach().requires_grad_()
    weight = inputs["weight"].detach().requires_grad_()
    calls = _spy_cublas(monkeypatch, "dlogits_")
    with logits_gemm.use("cublas16"):
        lp = ck.linear_logprobs(hidden, weight, inputs["targets"], inputs["bias"], temperature=0.7, impl="triton")
    g = torch.randn(130, device=device)
    (lp * g).sum().backward()
    assert len(calls) == 1 and calls[0][0].dtype == torch.bfloat16, "the backward ran cublas16"
    from test_triton_logprobs import naive_outputs

    truth = naive_outputs(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"], 0.7, g, None,
                          torch.float64)  # fmt: skip
    base = naive_outputs(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"], 0.7, g, None,
                         torch.bfloat16)  # fmt: skip
    from care_kernels.testing import assert_error_within

    assert_error_within(hidden.grad, truth[3], base[3], name="grad_hidden")
    assert_error_within(weight.grad, truth[4], base[4], name="grad_weight")


def test_untuned_calls_take_the_first_candidate_unless_the_key_was_tuned(monkeypatch, every_strategy_offered):
    ran = _timed(monkeypatch, {"fused": 3.0, "cublas": 2.0})
    key = ("forward", "k")
    assert logits_gemm.choose(key, _candidates(ran), tune=False) == "fused"
    assert logits_gemm.choose(key, _candidates(ran, ("fused",)), tune=True) == "fused"
    assert ran == [] and logits_gemm.picks() == []
    logits_gemm.choose(key, _candidates(ran), tune=True)
    assert logits_gemm.choose(key, _candidates(ran), tune=False) == "cublas"


def test_no_timing_while_a_cuda_graph_is_captured(monkeypatch):
    ran = _timed(monkeypatch, {"fused": 3.0, "cublas": 2.0})
    monkeypatch.setattr(logits_gemm, "_capturing", lambda: True)
    assert logits_gemm.choose(("forward", "k"), _candidates(ran), tune=True) == "fused"
    assert ran == [] and logits_gemm.picks() == []


def test_forced_strategy_from_the_environment_or_a_block(monkeypatch):
    ran = _timed(monkeypatch, {"fused": 3.0, "cublas": 2.0})
    monkeypatch.setenv(logits_gemm.ENV, "Fused ")
    assert logits_gemm.choose(("forward", "k"), _candidates(ran), tune=True) == "fused"
    with logits_gemm.use(" CUBLAS"):
        assert logits_gemm.choose(("forward", "k"), _candidates(ran), tune=True) == "cublas"
        # cannot run here (fp32 operands): the fused kernel
        assert logits_gemm.choose(("forward", "k"), _candidates(ran, ("fused",)), tune=True) == "fused"
        with logits_gemm.use("auto"):
            assert logits_gemm.requested() == "auto"
    assert logits_gemm.requested() == "fused"
    assert ran == []


def test_a_bad_strategy_name_is_a_clear_error(monkeypatch, device):
    with pytest.raises(ValueError, match="'auto', 'fused', 'cublas'"):
        with logits_gemm.use("cuBLAS!"):
            pass
    monkeypatch.setenv(logits_gemm.ENV, "fastest")
    inputs = make_inputs(7, 16, 5, torch.bfloat16, device)
    with pytest.raises(ValueError, match=f"{logits_gemm.ENV}='fastest'"):
        ck.linear_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], impl="triton")


def test_the_environment_reaches_the_public_op_with_gradients(monkeypatch, device):
    """ck.linear_logprobs(impl='triton') under CARE_KERNELS_LOGITS_GEMM=cublas: the cuBLAS forward and backward
    run, and the results match the fused kernels'."""
    inputs = make_inputs(130, 100, 1000, torch.bfloat16, device)
    results = {}
    for name in ("fused", "cublas"):
        monkeypatch.setenv(logits_gemm.ENV, name)
        calls, backward_calls = _spy_cublas(monkeypatch), _spy_cublas(monkeypatch, "dlogits_")
        hidden = inputs["hidden"].detach().requires_grad_()
        weight = inputs["weight"].detach().requires_grad_()
        lp, ent = ck.linear_logprobs(hidden, weight, inputs["targets"], inputs["bias"], temperature=0.7,
                                     return_entropy=True, impl="triton")  # fmt: skip
        (lp.sum() + ent.sum()).backward()
        assert len(calls) == len(backward_calls) == (name == "cublas")
        results[name] = (lp, ent, hidden.grad.float(), weight.grad.float())
    for got, want in zip(results["cublas"], results["fused"]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------------------------------------ GPU, real sizes


@pytest.mark.gpu
@pytest.mark.parametrize(
    "n,h,v,bias,dual",
    [
        (4096, 3584, 152064, False, False),  # Qwen2.5-VL-7B's head
        (2300, 1000, 151937, True, False),  # rows past a fold block, a K tail, an odd vocabulary, a bias
        (4096, 3584, 152064, False, True),
        (70000, 896, 151936, False, False),  # > 65535 rows, several backward chunks
    ],
)
def test_gpu_cublas_strategy_real_sizes(monkeypatch, n, h, v, bias, dual):
    """bf16 on the GPU (cuBLAS GEMMs, forward and backward): within 2x the bf16 torch error of the float64 truth,
    gradients included, and the forward within fp32 rounding of the fused kernel's."""
    inputs = make_inputs(n, h, v, torch.bfloat16, torch.device("cuda"), bias=bias,
                         ref_dtype=torch.bfloat16 if dual else None)  # fmt: skip
    if not cublas_logits.usable(inputs["hidden"]):
        pytest.skip("this torch has no fp32-output cuBLAS GEMM for bf16: the strategy never runs here")
    with logits_gemm.use("fused"):
        fused = _forward(inputs, 1.0, dual=dual)
    calls, backward_calls = _spy_cublas(monkeypatch), _spy_cublas(monkeypatch, "dlogits_")
    with logits_gemm.use("cublas"):
        ours = _forward(inputs, 1.0, dual=dual)
        check_real_size(inputs, 1.0, dual=dual)  # forward and backward
    assert len(calls) == 2 * (2 if dual else 1) and len(backward_calls) >= 1
    for got, want in zip(ours, fused):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_auto_times_the_strategies_once_per_pass(monkeypatch):
    """`auto` on a large bf16 call with every strategy offered (as where verified): each strategy timed once per key
    and pass (the backward among those of the precision its forward picked), the fastest kept (printed). Without a
    record: the fused kernels, nothing timed."""
    inputs = make_inputs(4096, 3584, 152064, torch.bfloat16, torch.device("cuda"), bias=False)
    if not cublas_logits.usable(inputs["hidden"]):
        pytest.skip("this torch has no fp32-output cuBLAS GEMM for bf16: only the fused kernels can run")
    with logits_gemm.use("fused"):
        fused = _forward(inputs, 1.0)
    logits_gemm.reset()
    _forward(inputs, 1.0)
    assert logits_gemm.picks() == [], "no record for this GPU: only the fused kernels may run, untimed"
    logits_gemm.reset()
    monkeypatch.setenv(verified.MODE_ENV, "all")
    first = _forward(inputs, 1.0)
    g = torch.randn(4096, device="cuda")
    grads = tlp.backward(g, g, inputs["hidden"], inputs["weight"], None, inputs["targets"], first[2], first[1],
                         temperature=1.0, ignore_index=IGNORE)  # fmt: skip
    picks = logits_gemm.picks()
    forward = picks[0]
    assert forward["kernel"] == "forward strategy" and set(forward["timings_ms"]) == {"fused", "cublas", "cublas16"}
    if forward["label"] == "cublas16":  # the backward's only 16-bit strategy: nothing to time
        assert len(picks) == 1
    else:
        assert picks[1]["kernel"] == "backward strategy" and set(picks[1]["timings_ms"]) == {"fused", "cublas"}
    for pick in picks:
        assert pick["label"] == min(pick["timings_ms"], key=pick["timings_ms"].get)
        print(f"{pick['kernel']} at N=4096, H=3584, V=152064 bf16: {pick['label']} {pick['timings_ms']}")
    again = _forward(inputs, 1.0)
    grads_again = tlp.backward(g, g, inputs["hidden"], inputs["weight"], None, inputs["targets"], again[2],
                               again[1], temperature=1.0, ignore_index=IGNORE)  # fmt: skip
    assert len(logits_gemm.picks()) == len(picks), "each key timed once"
    for got, want in zip((*again, *grads_again), (*first, *grads)):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    if forward["label"] != "cublas16":  # fp32 logits: the fused kernels' results to fp32 rounding
        for got, want in zip(first, fused):
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_every_slab_config(monkeypatch):
    """Each config the autotuner may pick for the two slab passes gives the same statistics and dlogits (rows and
    columns past a tile, a bias): a config wrong only in its own compile would pass wherever it loses."""
    import triton

    inputs = make_inputs(2300, 1000, 151937, torch.bfloat16, torch.device("cuda"), bias=True)
    if not cublas_logits.usable(inputs["hidden"]):
        pytest.skip("this torch has no fp32-output cuBLAS GEMM for bf16: the slab passes never run here")
    monkeypatch.setenv(logits_gemm.ENV, "cublas")
    g = torch.randn(2300, device="cuda")
    forwards, backwards, stats = [], [], None
    for fold, grad in zip(cublas_logits.FOLD_CONFIGS, cublas_logits.GRAD_CONFIGS):
        monkeypatch.setattr(cublas_logits, "_fold_tuned", triton.autotune(
            configs=[fold], key=["HAS_BIAS", "WITH_ENTROPY"])(cublas_logits.logits_slab_stats_kernel))  # fmt: skip
        monkeypatch.setattr(cublas_logits, "_grad_tuned", triton.autotune(
            configs=[grad], key=["HAS_BIAS", "HAS_GRAD_ENTROPY"])(cublas_logits.logits_slab_grad_kernel))  # fmt: skip
        forwards.append(_forward(inputs, 0.7)[:3])
        lse, ent = stats = stats or (forwards[0][2], forwards[0][1])  # one forward's: the backwards compare exactly
        backwards.append(tlp.backward(g, g, inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"],
                                      lse, ent, temperature=0.7, ignore_index=IGNORE))  # fmt: skip
    for config_forward, config_backward in zip(forwards[1:], backwards[1:]):
        for got, want in zip(config_forward, forwards[0]):  # the fold sums each row in its own tile order
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for got, want in zip(config_backward, backwards[0]):  # elementwise: the same arithmetic, the same GEMMs
            torch.testing.assert_close(got, want, rtol=0, atol=0)
