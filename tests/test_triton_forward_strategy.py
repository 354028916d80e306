"""The forward's cuBLAS strategy (cuBLAS GEMMs into an fp32 slab, folded by Triton) and the choice between it and
the fused kernel (forward_strategy): the same statistics, within 2x the same-dtype torch error, and a choice
that follows timing, the environment and `use(...)`.

Without CUDA the strategy runs under the Triton interpreter (its GEMM in Triton: no cuBLAS here).
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from test_triton_logprobs import IGNORE, check_against_naive, check_real_size, make_inputs

import care_kernels as ck
from care_kernels.triton import cublas_forward, forward_strategy, fp32_gemm
from care_kernels.triton import linear_logprobs as tlp


@pytest.fixture(autouse=True)
def _fresh_picks(monkeypatch):
    monkeypatch.delenv(forward_strategy.ENV, raising=False)
    forward_strategy.reset()
    yield
    forward_strategy.reset()


def _spy_cublas(monkeypatch) -> list:
    calls = []
    real = cublas_forward.partial_stats
    monkeypatch.setattr(cublas_forward, "partial_stats", lambda *a, **k: calls.append(a) or real(*a, **k))
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
    "n,h,v,temperature,bias,chunk_bytes",
    [
        (130, 100, 1000, 0.7, True, None),  # one chunk
        (130, 100, 1000, 1.3, True, 130 * 256 * 4),  # 4 chunks of 256 columns, the last short (232)
        (7, 16, 5, 1.0, False, None),
        (1, 100, 1000, 1.0, True, 300 * 4),  # one row, 4 chunks
        (7, 300, 1000, 0.7, False, 7 * 512 * 4),  # several K tiles in the GEMM, 2 chunks
    ],
)
def test_cublas_strategy_matches_truth_and_the_fused_kernel(device, monkeypatch, dtype, n, h, v, temperature, bias,
                                                              chunk_bytes):  # fmt: skip
    """Log-probs, entropy and lse within 2x the same-dtype torch error of the float64 truth (gradients too: the
    backward uses this forward's lse and entropy), and within fp32 rounding of the fused kernel's."""
    if chunk_bytes:
        monkeypatch.setattr(cublas_forward, "SLAB_BYTES", chunk_bytes)
    inputs = make_inputs(n, h, v, dtype, device, bias=bias)
    with forward_strategy.use("fused"):
        fused = _forward(inputs, temperature)
    calls = _spy_cublas(monkeypatch)
    with forward_strategy.use("cublas"):
        ours = check_against_naive(inputs, temperature)
        assert len(calls) == 1, "the cuBLAS strategy ran"
        without_entropy = _forward(inputs, temperature, with_entropy=False)
    for got, want in zip(ours[:3], fused[:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(without_entropy[0], ours[0], rtol=0, atol=0)
    assert torch.equal(without_entropy[1], torch.zeros_like(without_entropy[1]))


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
    monkeypatch.setattr(cublas_forward, "SLAB_BYTES", 130 * 256 * 4)
    inputs = make_inputs(130, 96, 1000, dtype, device, ref_dtype=ref_dtype)
    if no_bias:
        inputs[no_bias] = None
    with forward_strategy.use("fused"):
        fused = _forward(inputs, dual=True)
    calls = _spy_cublas(monkeypatch)
    with forward_strategy.use("cublas"):
        ours = _forward(inputs, dual=True)
    assert len(calls) == (2 if runs_cublas else 0)
    for got, want in zip(ours, fused):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cublas_strategy_ignore_index_inside_the_vocabulary(device, monkeypatch):
    """Targets equal to an in-vocabulary ignore_index score 0; targets in every chunk are found."""
    monkeypatch.setattr(cublas_forward, "SLAB_BYTES", 7 * 256 * 4)
    inputs = make_inputs(7, 16, 1000, torch.bfloat16, device, ignored=0.0)
    inputs["targets"] = torch.tensor([2, 2, 255, 256, 511, 768, 999], device=device)
    with forward_strategy.use("fused"):
        want = tlp.forward(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"], temperature=1.0,
                           ignore_index=2, with_entropy=True)  # fmt: skip
    with forward_strategy.use("cublas"):
        got = tlp.forward(inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"], temperature=1.0,
                          ignore_index=2, with_entropy=True)  # fmt: skip
    assert torch.all(got[0][:2] == 0) and torch.all(got[1][:2] == 0) and torch.all(got[0][2:] < 0)
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_chunks_are_equal_bounded_and_aligned():
    for n_rows, vocab in [(1, 1), (1, 152064), (16384, 152064), (16384, 151936), (70000, 152064), (3, 1000)]:
        cols = cublas_forward.chunk_columns(n_rows, vocab)
        assert cols % 256 == 0, "chunks start on 256-column boundaries"
        assert n_rows * cols * 4 <= cublas_forward.SLAB_BYTES, "the slab stays bounded"
        most = cublas_forward.SLAB_BYTES // (4 * n_rows) // 256 * 256
        assert -(-vocab // cols) == -(-vocab // most), "no more chunks than the bound needs"
        assert cols < 256 + -(-vocab // -(-vocab // most)), "equal chunks, rounded up to 256 columns"
        assert cublas_forward.slab_elements(n_rows, vocab) == n_rows * cols
    assert cublas_forward.chunk_columns(16384, 152064) == 15360  # 10 chunks of 960 MiB for Qwen2.5-VL-7B's head


def test_chunk_loop_multiplies_every_column_once(device, monkeypatch):
    """The GEMMs partial_stats issues cover the vocabulary exactly, in order, each into the slab's start."""
    monkeypatch.setattr(cublas_forward, "SLAB_BYTES", 7 * 256 * 4)
    inputs = make_inputs(7, 16, 1000, torch.bfloat16, device)
    columns, real = [], cublas_forward.fp32_gemm.addmm_fp32_
    slab = torch.empty(cublas_forward.slab_elements(7, 1000), device=device)

    def spy(acc, a, b, *, accumulate):
        assert acc.data_ptr() == slab.data_ptr() and not accumulate and acc.shape == (7, b.shape[1])
        torch.testing.assert_close(b.T, inputs["weight"][sum(columns) : sum(columns) + b.shape[1]], rtol=0, atol=0)
        columns.append(b.shape[1])
        real(acc, a, b, accumulate=accumulate)

    monkeypatch.setattr(cublas_forward.fp32_gemm, "addmm_fp32_", spy)
    part = cublas_forward.partial_stats(inputs["hidden"], inputs["weight"], None, inputs["targets"], scale2=1.0,
                                        planes=3, slab=slab)  # fmt: skip
    assert columns == [256, 256, 256, 232] and part.shape == (3, 4, 7)


def test_usable_only_for_16bit_operands(device, monkeypatch):
    bf16 = torch.zeros(2, 2, device=device, dtype=torch.bfloat16)
    fp16 = bf16.half()
    fp32 = bf16.float()
    expect = device.type == "cpu" or fp32_gemm.cublas_writes_fp32(device, torch.bfloat16)
    assert cublas_forward.usable(bf16, bf16, None, None) == expect
    assert not cublas_forward.usable(bf16, bf16, fp32, bf16)
    assert not cublas_forward.usable(fp32, fp32)
    if device.type == "cuda":  # a torch without the fp32-output GEMM for one dtype: only the fused forward there
        monkeypatch.setattr(fp32_gemm, "cublas_writes_fp32", lambda _device, dtype: dtype == torch.float16)
        assert cublas_forward.usable(fp16, fp16) and not cublas_forward.usable(fp16, bf16)


# ------------------------------------------------------------------------------------------ the choice


def _timed(monkeypatch, times: dict[str, float]) -> list[str]:
    """Fake timings: `_median_ms` runs the thunk (a name) and returns that name's time; returns the runs made."""
    ran = []
    monkeypatch.setattr(forward_strategy, "_median_ms", lambda run: times[run()])
    return ran


def _candidates(ran: list[str], names=("fused", "cublas")) -> dict:
    return {name: (lambda name=name: ran.append(name) or name) for name in names}


def test_auto_times_each_candidate_once_per_key_and_keeps_the_fastest(monkeypatch):
    ran = _timed(monkeypatch, {"fused": 3.0, "cublas": 2.0})
    key = (3584, None, 152064, 2, 15, False, True, False, False, "torch.bfloat16", "cuda:0")
    assert len(key) == len(forward_strategy.KEY_ARGS)
    assert forward_strategy.choose(key, _candidates(ran), tune=True) == "cublas"
    assert ran == ["fused", "cublas"]
    assert forward_strategy.choose(key, _candidates(ran), tune=True) == "cublas"
    assert ran == ["fused", "cublas"], "a tuned key is not timed again"
    other = (*key[:4], 12, *key[5:])
    monkeypatch.setattr(forward_strategy, "_median_ms", lambda run: {"fused": 1.0, "cublas": 2.0}[run()])
    assert forward_strategy.choose(other, _candidates(ran), tune=True) == "fused"
    [first, second] = forward_strategy.picks()
    assert first["label"] == "cublas" and first["timings_ms"] == {"fused": 3.0, "cublas": 2.0}
    assert first["key"][4] == "15" and len(first["key"]) == len(first["key_args"])
    assert second["label"] == "fused"
    assert {e["label"] for e in tlp.autotuned_configs() if e["kernel"] == "forward strategy"} == {"cublas", "fused"}


def test_a_candidate_out_of_gpu_memory_is_never_picked(monkeypatch):
    """The cuBLAS strategy's slab may not fit where the fused kernel's buffers do: timing drops it for the key."""

    def run_cublas():
        raise torch.OutOfMemoryError("CUDA out of memory (the slab)")

    candidates = {"fused": lambda: "fused", "cublas": run_cublas}
    monkeypatch.setattr(torch.cuda, "Event", lambda **_: types.SimpleNamespace(
        record=lambda: None, synchronize=lambda: None, elapsed_time=lambda _end: 1.0))  # fmt: skip
    assert forward_strategy.choose(("k",), candidates, tune=True) == "fused"
    assert forward_strategy.picks()[0]["timings_ms"] == {"fused": 1.0, "cublas": math.inf}
    with pytest.raises(torch.OutOfMemoryError):  # nothing fits: the caller gets the error, nothing is cached
        forward_strategy.choose(("k2",), {"cublas": run_cublas, "other": run_cublas}, tune=True)
    assert len(forward_strategy.picks()) == 1


def test_untuned_calls_take_the_first_candidate_unless_the_key_was_tuned(monkeypatch):
    ran = _timed(monkeypatch, {"fused": 3.0, "cublas": 2.0})
    key = ("k",)
    assert forward_strategy.choose(key, _candidates(ran), tune=False) == "fused"
    assert forward_strategy.choose(key, _candidates(ran, ("fused",)), tune=True) == "fused"
    assert ran == [] and forward_strategy.picks() == []
    forward_strategy.choose(key, _candidates(ran), tune=True)
    assert forward_strategy.choose(key, _candidates(ran), tune=False) == "cublas"


def test_no_timing_while_a_cuda_graph_is_captured(monkeypatch):
    ran = _timed(monkeypatch, {"fused": 3.0, "cublas": 2.0})
    monkeypatch.setattr(forward_strategy, "_capturing", lambda: True)
    assert forward_strategy.choose(("k",), _candidates(ran), tune=True) == "fused"
    assert ran == [] and forward_strategy.picks() == []


def test_forced_strategy_from_the_environment_or_a_block(monkeypatch):
    ran = _timed(monkeypatch, {"fused": 3.0, "cublas": 2.0})
    monkeypatch.setenv(forward_strategy.ENV, "Fused ")
    assert forward_strategy.choose(("k",), _candidates(ran), tune=True) == "fused"
    with forward_strategy.use(" CUBLAS"):
        assert forward_strategy.choose(("k",), _candidates(ran), tune=True) == "cublas"
        # cannot run here (fp32 operands): the fused kernel
        assert forward_strategy.choose(("k",), _candidates(ran, ("fused",)), tune=True) == "fused"
        with forward_strategy.use("auto"):
            assert forward_strategy.requested() == "auto"
    assert forward_strategy.requested() == "fused"
    assert ran == []


def test_a_bad_strategy_name_is_a_clear_error(monkeypatch, device):
    with pytest.raises(ValueError, match="'auto', 'fused', 'cublas'"):
        with forward_strategy.use("cuBLAS!"):
            pass
    monkeypatch.setenv(forward_strategy.ENV, "fastest")
    inputs = make_inputs(7, 16, 5, torch.bfloat16, device)
    with pytest.raises(ValueError, match=f"{forward_strategy.ENV}='fastest'"):
        ck.linear_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], impl="triton")


