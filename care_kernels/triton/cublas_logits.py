"""The `cublas` and `cublas16` strategies (see logits_gemm): the logits GEMM in cuBLAS, one vocabulary chunk at a
time, into a slab that a Triton pass reads back once.

    forward,  each chunk c:  z = hidden @ weight[c].T     (cuBLAS)
                             part[:, c] = statistics of (z + bias[c]) * log2(e) / T      (logits_slab_stats_kernel)
    backward, each chunk c:  z = hidden @ weight[c].T;  dlogits[:, c] = f(z + bias[c], lse, entropy, g)
                                                                                          (logits_slab_grad_kernel)

The fused kernels multiply in Triton and consume each logits tile on chip. These strategies let cuBLAS multiply,
which runs nearer the tensor cores' peak, and pay for a slab (bounded) and its HBM traffic:
- `cublas`: an fp32 slab (fp32 accumulate and output): 8 bytes per logit (written, read back). The logits are fp32
  as in the fused kernels (the same products summed in another order), so the choice never changes the precision.
  The backward keeps two slabs (fp32 logits, 16-bit dlogits) under one budget.
- `cublas16`: a slab in the operands' 16-bit dtype: cuBLAS rounds each logit to 16 bits, as `hidden @ weight.T`
  in bf16 does (and TRL's and Liger's heads): 4 bytes per logit in the forward, as theirs; the backward writes the
  dlogits over the logits in place (one slab, 2 bytes per element, its own budget: the dlogits slab's).
The forward's partial statistics have the fused kernel's layout (one merge serves all), the backward's dlogits
the fused kernel's formula.
"""

from __future__ import annotations

import os

import torch
import triton

from care_kernels.triton import fp32_gemm, tuning
from care_kernels.triton._backward_kernels import logits_slab_grad_kernel
from care_kernels.triton._forward_kernels import logits_slab_stats_kernel

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Upper bound of the forward's fp32 logits slab [N, chunk] (bytes): at N = 16k chunks of 15k columns, 10 for
# Qwen's vocabulary; the same bound as the backward's slabs (linear_logprobs.DLOGITS_SLAB_BYTES), so a training
# step's peak does not grow.
SLAB_BYTES = 1 << 30
# Upper bound of the cublas16 forward's 16-bit slab (bytes), its own (at N = 16k: chunks of 32k columns, 5 for Qwen's
# vocabulary).
SLAB16_BYTES = 1 << 30
_COL_ALIGN = 256


def _tile(bm: int, bn: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps)


# Both passes stream the slab once (memory-bound): the autotuner picks, once per process and flags, how many
# elements each thread holds (8 to 32: registers against loads in flight; sm90_report: no spills, 32-161
# registers with Triton 3.8). The forward's fold reads BLOCK_M rows x BLOCK_N columns per step, coalesced
# along the columns; the backward's pass owns one [BLOCK_M, BLOCK_N] tile per program.
FOLD_CONFIGS = [_tile(8, 512, 4), _tile(4, 1024, 8), _tile(2, 1024, 4), _tile(1, 2048, 8)]
GRAD_CONFIGS = [_tile(16, 256, 4), _tile(8, 256, 4), _tile(32, 256, 8), _tile(16, 512, 8)]
_fold_tuned = tuning.autotune(FOLD_CONFIGS, ["HAS_BIAS", "WITH_ENTROPY"])(logits_slab_stats_kernel)
_grad_tuned = tuning.autotune(GRAD_CONFIGS, ["HAS_BIAS", "HAS_GRAD_ENTROPY"])(logits_slab_grad_kernel)
# Under the interpreter: one config with few programs (each costs ~ms there, whatever its size).
_INTERPRET_TILE = dict(BLOCK_M=128, BLOCK_N=256, num_warps=4)


def tuners() -> dict:
    """The autotuned slab passes by name (benchmarks record their picks)."""
    return {"slab stats": _fold_tuned, "slab dlogits": _grad_tuned}


