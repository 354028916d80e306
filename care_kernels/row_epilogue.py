"""Epilogues on a buffer that holds whole rows of logits: `[n, V]` for a bounded chunk of n tokens.

Used by the fused GRPO loss head, which keeps one such chunk at a time so that it can form each token's
loss gradient while the logits are still there (8NHV flops for the head instead of 10NHV). The C++
kernels do each epilogue in one fused OpenMP pass; the torch versions are the fallback and reference.
"""

from __future__ import annotations

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


def row_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, *,
              with_entropy: bool = False):  # fmt: skip
    """logits [n, V] (raw, bias added; float32, or bf16/fp16 on CUDA), targets [n] -> (logprobs, lse) [n] of logits / T
    (float32), and with_entropy the entropy [n] third.

    Equivalent to `log_softmax(logits / T).gather(-1, targets[:, None])[:, 0]` and `logsumexp(logits / T)`, and
    `-(softmax(logits / T) * log_softmax(logits / T)).sum(-1)`; 0 log-prob and entropy at ignored targets.
    """
    if logits.is_cuda and (rows := _triton_rows()) is not None:
        return rows.row_stats(logits, targets, temperature, ignore_index, with_entropy=with_entropy)
    if _use_cpp(logits):
        logprobs, entropy, lse = torch.ops.care_kernels.logits_stats_cpu(logits, targets, temperature, ignore_index,
                                                                        with_entropy)  # fmt: skip
        return (logprobs, lse, entropy) if with_entropy else (logprobs, lse)
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logprobs = torch.where(valid, z.gather(1, safe[:, None])[:, 0] - lse, torch.zeros_like(lse))
    if not with_entropy:
        return logprobs, lse
    p = torch.exp(z - lse[:, None])
    entropy = torch.where(valid, (lse - (p * z).sum(1)).clamp_min(0.0), torch.zeros_like(lse))
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
    g = torch.where(valid, grad_logprobs.float(), torch.zeros_like(lse))
    if _use_cpp(logits):
        torch.ops.care_kernels.logits_grad_cpu_(logits, targets, lse, torch.zeros_like(lse), g, None,
                                                temperature, ignore_index)
        return logits
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    # fp32 math: in place for an fp32 buffer, through an fp32 copy for a 16-bit one (rounded once at the end)
    z = logits if logits.dtype == torch.float32 else logits.float()
    z.div_(temperature).sub_(lse[:, None]).exp_().mul_(-g[:, None])
    z.scatter_add_(1, safe[:, None], g[:, None])
    z.div_(temperature)
    return logits if z is logits else logits.copy_(z)
