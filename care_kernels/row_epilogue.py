"""Epilogues on a buffer that holds whole rows of logits: `[n, V]` for a bounded chunk of n tokens.

Used by the fused GRPO loss head, which keeps one such chunk at a time so that it can form each token's
loss gradient while the logits are still there (8NHV flops for the head instead of 10NHV). The C++
kernels do each epilogue in one fused OpenMP pass; the torch versions are the fallback and reference.
"""

from __future__ import annotations

import math

import torch

from care_kernels import backends


def _use_cpp(logits: torch.Tensor) -> bool:
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and backends.cpp_status()[0]


def _triton_rows():
    """The Triton row epilogues for CUDA buffers (None elsewhere, or without Triton)."""
    if not backends.triton_status()[0]:
        return None
    from care_kernels.triton import row_epilogue

    return row_epilogue


def row_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int,
              with_entropy: bool = False):
    """logits [n, V] (raw, bias added; float32, or bf16/fp16 on CUDA), targets [n] -> (logprobs, lse, entropy) [n].

    Of z = logits / T: `log_softmax(z).gather(-1, targets[:, None])[:, 0]` (0 at ignored targets),
    `logsumexp(z)`, and with `with_entropy` the entropy `lse - (softmax(z) * z).sum(-1)` (0 at ignored
    targets; None without `with_entropy`). lse is float64 from the C++ kernel (cpu_backend.forward says why),
    float32 elsewhere; pass it on to `row_grad_` as it is.
    """
    if logits.is_cuda and (rows := _triton_rows()) is not None:
        return rows.row_stats(logits, targets, temperature, ignore_index, with_entropy=with_entropy)
    if _use_cpp(logits):
        logprobs, entropy, lse = torch.ops.care_kernels.logits_stats_cpu(
            logits, targets, temperature, ignore_index, with_entropy
        )
        return logprobs, lse, entropy if with_entropy else None
    z = logits.float() / temperature  # the one [n, V] temporary besides exp(z - m)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    z_target = z.gather(1, safe[:, None])[:, 0]
    m = z.max(dim=1, keepdim=True).values
    z -= m
    e = z.exp()
    s = e.sum(dim=1)
    lse = m[:, 0] + s.log()
    logprobs = torch.where(valid, z_target - lse, 0.0)
    entropy = None
    if with_entropy:  # relative to the max: log s - sum e (z - m) / s, no cancellation for large logits
        t = z.mul_(e).sum(dim=1)  # (z is not needed after this)
        entropy = torch.where(valid, (s.log() - t / s).clamp(min=0.0, max=math.log(logits.shape[1])), 0.0)
    return logprobs, lse, entropy


def row_stats_probs_(logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, *,
                     with_entropy: bool = False):  # fmt: skip
    """row_stats (logprobs, lse, entropy or None) and, in place, logits <- (onehot(y) - softmax(logits / T)) / T:
    the logits' gradient per unit of each row's log-prob gradient (the fused head scales rows by d loss / d logprob
    afterwards). One launch on CUDA (Triton: the row's second read from L2), torch elsewhere. Rows with an ignored
    target get -softmax / T. Returns (logprobs, lse, entropy or None)."""
    if logits.is_cuda and (rows := _triton_rows()) is not None:
        return rows.row_stats_probs_(logits, targets, temperature, ignore_index, with_entropy=with_entropy)
    stats = row_stats(logits, targets, temperature, ignore_index, with_entropy=with_entropy)
    lse = stats[1]
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    q = torch.exp(logits.float() / temperature - lse[:, None]).neg_()
    q.scatter_add_(1, safe[:, None], valid.to(q.dtype)[:, None])
    logits.copy_(q.div_(temperature))
    return stats[0], lse, (stats[2] if with_entropy else None)


def row_grad_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_logprobs: torch.Tensor,
              temperature: float, ignore_index: int) -> torch.Tensor:
    """Overwrite logits [n, V] with d(sum g * logprobs)/d logits = g (onehot(y) - softmax(logits / T)) / T.

    Rows with an ignored target (or g = 0) become 0. Returns the same buffer.
    """
    if logits.is_cuda and (rows := _triton_rows()) is not None:
        return rows.row_grad_(logits, targets, lse, grad_logprobs, temperature, ignore_index)
    valid = targets != ignore_index
    g = torch.where(valid, grad_logprobs.float(), 0.0)
    if _use_cpp(logits):
        torch.ops.care_kernels.logits_grad_cpu_(logits, targets, lse, torch.zeros_like(g), g, None,
                                                temperature, ignore_index)
        return logits
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    # fp32 math: in place for an fp32 buffer, through an fp32 copy for a 16-bit one (rounded once at the end)
    z = logits if logits.dtype == torch.float32 else logits.float()
    z.div_(temperature).sub_(lse[:, None]).exp_().mul_(-g[:, None])
    z.scatter_add_(1, safe[:, None], g[:, None])
    z.div_(temperature)
    return logits if z is logits else logits.copy_(z)
