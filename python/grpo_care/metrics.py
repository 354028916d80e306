"""Per-step metrics with TRL's names, and the completion records logged every N steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class MicroBatchResult:
    """What one micro-batch contributes to its step's metrics; tensors on CPU."""

    rewards_per_func: torch.Tensor  # [N, F], NaN where a function returned None
    bonus: torch.Tensor  # [N]
    total: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N]
    likelihood: torch.Tensor  # [N] (NaN when CARE is off)
    span_found: torch.Tensor  # [N] bool
    lengths: torch.Tensor  # [N]
    truncated: torch.Tensor  # [N] bool: no EOS within max_completion_length
    loss: float
    clip_ratio: float
    kl: float  # NaN without a reference
    entropy: float
    texts: list
    samples: list


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.float()
    return float((x * mask).sum() / mask.sum().clamp(min=1))


def k3_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, clamp: float | None = None
) -> float:
    """Token mean of the k3 estimator exp(x) - x - 1, x = ref - logp (TRL's `kl`), x clamped to [-clamp, clamp]
    when given (the loss's `kl_clamp`)."""
    x = ref_logprobs - logprobs
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return masked_mean(x.exp() - x - 1, mask)


def step_metrics(
    results: list[MicroBatchResult], group_size: int, reward_names: list[str], use_care: bool
) -> dict:
    cat = lambda name: torch.cat([getattr(r, name) for r in results])  # noqa: E731
    mean = lambda name: sum(getattr(r, name) for r in results) / len(results)  # noqa: E731
    rewards, total, bonus = cat("rewards_per_func"), cat("total"), cat("bonus")
    group_std = total.view(-1, group_size).std(dim=1)
    lengths = cat("lengths").float()
    metrics = {
        "loss": mean("loss"),
        "reward": float(total.mean()),
        "reward_std": float(group_std.mean()),
        "frac_reward_zero_std": float(torch.isclose(group_std, torch.zeros_like(group_std)).float().mean()),
    }
    for i, name in enumerate(reward_names):
        column = rewards[:, i]
        valid = column[~column.isnan()]
        metrics[f"rewards/{name}/mean"] = float(valid.mean()) if valid.numel() else math.nan
        metrics[f"rewards/{name}/std"] = float(valid.std()) if valid.numel() > 1 else 0.0
    if use_care:
        likelihood, found = cat("likelihood"), cat("span_found")
        metrics["rewards/bonus_rewards"] = float(bonus.mean())
        metrics["care/bonus_rate"] = float((bonus > 0).float().mean())
        metrics["care/ref_likelihood"] = float(likelihood[found].mean()) if found.any() else math.nan
        metrics["care/answer_span_rate"] = float(found.float().mean())
    metrics.update(
        {
            "clip_ratio": mean("clip_ratio"),
            "entropy": mean("entropy"),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(cat("truncated").float().mean()),
        }
    )
    kl = mean("kl")
    if not math.isnan(kl):
        metrics["kl"] = kl
    return metrics


def completion_records(
    results: list[MicroBatchResult], reward_names: list[str], use_care: bool
) -> list[dict]:
    """One record per completion: sample id, gold, text, total reward, advantage, each reward, bonus, p."""
    records = []
    for r in results:
        for i, text in enumerate(r.texts):
            record = {
                "sample_id": r.samples[i].sample_id,
                "solution": r.samples[i].solution,
                "completion": text,
                "reward": round(float(r.total[i]), 4),
                "advantage": round(float(r.advantages[i]), 4),
            }
            for j, name in enumerate(reward_names):
                value = float(r.rewards_per_func[i, j])
                record[name] = None if math.isnan(value) else value
            if use_care:
                record["bonus"] = float(r.bonus[i])
                likelihood = float(r.likelihood[i])
                record["ref_likelihood"] = None if math.isnan(likelihood) else round(likelihood, 4)
            records.append(record)
    return records
