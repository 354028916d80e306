"""Triton epilogues over whole rows of a logits chunk `[n, V]` (the fused GRPO head's buffer, on GPU).

One program per row streams the row in BLOCK-wide slices (reading it once per pass, in its own dtype,
bf16/fp16 included, with fp32 math), so each epilogue costs one or two reads of the buffer instead of
the several full-size fp32 temporaries the same torch expressions would allocate.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from care_kernels.triton import tuning

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NEG_BIG = tl.constexpr(-1.0e30)  # finite stand-in for -inf: keeps exp(m_old - m_new) away from NaN
_BLOCK = 4096 if not _INTERPRET else 1024


@triton.jit
def _row_lse_entropy(base, V, inv_t, BLOCK: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """One pass over the row of V logits at `base` -> (lse, entropy) of z = logits * inv_t (entropy 0.0 unless
    WITH_ENTROPY). Per lane: the running max m, s = sum exp(z - m) and t = sum exp(z - m) (z - m), rescaled when
    m grows; then the lanes merged at the row's max: lse = m_row + log S, entropy = log S - T / S."""
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], NEG_BIG, dtype=tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    t = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        z = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32) * inv_t
        z = tl.where(cols < V, z, NEG_BIG)
        m_new = tl.maximum(m, z)
        scale = tl.exp(m - m_new)
        p = tl.exp(z - m_new)
        if WITH_ENTROPY:  # t relative to the new max: (t + s (m - m_new)) scale + p (z - m_new)
            t = (t + s * (m - m_new)) * scale + p * (z - m_new)
        s = s * scale + p
        m = m_new
    m_row = tl.max(m, axis=0)
    lane_scale = tl.exp(m - m_row)  # 0 for a lane that saw no column (m = NEG_BIG)
    s_row = tl.sum(s * lane_scale, axis=0)
    entropy = 0.0
    if WITH_ENTROPY:
        t_row = tl.sum(tl.where(lane_scale > 0, (t + s * (m - m_row)) * lane_scale, 0.0), axis=0)
        entropy = tl.maximum(tl.log(s_row) - t_row / s_row, 0.0)
    return m_row + tl.log(s_row), entropy


@triton.jit
def _row_stats_store(base, row, tgt_ptr, logp_ptr, lse_ptr, ent_ptr, V, inv_t, ignore_index, BLOCK: tl.constexpr,
                     WITH_ENTROPY: tl.constexpr):  # fmt: skip
    """A row's log-prob, lse (and entropy) stored at index `row` (0 log-prob and entropy at an ignored target);
    returns (lse, target, valid) for a caller that goes on with the row."""
    lse, entropy = _row_lse_entropy(base, V, inv_t, BLOCK, WITH_ENTROPY)
    y = tl.load(tgt_ptr + row)
    valid = y != ignore_index
    z_y = tl.load(base + tl.where(valid, y, 0)).to(tl.float32) * inv_t
    tl.store(logp_ptr + row, tl.where(valid, z_y - lse, 0.0))
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, entropy, 0.0))
    return lse, y, valid


@triton.jit
def _row_stats_kernel(z_ptr, tgt_ptr, logp_ptr, lse_ptr, ent_ptr, V, stride, inv_t, ignore_index,
                      BLOCK: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    _row_stats_store(base, row, tgt_ptr, logp_ptr, lse_ptr, ent_ptr, V, inv_t, ignore_index, BLOCK, WITH_ENTROPY)


@triton.jit
def _row_grad_kernel(z_ptr, tgt_ptr, lse_ptr, g_ptr, V, stride, inv_t, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    offs = tl.arange(0, BLOCK)
    y = tl.load(tgt_ptr + row)
    g = tl.where(y != ignore_index, tl.load(g_ptr + row), 0.0)
    lse = tl.load(lse_ptr + row)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
        d = tl.where(cols == y, g, 0.0) - g * tl.exp(z - lse)
        tl.store(base + cols, (d * inv_t).to(z_ptr.dtype.element_ty), mask=mask)


def row_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int,
              with_entropy: bool = False):
    """logits [n, V] (any float dtype, unit stride along V) -> (logprobs, lse, entropy or None) [n] float32 of
    logits / T (care_kernels.row_epilogue.row_stats)."""
    n, v = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    if n:
        _row_stats_kernel[(n,)](logits, targets, logp, lse, entropy if with_entropy else logp, v, logits.stride(0),
                                1.0 / temperature, ignore_index, BLOCK=_BLOCK, WITH_ENTROPY=with_entropy,
                                num_warps=8)
    return logp, lse, entropy


def row_grad_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_logprobs: torch.Tensor,
              temperature: float, ignore_index: int) -> torch.Tensor:
    """In place: logits <- g (onehot(y) - softmax(logits / T)) / T, in the buffer's dtype. Returns logits."""
    n, v = logits.shape
    if n:
        _row_grad_kernel[(n,)](logits, targets, lse, grad_logprobs.float().contiguous(), v, logits.stride(0),
                               1.0 / temperature, ignore_index, BLOCK=_BLOCK, num_warps=8)
    return logits


