"""The clipped GRPO policy loss over per-token log-probabilities, TRL's math (GRPOTrainer._compute_loss).

    loss, metrics = ck.policy_loss(logp, advantages, completion_mask, loss_type="grpo")
    loss.backward()

Loss types ("grpo", "bnpo", "dr_grpo", "dapo") are normalizers registered by name in
care_kernels.losses.registry; a new variant is a new registered function.
"""

from __future__ import annotations

import math
import numbers

import torch

from care_kernels.losses.registry import get_loss_type, register_loss_type

__all__ = ["policy_loss"]


# ----------------------------------------------------------------------------------------------------------
# built-in loss types: the normalizers of TRL 1.16 (without its division by gradient accumulation steps)


@register_loss_type("grpo")
def grpo(per_token_loss, mask, *, max_completion_length=None, num_items_in_batch=None):
    """Token mean per sequence, then mean over sequences (GRPO, GRPO-CARE); an empty sequence counts as 0."""
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


@register_loss_type("bnpo")
def bnpo(per_token_loss, mask, *, max_completion_length=None, num_items_in_batch=None):
    """Token mean over the local batch: sum / mask sum."""
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


@register_loss_type("dr_grpo")
def dr_grpo(per_token_loss, mask, *, max_completion_length=None, num_items_in_batch=None):
    """Dr. GRPO: sum / (B * max_completion_length), a constant normalizer."""
    if max_completion_length is None:
        raise ValueError(
            "loss_type='dr_grpo' divides by B * max_completion_length: pass max_completion_length"
        )
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)


@register_loss_type("dapo")
def dapo(per_token_loss, mask, *, max_completion_length=None, num_items_in_batch=None):
    """DAPO: sum / num_items_in_batch (tokens of the whole accumulation window), or / mask sum when None."""
    if num_items_in_batch is None:
        normalizer = mask.sum().clamp(min=1.0)
    elif isinstance(num_items_in_batch, torch.Tensor):
        normalizer = num_items_in_batch.clamp(min=1.0)
    else:
        normalizer = max(float(num_items_in_batch), 1.0)
    return (per_token_loss * mask).sum() / normalizer


# ----------------------------------------------------------------------------------------------------------
# validation


