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

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NEG_BIG = tl.constexpr(-1.0e30)  # finite stand-in for -inf: keeps exp(m_old - m_new) away from NaN
_BLOCK = 4096 if not _INTERPRET else 1024


@triton.jit
def _row_stats_kernel(z_ptr, tgt_ptr, logp_ptr, lse_ptr, ent_ptr, V, stride, inv_t, ignore_index,
                      BLOCK: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], NEG_BIG, dtype=tl.float32)  # per lane: running max, sum exp(z - m), sum exp(z - m)(z - m)
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
    lane_scale = tl.exp(m - m_row)
    s_row = tl.sum(s * lane_scale, axis=0)
    lse = m_row + tl.log(s_row)
    y = tl.load(tgt_ptr + row)
    valid = y != ignore_index
    z_y = tl.load(base + tl.where(valid, y, 0)).to(tl.float32) * inv_t
    tl.store(logp_ptr + row, tl.where(valid, z_y - lse, 0.0))
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:  # entropy = log s - sum p (z - m_row) / s; lanes that saw no column weigh 0 (lane_scale 0)
        t_row = tl.sum(tl.where(lane_scale > 0, (t + s * (m - m_row)) * lane_scale, 0.0), axis=0)
        tl.store(ent_ptr + row, tl.where(valid, tl.maximum(tl.log(s_row) - t_row / s_row, 0.0), 0.0))


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