@triton.jit
def _row_stats_probs_kernel(z_ptr, tgt_ptr, logp_ptr, lse_ptr, ent_ptr, n_rows, V, stride, inv_t, ignore_index,
                            WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
                            PROGRAMS_PER_SM: tl.constexpr):  # fmt: skip  (the launcher sizes the grid with it)
    """Persistent programs, each taking rows pid, pid + programs, ...: pass 1 over a row folds its statistics
    (online max and sum of exp per lane; the entropy's sum of p * (z - max)), pass 2 over the same row writes
    q = (onehot(y) - p) / T over it. With few programs per SM the rows in flight fit the L2 cache, so pass 2 reads
    them from there: one sweep of HBM reads per row instead of two."""
    offs = tl.arange(0, BLOCK)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        base = z_ptr + tl.cast(row, tl.int64) * stride
        lse, y, valid = _row_stats_store(base, row, tgt_ptr, logp_ptr, lse_ptr, ent_ptr, V, inv_t, ignore_index,
                                         BLOCK, WITH_ENTROPY)  # fmt: skip
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
            q = tl.where((cols == y) & valid, 1.0, 0.0) - tl.exp(z - lse)
            tl.store(base + cols, (q * inv_t).to(z_ptr.dtype.element_ty), mask=mask)


# The one-sweep pass's launch shapes, timed once per (V, entropy, dtype) on a GPU: lanes per row step (registers vs
# loads in flight) and programs per SM (rows in flight: L2 reuse vs latency hiding). Its kernel writes in place, so
# the autotuner restores the logits after each timed run (a copy of the buffer while it tunes).
PROBS_CONFIGS = [
    triton.Config({"BLOCK": 4096, "PROGRAMS_PER_SM": 1}, num_warps=8),
    triton.Config({"BLOCK": 8192, "PROGRAMS_PER_SM": 1}, num_warps=16),
    triton.Config({"BLOCK": 4096, "PROGRAMS_PER_SM": 2}, num_warps=8),
    triton.Config({"BLOCK": 2048, "PROGRAMS_PER_SM": 4}, num_warps=4),
]

_probs_tuned = tuning.autotune(PROBS_CONFIGS, ["V", "WITH_ENTROPY"], restore_value=["z_ptr"])(_row_stats_probs_kernel)
_sm_count: dict[int, int] = {}


def _programs(device: torch.device, per_sm: int) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_count[index] * per_sm


def row_stats_probs_(logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, *,
                     with_entropy: bool = False):  # fmt: skip
    """One launch: (logprobs [n], lse [n], entropy [n] or None) float32 of logits / T, and, in place,
    logits <- (onehot(y) - softmax(logits / T)) / T in the buffer's dtype (the logits' gradient per unit of the
    log-prob's: the caller scales rows by d loss / d logprob). logits [n, V] (unit stride along V); rows whose
    target is ignore_index get logprob (and entropy) 0 and -softmax / T.

    Equivalent torch: z = logits.float() / T; lse = z.logsumexp(-1); p = (z - lse).exp()
        logprobs = (z.gather(-1, y) - lse) * valid;  entropy = (lse - (p * z).sum(-1)) * valid
        logits[:] = (onehot(y) * valid - p) / T
    """
    n, v = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else lse
    if n:
        args = (logits, targets, logp, lse, ent, n, v, logits.stride(0), 1.0 / temperature, ignore_index)
        if _INTERPRET:
            _row_stats_probs_kernel[(min(n, 4),)](*args, WITH_ENTROPY=with_entropy, BLOCK=_BLOCK, PROGRAMS_PER_SM=1,
                                                  num_warps=8)  # fmt: skip
        else:
            grid = lambda meta: (min(n, _programs(logits.device, meta["PROGRAMS_PER_SM"])),)  # noqa: E731
            _probs_tuned[grid](*args, WITH_ENTROPY=with_entropy)
    return logp, lse, (ent if with_entropy else None)