def test_the_environment_reaches_the_public_op_with_gradients(monkeypatch, device):
    """ck.linear_logprobs(impl='triton') under CARE_KERNELS_FORWARD_STRATEGY=cublas: the cuBLAS forward runs and
    the gradients match the fused forward's."""
    inputs = make_inputs(130, 100, 1000, torch.bfloat16, device)
    results = {}
    for strategy in ("fused", "cublas"):
        monkeypatch.setenv(forward_strategy.ENV, strategy)
        calls = _spy_cublas(monkeypatch)
        hidden = inputs["hidden"].detach().requires_grad_()
        weight = inputs["weight"].detach().requires_grad_()
        lp, ent = ck.linear_logprobs(hidden, weight, inputs["targets"], inputs["bias"], temperature=0.7,
                                     return_entropy=True, impl="triton")  # fmt: skip
        (lp.sum() + ent.sum()).backward()
        assert len(calls) == (strategy == "cublas")
        results[strategy] = (lp, ent, hidden.grad.float(), weight.grad.float())
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
    ],
)
def test_gpu_cublas_strategy_real_sizes(monkeypatch, n, h, v, bias, dual):
    """bf16 on the GPU (cuBLAS GEMMs): within 2x the bf16 torch error of the float64 truth, gradients included,
    and within fp32 rounding of the fused kernel."""
    inputs = make_inputs(n, h, v, torch.bfloat16, torch.device("cuda"), bias=bias,
                         ref_dtype=torch.bfloat16 if dual else None)  # fmt: skip
    if not cublas_forward.usable(inputs["hidden"]):
        pytest.skip("this torch has no fp32-output cuBLAS GEMM for bf16: the strategy never runs here")
    with forward_strategy.use("fused"):
        fused = _forward(inputs, 1.0, dual=dual)
    calls = _spy_cublas(monkeypatch)
    with forward_strategy.use("cublas"):
        ours = _forward(inputs, 1.0, dual=dual)
        check_real_size(inputs, 1.0, dual=dual)
    assert len(calls) == 2 * (2 if dual else 1)
    for got, want in zip(ours, fused):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_auto_times_both_strategies_once():
    """`auto` on a large bf16 call: both strategies timed once for the key, the faster kept (printed)."""
    inputs = make_inputs(4096, 3584, 152064, torch.bfloat16, torch.device("cuda"), bias=False)
    if not cublas_forward.usable(inputs["hidden"]):
        pytest.skip("this torch has no fp32-output cuBLAS GEMM for bf16: only the fused forward can run")
    first = _forward(inputs, 1.0)
    [pick] = forward_strategy.picks()
    assert set(pick["timings_ms"]) == {"fused", "cublas"}
    assert pick["label"] == min(pick["timings_ms"], key=pick["timings_ms"].get)
    print(f"forward strategy at N=4096, H=3584, V=152064 bf16: {pick['label']} {pick['timings_ms']}")
    again = _forward(inputs, 1.0)
    assert len(forward_strategy.picks()) == 1
    for got, want in zip(again, first):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
