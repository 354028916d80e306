"""The naive, materialized computation: what every fused kernel must agree with.

It builds the full `[N, V]` logits, so use it only for testing and as the benchmark baseline.
"""

from __future__ import annotations

import torch


def naive_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropy from materialized logits, differentiable.

    hidden [..., H], weight [V, H], targets [...], bias [V] -> (logprobs [...], entropy [...]) float32
    (float64 when compute_dtype is float64). The matmul runs in `compute_dtype` (default: the inputs'
    dtype, which is "the same-dtype torch computation" the kernels' error is compared with); the softmax
    always runs in at least float32:

        z = (hidden @ weight.T + bias).float() / temperature
        logprobs = log_softmax(z).gather(targets);  entropy = -(softmax(z) * log_softmax(z)).sum(-1)
    """
    dtype = compute_dtype or hidden.dtype
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    z = logits.to(stat_dtype) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logprobs = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros((), dtype=stat_dtype, device=z.device)
    return torch.where(valid, logprobs, zero), torch.where(valid, entropy, zero)
