"""What each benchmark case computes, its inputs and the FLOP count its TFLOP/s is measured against.

Every provider of a case does the same work on the same inputs; the effective TFLOP/s of all of them is
the case's FLOP count divided by the provider's median time, so higher is better and the bare matmuls
("torch.mm", the speed-of-light line) show how close a provider gets to the GEMMs the work needs.

FLOP model (N tokens, hidden H, vocabulary V): the logits GEMM is 2NHV; a backward that does not keep
the [N, V] logits recomputes them (2NHV) before dH (2NHV) and dW (2NHV), so it is counted as 6NHV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from shapes import HEADS, Spec, batch_layout, plan, torch_dtype

FLOP_FORMULA = {
    "forward": ("2NHV", 2),  # policy logits
    "fwd_bwd": ("8NHV", 8),  # forward 2NHV + backward with recompute 6NHV
    "entropy": ("8NHV", 8),  # as fwd_bwd; the entropy and its gradient ride on the same tiles
    "dual": ("4NHV", 4),  # policy + reference forward
    "grpo_head": ("10NHV", 10),  # policy fwd+bwd with recompute (8NHV) + reference forward (2NHV)
}

# How many [N x H x V] GEMMs the bare-matmul provider runs for each case: the speed-of-light line.
BARE_MATMULS = {"forward": 1, "fwd_bwd": 4, "entropy": 4, "dual": 2, "grpo_head": 5}
# The fused GRPO head (FusedLinearGRPOLoss) knows each token's loss gradient during its forward, so it
# skips the recompute: 4 GEMMs (8NHV) is its floor, measured as the "torch.mm x4" provider.
FUSED_HEAD_MATMULS = 4

BETA = 0.04  # k3 KL weight of the GRPO head case (so the reference pass is needed)
LOSS_TYPE = "grpo"


def flops(spec: Spec) -> float | None:
    if spec.case not in FLOP_FORMULA:
        return None
    head = HEADS[spec.head]
    return float(FLOP_FORMULA[spec.case][1]) * spec.n * head.hidden * head.vocab


def flop_formula(spec: Spec) -> str | None:
    return FLOP_FORMULA.get(spec.case, (None, None))[0]


@dataclass
class LogprobInputs:
    """hidden/ref_hidden [N, H], weight/ref_weight [V, H] in the case dtype; targets [N] int64;
    grad_logprobs/grad_entropy [N] float32 (upstream gradients); mask [B, T], advantages [B] float32."""

    hidden: torch.Tensor
    weight: torch.Tensor
    ref_hidden: torch.Tensor
    ref_weight: torch.Tensor
    targets: torch.Tensor
    grad_logprobs: torch.Tensor
    grad_entropy: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    batch: int
    seq: int

    @property
    def leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hidden, self.weight


@dataclass
class GroupInputs:
    """rewards/accuracy/likelihood [B*G] float32, ref_logprobs [B*G, T] float32, answer_mask [B*G, T] bool."""

    rewards: torch.Tensor
    accuracy: torch.Tensor
    likelihood: torch.Tensor
    ref_logprobs: torch.Tensor
    answer_mask: torch.Tensor
    group_size: int


def needs_grad(case: str) -> bool:
    return case in ("fwd_bwd", "entropy", "grpo_head")


def make_inputs(spec: Spec, device: torch.device):
    """Deterministic inputs for a spec (the same in the pytest process and in the memory subprocess)."""
    gen = torch.Generator(device="cpu").manual_seed(1234)
    if spec.head == "groups":
        p = plan()
        rows, g = spec.n, p.group_size
        accuracy = (torch.rand(rows, generator=gen) < 0.5).float()
        return GroupInputs(
            rewards=(accuracy + 0.1 * torch.rand(rows, generator=gen)).to(device),
            accuracy=accuracy.to(device),
            likelihood=torch.rand(rows, generator=gen).to(device),
            ref_logprobs=(-torch.rand(rows, p.answer_len, generator=gen)).to(device),
            answer_mask=(torch.rand(rows, p.answer_len, generator=gen) < 0.3).to(device),
            group_size=g,
        )
    head = HEADS[spec.head]
    n, h, v = spec.n, head.hidden, head.vocab
    dtype = torch_dtype(spec.dtype)
    b, t = batch_layout(n)

    def randn(*shape, scale=1.0):
        # generated on the target device in its dtype: no large CPU temporaries to inflate the baseline RSS
        g = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).mul_(scale)

    weight = randn(v, h, scale=h**-0.5 * 2.0)  # logits with a spread like a trained head's
    hidden = randn(n, h)
    grad = needs_grad(spec.case)
    return LogprobInputs(
        hidden=hidden.requires_grad_(grad),
        weight=weight.requires_grad_(grad),
        ref_hidden=(hidden.detach() + randn(n, h, scale=0.01)),
        ref_weight=(weight.detach() + randn(v, h, scale=h**-0.5 * 0.02)),
        targets=torch.randint(0, v, (n,), generator=gen).to(device),
        grad_logprobs=torch.randn(n, generator=gen).to(device),
        grad_entropy=torch.randn(n, generator=gen).to(device),
        mask=torch.ones(b, t, device=device),  # every token counts: all providers do the same work
        advantages=torch.randn(b, generator=gen).to(device),
        batch=b,
        seq=t,
    )


def trl_style_grpo_loss(logp, ref_logp, advantages, mask, beta=BETA, epsilon_low=0.2, epsilon_high=0.2):
    """TRL 1.16 GRPOTrainer._compute_loss for loss_type="grpo", on-policy (old = logp.detach()), k3 KL.

    logp, ref_logp, mask [B, T]; advantages [B] -> scalar loss.
    """
    coef_1 = torch.exp(logp - logp.detach())
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages[:, None]
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if beta != 0.0:
        per_token_kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