def _launch(tuned, plain, grid, *args, **flags) -> None:
    """`plain` with the interpreter's tile, or the autotuner; grid(meta) -> launch grid."""
    if _INTERPRET:
        plain[grid(_INTERPRET_TILE)](*args, **flags, **_INTERPRET_TILE)
    else:
        tuned[grid](*args, **flags)


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether this strategy can run on these operands (hidden, weight, ...; None skipped): 16-bit, on a GPU whose
    torch has cuBLAS's fp32-output GEMM for each dtype (otherwise the logits would be rounded to 16 bits), or
    under the interpreter (CPU tests; the GEMM then runs in Triton)."""
    present = [t for t in tensors if t is not None]
    if not all(t.dtype in (torch.float16, torch.bfloat16) for t in present):
        return False
    if _INTERPRET:
        return True
    return all(t.is_cuda and fp32_gemm.cublas_writes_fp32(t.device, t.dtype) for t in present)


def usable16(*tensors: torch.Tensor | None) -> bool:
    """Whether the `cublas16` strategy can run on these operands (None skipped): all of one 16-bit dtype (the slab's),
    on a GPU, or under the interpreter (CPU tests; torch's GEMM)."""
    present = [t for t in tensors if t is not None]
    if not present or present[0].dtype not in (torch.float16, torch.bfloat16):
        return False
    if any(t.dtype != present[0].dtype for t in present):
        return False
    return _INTERPRET or all(t.is_cuda for t in present)


def _logits_gemm_(z: torch.Tensor, hidden: torch.Tensor, weight_chunk: torch.Tensor) -> None:
    """z [N, n_cols] = hidden @ weight_chunk.T, in z's dtype: fp32 accumulated and kept (addmm_fp32_), or a 16-bit
    GEMM whose fp32 sums cuBLAS rounds to z's dtype."""
    if z.dtype == torch.float32:
        fp32_gemm.addmm_fp32_(z, hidden, weight_chunk.T, accumulate=False)
    else:
        torch.mm(hidden, weight_chunk.T, out=z)


def equal_chunks(vocab: int, most: int) -> int:
    """Columns per chunk to cover [0, vocab) in as few chunks of at most `most` (a multiple of 256) columns as
    possible, all of one width rounded up to 256 (a short last chunk would run its GEMM below the peak)."""
    if most >= vocab:
        return vocab
    chunks = triton.cdiv(vocab, most)
    return min(most, triton.cdiv(triton.cdiv(vocab, chunks), _COL_ALIGN) * _COL_ALIGN)


def chunk_columns(n_rows: int, vocab: int, element_size: int = 4) -> int:
    """Columns per forward chunk: equal chunks whose slab fits its budget (SLAB_BYTES for the fp32 slab, SLAB16_BYTES
    for a 16-bit one; at least 256 columns)."""
    budget = SLAB_BYTES if element_size == 4 else SLAB16_BYTES
    return equal_chunks(vocab, max(_COL_ALIGN, budget // max(1, element_size * n_rows) // _COL_ALIGN * _COL_ALIGN))


def partial_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    scale2: float,
    planes: int,
    slab: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-chunk base-2 statistics [planes, chunks, N] (planes 3: max, sumexp, target; 4: and entropy) of
    z2 = (hidden @ weight.T + bias) * scale2, as linear_logprob_stats_kernel writes them with one split per chunk.

    hidden [N, H], weight [V, H] 16-bit (usable(), or usable16() for a 16-bit slab), bias [V] or None, targets [N]
    int64 (outside [0, V): no target term). slab: a flat buffer of at least slab_elements(N, V, its element size)
    elements to reuse (a dual call scores its two models through one), whose dtype is the logits' (fp32: the
    `cublas` strategy; the operands' 16-bit dtype: `cublas16`), else an fp32 one is allocated.
    """
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    if slab is None:
        slab = torch.empty(slab_elements(n_rows, vocab), dtype=torch.float32, device=hidden.device)
    cols = chunk_columns(n_rows, vocab, slab.element_size())
    chunks = triton.cdiv(vocab, cols)
    part = torch.empty((planes, chunks, n_rows), dtype=torch.float32, device=hidden.device)
    for chunk, col_begin in enumerate(range(0, vocab, cols)):
        n_cols = min(cols, vocab - col_begin)
        z = slab[: n_rows * n_cols].view(n_rows, n_cols)
        _logits_gemm_(z, hidden, weight[col_begin : col_begin + n_cols])
        _launch(
            _fold_tuned, logits_slab_stats_kernel, lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),),
            z, bias if bias is not None else z, part, targets, n_rows, n_cols, col_begin, chunk, chunks, scale2,
            HAS_BIAS=bias is not None, WITH_ENTROPY=planes == 4,
        )  # fmt: skip
    return part


def slab_elements(n_rows: int, vocab: int, element_size: int = 4) -> int:
    """Elements of the flat slab partial_stats needs for N rows and a vocabulary of V (elements of element_size
    bytes: 4 for the fp32 slab, 2 for a 16-bit one)."""
    return n_rows * chunk_columns(n_rows, vocab, element_size)


def dlogits_(
    out: torch.Tensor,
    z: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    *,
    col_begin: int,
    scale2: float,
    inv_temp: float,
    ignore_index: int,
) -> torch.Tensor:
    """out [N, n_cols] (any float dtype) = the dlogits of vocabulary columns [col_begin, col_begin + n_cols), the
    values linear_logprobs' dlogits_kernel writes (see linear_logprobs.backward) from logits z [N, n_cols]
    (contiguous) that cuBLAS writes first: an fp32 scratch (`cublas`; hidden, weight usable()), or out itself, in
    the operands' 16-bit dtype (`cublas16`: each element read, then overwritten by its dlogit; usable16()).
    Returns out."""
    n_rows, n_cols = out.shape
    _logits_gemm_(z, hidden, weight[col_begin : col_begin + n_cols])
    _launch(
        _grad_tuned, logits_slab_grad_kernel,
        lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(n_cols, meta["BLOCK_N"])),
        z, bias if bias is not None else z, targets, lse, entropy, grad_logprobs,
        grad_entropy if grad_entropy is not None else grad_logprobs, out, n_rows, weight.shape[0], col_begin,
        n_cols, scale2, inv_temp, ignore_index,
        HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
    )  # fmt: skip
    return out