def _float_tensor(x, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor (float32 log-probs), got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(
            f"{name} must have shape [B, T] = {list(shape)} (like logprobs), got {list(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but logprobs on {device}; pass all tensors on one device")
    return x


def _epsilon(value, name: str) -> float:
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a float >= 0 (the PPO clip range), got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0 (the PPO clip range), got {value!r}")
    return float(value)


def check_kl_clamp(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"kl_clamp must be a float > 0 (the bound on |ref - logprobs|) or None, got {value!r}")
    return float(value)


def _check_args(
    logprobs, advantages, mask, old_logprobs, ref_logprobs, beta, max_completion_length, num_items_in_batch
) -> None:
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2 or not logprobs.is_floating_point():
        got = (
            f"shape {list(logprobs.shape)} {logprobs.dtype}"
            if isinstance(logprobs, torch.Tensor)
            else logprobs
        )
        raise ValueError(f"logprobs must be a floating tensor [B, T] of per-token log-probs, got {got}")
    b, t = logprobs.shape
    if b == 0:
        raise ValueError("logprobs has no sequences (B = 0); pass at least one sequence")
    device = logprobs.device
    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise ValueError(f"advantages must be a floating tensor [B] (one per sequence), got {advantages!r}")
    if tuple(advantages.shape) not in ((b,), (b, 1), (b, t)):
        raise ValueError(
            f"advantages must have shape [B] = [{b}] (or [B, T] per token), got {list(advantages.shape)}"
        )
    if advantages.device != device:
        raise ValueError(f"advantages is on {advantages.device} but logprobs on {device}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, t) or mask.is_complex():
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool / int / float tensor of logprobs' shape [{b}, {t}], got {got}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but logprobs on {device}")
    if old_logprobs is not None:
        _float_tensor(old_logprobs, "old_logprobs", (b, t), device)
    if (
        isinstance(beta, (bool, torch.Tensor))
        or not isinstance(beta, numbers.Real)
        or not math.isfinite(beta)
    ):
        raise ValueError(f"beta must be a finite float (the KL coefficient, 0 for none), got {beta!r}")
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError(
                f"beta={beta} needs ref_logprobs [B, T] (the reference model's log-probs); or pass beta=0"
            )
        _float_tensor(ref_logprobs, "ref_logprobs", (b, t), device)
    if max_completion_length is not None and (
        isinstance(max_completion_length, bool)
        or not isinstance(max_completion_length, int)
        or max_completion_length < 1
    ):
        raise ValueError(
            f"max_completion_length must be a positive int or None, got {max_completion_length!r}"
        )
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.is_complex():
            raise ValueError(
                f"num_items_in_batch must be a number or a 1-element tensor, got {num_items_in_batch!r}"
            )
    elif num_items_in_batch is not None and (
        isinstance(num_items_in_batch, bool)
        or not isinstance(num_items_in_batch, numbers.Real)
        or not math.isfinite(num_items_in_batch)
    ):
        raise ValueError(
            f"num_items_in_batch must be a positive number, a tensor or None, got {num_items_in_batch!r}"
        )


# ----------------------------------------------------------------------------------------------------------
# the loss


def policy_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch=None,
    kl_clamp: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO surrogate (+ k3 KL) over per-token log-probs -> (loss 0-dim float32, metrics).

    Shapes: logprobs, old_logprobs, ref_logprobs, mask [B, T]; advantages [B] (or [B, T]). Per token,
    exactly TRL 1.16's GRPOTrainer._compute_loss (token-level importance sampling):

        r   = exp(logprobs - old_logprobs)          # old_logprobs=None: logprobs.detach(), so r == 1
        ptl = -min(r * A, clamp(r, 1 - epsilon_low, 1 + epsilon_high) * A)
        ptl = ptl + beta * (exp(ref - logprobs) - (ref - logprobs) - 1)      # only when beta != 0
        loss = LOSS_TYPES[loss_type](ptl, mask, max_completion_length=..., num_items_in_batch=...)

    TRL 1.16 does not clamp `ref - logprobs` in the KL, and neither does this by default. `kl_clamp=c` clamps
    it to [-c, c] first (`x = clamp(ref - logprobs, -c, c)`, zero gradient outside), as the GRPO-CARE
    authors' trainer does with c = 10: one token far from the reference then costs at most `exp(c) - c - 1`.
    Normalizers:
    "grpo": `((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()`; "bnpo": `(ptl * mask).sum() /
    mask.sum().clamp(min=1)`; "dr_grpo": `(ptl * mask).sum() / (B * max_completion_length)`; "dapo":
    `(ptl * mask).sum() / num_items_in_batch` (or the mask sum when None; TRL passes its window's token
    count, `num_items_in_batch / num_processes * gradient_accumulation_steps / steps_per_generation`).
    No gradient-accumulation scaling: TRL further divides grpo / bnpo / dr_grpo by
    `current_gradient_accumulation_steps`; divide the result yourself when you accumulate.

    metrics (0-dim float32 tensors, detached, no host sync), TRL's masked means over the batch:
    "clip_ratio" (TRL's "clip_ratio/region_mean": tokens with `r < 1 - epsilon_low` and `A < 0`, or
    `r > 1 + epsilon_high` and `A > 0`), "clip_ratio/low_mean", "clip_ratio/high_mean", and "kl" (mean k3)
    when beta != 0.

    Differentiable w.r.t. logprobs (old_logprobs and ref_logprobs are constants). mask may be bool, int or
    float (nonzero = completion token; float values weight tokens, as in TRL). Positions outside the mask
    never reach the loss, the metrics or the gradient, even if they hold inf or NaN, so a fully masked
    sequence contributes 0 (and zero gradient), never NaN. epsilon_high None means epsilon_low.
    """
    _check_args(
        logprobs,
        advantages,
        mask,
        old_logprobs,
        ref_logprobs,
        beta,
        max_completion_length,
        num_items_in_batch,
    )
    kl_clamp = check_kl_clamp(kl_clamp)
    epsilon_low = _epsilon(epsilon_low, "epsilon_low")
    epsilon_high = epsilon_low if epsilon_high is None else _epsilon(epsilon_high, "epsilon_high")
    normalizer = get_loss_type(loss_type)

    keep = mask if mask.dtype == torch.bool else mask != 0
    weight = mask.to(torch.float32)
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)

    # Masked-out positions get a finite placeholder *before* any arithmetic, so neither the forward nor the
    # backward (where a 0 upstream gradient times an inf local one would be NaN) can see their values.
    logp = torch.where(keep, logprobs.float(), zero)
    old = logp.detach() if old_logprobs is None else torch.where(keep, old_logprobs.detach().float(), zero)
    adv = advantages.detach().float()
    adv = torch.where(keep, adv if adv.dim() == 2 else adv[:, None], zero)

    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    per_token_kl = None
    if beta != 0.0:
        ref = torch.where(keep, ref_logprobs.detach().float(), zero)
        diff = ref - logp if kl_clamp is None else torch.clamp(ref - logp, -kl_clamp, kl_clamp)
        per_token_kl = torch.exp(diff) - diff - 1
        per_token_loss = per_token_loss + beta * per_token_kl

    loss = normalizer(
        per_token_loss,
        weight,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )

    with torch.no_grad():
        count = weight.sum().clamp(min=1.0)
        is_low = (coef_1 < 1 - epsilon_low) & (adv < 0)
        is_high = (coef_1 > 1 + epsilon_high) & (adv > 0)
        metrics = {
            "clip_ratio": ((is_low | is_high).float() * weight).sum() / count,
            "clip_ratio/low_mean": (is_low.float() * weight).sum() / count,
            "clip_ratio/high_mean": (is_high.float() * weight).sum() / count,
        }
        if per_token_kl is not None:
            metrics["kl"] = (per_token_kl * weight).sum() / count
    return loss, metrics
