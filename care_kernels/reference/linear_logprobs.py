"""The torch reference of the fused log-prob op: read this first.

Same math as the Triton and C++ kernels, written with plain torch ops and chunked over tokens and the
vocabulary, so that it too never holds `[N, V]` logits: at most one `[ROWS, COLS]` float32 tile.

For one token with hidden state h and target y (z are the tempered logits):

    z_j       = (h . w_j + b_j) / T
    lse       = log sum_j exp(z_j)                 (online: running max m, running sum s = sum exp(z - m))
    logprob   = z_y - lse
    entropy   = lse - sum_j p_j z_j                (p = softmax(z); online: t = sum exp(z - m) (z - m),
                                                    entropy = log s - t / s, so large logits cancel nothing)

and, for upstream gradients g_lp (of the log-prob) and g_ent (of the entropy),

    dz_j      = g_lp (1[j = y] - p_j) - g_ent p_j (z_j - lse + entropy)
    dlogits   = dz / T;   dh = dlogits @ W;   dW = dlogits^T @ h;   db = sum_rows dlogits
"""

from __future__ import annotations

import torch

ROWS = 2048  # tokens per tile
COLS = 8192  # vocabulary entries per tile


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits_tile(hidden, weight, bias, rows: slice, cols: slice, temperature: float) -> torch.Tensor:
    """z = (hidden[rows] @ weight[cols].T + bias[cols]).float() / T, the matmul in the inputs' dtype."""
    logits = hidden[rows] @ weight[cols].T
    if bias is not None:
        logits = logits + bias[cols]
    return logits.to(_stat_dtype(hidden.dtype)) / temperature


def _target_in_tile(targets_rows: torch.Tensor, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(does the target fall in this vocabulary tile [n] bool, its column inside the tile [n] int64)."""
    local = targets_rows - cols.start
    hit = (local >= 0) & (local < cols.stop - cols.start)
    return hit, torch.where(hit, local, torch.zeros_like(local))


def _score(hidden, weight, bias, targets, temperature: float, with_entropy: bool):
    """Online statistics over the vocabulary for all tokens -> (target logit, lse, entropy) [N] each."""
    n, v = hidden.shape[0], weight.shape[0]
    dt = _stat_dtype(hidden.dtype)
    lse = torch.empty(n, dtype=dt, device=hidden.device)
    target_z = torch.zeros(n, dtype=dt, device=hidden.device)
    entropy = torch.zeros(n, dtype=dt, device=hidden.device)
    for r0 in range(0, n, ROWS):
        rows = slice(r0, min(r0 + ROWS, n))
        m = torch.full((rows.stop - r0,), float("-inf"), dtype=dt, device=hidden.device)
        s = torch.zeros_like(m)  # sum exp(z - m)
        t = torch.zeros_like(m)  # sum exp(z - m) * (z - m): relative to the max, so large logits cancel nothing
        for c0 in range(0, v, COLS):
            cols = slice(c0, min(c0 + COLS, v))
            z = _logits_tile(hidden, weight, bias, rows, cols, temperature)
            m_new = torch.maximum(m, z.amax(dim=1))
            rescale = torch.exp(m - m_new)  # exp(-inf) = 0 on the first tile
            e = torch.exp(z - m_new[:, None])
            if with_entropy:  # the old terms move to the new max: (z - m) -> (z - m_new) = (z - m) + (m - m_new)
                shift = torch.where(s > 0, m - m_new, torch.zeros_like(m))
                t = (t + s * shift) * rescale + (e * (z - m_new[:, None])).sum(dim=1)
            s = s * rescale + e.sum(dim=1)
            m = m_new
            hit, local = _target_in_tile(targets[rows], cols)
            target_z[rows] += torch.where(hit, z.gather(1, local[:, None])[:, 0], torch.zeros_like(m))
        lse[rows] = m + torch.log(s)
        if with_entropy:
            entropy[rows] = torch.log(s) - t / s  # lse - sum p z, with lse = m + log s and sum p z = m + t / s
    return target_z, lse, entropy


def forward(hidden, weight, bias, targets, *, temperature, ignore_index, with_entropy,
            ref_hidden=None, ref_weight=None, ref_bias=None):
    """hidden [N, H], weight [V, H], bias [V] | None, targets [N] -> (logprobs, entropy, lse, ref_logprobs | None).

    All outputs are float32 [N] (float64 for float64 inputs); 0 at ignored targets. The reference is
    scored against the same targets, without entropy. Equivalent to
    `log_softmax((hidden @ weight.T + bias).float() / T).gather(-1, targets[:, None])[:, 0]`.
    """
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    target_z, lse, entropy = _score(hidden, weight, bias, safe_targets, temperature, with_entropy)
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    logprobs = torch.where(valid, target_z - lse, zero)
    entropy = torch.where(valid, entropy, zero)
    ref_logprobs = None
    if ref_weight is not None:
        ref_z, ref_lse, _ = _score(ref_hidden, ref_weight, ref_bias, safe_targets, temperature, False)
        ref_logprobs = torch.where(valid, ref_z - ref_lse, zero).to(lse.dtype)
    return logprobs, entropy, lse, ref_logprobs


def backward(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, *,
             temperature, ignore_index):
    """Gradients of sum(g_lp * logprobs + g_ent * entropy) w.r.t. hidden, weight and bias.

    Returns (grad_hidden [N, H] in hidden.dtype, grad_weight [V, H] in weight.dtype, grad_bias [V] | None),
    accumulated in float32 (float64 for float64 inputs) while the logits tiles are recomputed.
    """
    n, v = hidden.shape[0], weight.shape[0]
    dt = _stat_dtype(hidden.dtype)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    zero = torch.zeros((), dtype=dt, device=hidden.device)
    g_lp = torch.where(valid, grad_logprobs.to(dt), zero)
    g_ent = None if grad_entropy is None else torch.where(valid, grad_entropy.to(dt), zero)
    grad_hidden = torch.zeros(hidden.shape, dtype=dt, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=dt, device=weight.device)
    grad_bias = None if bias is None else torch.zeros(v, dtype=dt, device=weight.device)
    for r0 in range(0, n, ROWS):
        rows = slice(r0, min(r0 + ROWS, n))
        h_rows = hidden[rows].to(dt)
        for c0 in range(0, v, COLS):
            cols = slice(c0, min(c0 + COLS, v))
            z = _logits_tile(hidden, weight, bias, rows, cols, temperature)
            p = torch.exp(z - lse[rows, None].to(dt))
            dz = -g_lp[rows, None] * p
            if g_ent is not None:
                dz -= g_ent[rows, None] * p * (z - lse[rows, None] + entropy[rows, None])
            hit, local = _target_in_tile(safe_targets[rows], cols)
            dz.scatter_add_(1, local[:, None], torch.where(hit, g_lp[rows], zero)[:, None])
            dlogits = dz / temperature
            grad_hidden[rows] += dlogits @ weight[cols].to(dt)
            grad_weight[cols] += dlogits.T @ h_rows
            if grad_bias is not None:
                grad_bias[cols] += dlogits.sum(dim=0)
    return (
        grad_hidden.to(hidden.dtype),
        grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
