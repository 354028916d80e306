"""Torch references of the GRPO / GRPO-CARE group statistics (grpo_care.md sections 5.3 and 6).

Inputs are laid out group by group: element `b * G + g` is member `g` of group `b`. These functions
assume validated inputs (see `care_kernels.group` for the public, checked entry points) and are the
ground truth that the C++ and CUDA kernels in csrc/*/group_ops.* are tested against.

Means are computed around a pivot (the group's largest valid value): `mean = pivot + mean(x - pivot)`.
This is the same number mathematically, but a group whose values are all equal gets exactly that value
as its mean (a plain `sum / n` in float32 can land one ulp away, e.g. three 0.7s), so "all equal" gives
exactly-zero deviations, `acc >= mean(acc)` holds for every member of a tied group, and likelihoods
tied at the cap all clear their baseline. Sums (and the std's sqrt) are computed in float64, the rest of
the arithmetic in the working dtype, exactly as the native kernels do, so the two agree bit for bit (up to
the order of float64 additions).
"""

from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pivoted_stats(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (count, mean, deviations) of the valid entries of x [R, G]; invalid entries count as absent.

    count [R, 1] (float64), mean [R, 1] (0 for a row with no valid entry), deviations [R, G]
    (x - mean at valid entries, exactly 0 elsewhere). As the native group_math.h: float32 rows take the exact
    float64 sum (the correctly rounded mean), float64 rows the mean of their differences to the max.
    """
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    count = valid.sum(-1, keepdim=True).to(torch.float64)
    if x.dtype == torch.float32:  # exact double sum: torch's float32 mean(), correctly rounded (ties with it hold)
        mean = (_sum64(torch.where(valid, x, zero)) / count.clamp(min=1)).to(x.dtype)
        return count, mean, torch.where(valid, x - mean, zero)
    pivot = torch.where(valid, x, torch.full_like(x, -torch.inf)).amax(-1, keepdim=True)
    pivot = torch.where(count > 0, pivot, zero)
    shifted = torch.where(valid, x - pivot, zero)
    mean = pivot + (_sum64(shifted) / count.clamp(min=1)).to(x.dtype)
    deviations = torch.where(valid, x - mean, zero)
    return count, mean, deviations


def _sum64(x: torch.Tensor) -> torch.Tensor:
    """Row sums accumulated in float64 (as the native kernels do), shape [R, 1]."""
    return x.to(torch.float64).sum(-1, keepdim=True)


def _bessel_std(count: torch.Tensor, deviations: torch.Tensor) -> torch.Tensor:
    """sqrt(sum(dev^2) / (n - 1)) per row, 0 where n < 2 (the sum, division and sqrt in float64)."""
    var = _sum64(deviations.square()) / (count - 1).clamp(min=1)
    return torch.where(count > 1, var, torch.zeros_like(var)).sqrt().to(deviations.dtype)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """rewards [B*G] -> float32 [B*G]: (r - mean_group) / (std + eps), NaN/inf rewards treated as missing.

    Equivalent torch for finite rewards (scale="group"):

        r = rewards.view(-1, G)
        ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).nan_to_num(0.0).view(-1)

    with `r.std()` over the whole batch for scale="batch" and no division for scale="none".
    A non-finite reward is excluded from its group's (and the batch's) mean and std and gets advantage 0;
    a group with fewer than two finite rewards, or whose finite rewards are all equal, gets 0.
    """
    x = rewards.to(compute_dtype(rewards)).reshape(-1, group_size)
    valid = torch.isfinite(x)
    count, _, dev = _pivoted_stats(x, valid)
    if scale == "none":
        return dev.reshape(-1).float()
    if scale == "group":
        std = _bessel_std(count, dev)
    else:
        flat = x.reshape(1, -1)
        flat_count, _, flat_dev = _pivoted_stats(flat, valid.reshape(1, -1))
        std = _bessel_std(flat_count, flat_dev)
    denom = std + eps
    # denom == 0 only when eps == 0 and the std is 0, where every deviation is 0 too.
    adv = dev / torch.where(denom > 0, denom, torch.ones_like(denom))
    return adv.reshape(-1).float()


def answer_likelihood(ref_logprobs: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """ref_logprobs [B, T], answer_mask [B, T] bool -> float32 [B].

        torch.exp((ref_logprobs * mask).sum(-1) / (mask.sum(-1) + 1e-6))

    Positions outside the mask are never read (a -inf or NaN there does not leak in). Computed in float64,
    rounded to float32 once at the end.
    """
    lp = ref_logprobs.to(compute_dtype(ref_logprobs))
    mask = answer_mask.bool()
    total = torch.where(mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device)).to(torch.float64).sum(-1)
    count = mask.sum(-1).to(torch.float64)
    return torch.exp(total / (count + 1e-6)).float()


def care_bonus(
    accuracy: torch.Tensor,
    likelihood: torch.Tensor,
    group_size: int,
    coef: float = 0.5,
    likelihood_cap: float = 0.95,
    accuracy_floor: float = 0.1,
    margin: float = 0.0,
) -> torch.Tensor:
    """accuracy [B*G], likelihood [B*G] -> float32 [B*G]: the GRPO-CARE consistency bonus (grpo_care.md 5.3).

    Per group, with p~ = min(likelihood, likelihood_cap):

        HA       = (acc > accuracy_floor) & (acc >= acc.mean())
        baseline = p~[HA].mean()
        bonus    = where(HA & (p~ >= baseline - margin), coef * acc, 0)     # 0 for all when HA is empty

    A member whose accuracy is NaN/inf is absent from its group. One whose likelihood is NaN counts in the mean
    accuracy (its likelihood is never read unless it is high-accuracy) but is not in the high-accuracy set or
    the baseline, and gets bonus 0.
    """
    dtype = torch.promote_types(compute_dtype(accuracy), compute_dtype(likelihood))
    acc = accuracy.to(dtype).reshape(-1, group_size)
    lik = likelihood.to(dtype).reshape(-1, group_size)
    scored = torch.isfinite(acc)
    _, mean_acc, _ = _pivoted_stats(acc, scored)
    capped = lik.clamp(max=likelihood_cap)
    high = scored & ~torch.isnan(lik) & (acc > accuracy_floor) & (acc >= mean_acc)
    n_high, baseline, _ = _pivoted_stats(capped, high)
    consistent = high & (capped >= baseline - margin) & (n_high > 0)
    bonus = torch.where(consistent, coef * acc, torch.zeros((), dtype=dtype, device=acc.device))
    return bonus.reshape(-1).float()
