"""The CARE reward: reasoning-to-answer likelihood under the EMA reference and the consistency bonus.

    care = consistency_bonus(accuracy, ref_logprobs, completion_ids, completion_mask, tokenizer, G, config)
    rewards = total_rewards(rewards_per_func, weights, care.bonus)

grpo_care.md 5: the answer span of each completion (care_kernels.answer_spans, `answer_span`, the rule the TRL
adapter uses too) selects its reference log-probs; `ck.answer_likelihood` gives p = exp(mean log-prob over the
span) (1.0 for an empty span), and `ck.care_bonus` caps p at `confidence_upper_bound`, picks the high-accuracy
rollouts of each group (accuracy > accuracy_floor and >= the group mean), and pays `bonus_coefficient *
accuracy` to those whose capped p reaches the high-accuracy mean minus `consistency_margin`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import care_kernels as ck
from care_kernels.answer_spans import answer_token_mask


@dataclass
class CareResult:
    bonus: torch.Tensor  # [N] float32
    likelihood: torch.Tensor  # [N] float32, exp(mean reference log-prob of the answer span)
    answer_mask: torch.Tensor  # [N, L] bool


def consistency_bonus(
    accuracy: torch.Tensor,
    ref_logprobs: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    tokenizer,
    group_size: int,
    config,
) -> CareResult:
    """accuracy [N] (the accuracy reward only), ref_logprobs [N, L] (teacher-forced, temperature 1).

    The accuracy goes to `ck.care_bonus` as it is: a reward function's None (NaN here) or an infinite value
    leaves that rollout out of its group's mean accuracy and gives it no bonus. `config.answer_span` picks the
    span rule (care_kernels.answer_spans: `content`, or the authors' `official`).
    """
    mode = getattr(config, "answer_span", "content")
    answer_mask = answer_token_mask(completion_ids, completion_mask, tokenizer, mode=mode)
    likelihood = ck.answer_likelihood(ref_logprobs, answer_mask)
    bonus = ck.care_bonus(
        accuracy.float().to(likelihood.device),
        likelihood,
        group_size,
        coef=config.bonus_coefficient,
        likelihood_cap=config.confidence_upper_bound,
        accuracy_floor=config.accuracy_floor,
        margin=config.consistency_margin,
    )
    return CareResult(bonus, likelihood, answer_mask)


def total_rewards(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, bonus: torch.Tensor | None
) -> torch.Tensor:
    """sum_f weight_f * reward_f (None rewards, stored as NaN, left out) + bonus: [N] float32."""
    total = (rewards_per_func * weights).nansum(dim=1)
    return total if bonus is None else total.to(bonus.device) + bonus
