"""The slowly evolving reference of GRPO-CARE: an EMA of the policy kept as an fp32 shadow.

    ref = EMAReference(policy, dtype=torch.bfloat16)
    ...after optimizer.step(), every `ref_ema_update_every` steps:
    ref.update(policy, decay=0.995)          # shadow <- decay * shadow + (1 - decay) * theta, in fp32
    hidden = ref.module.model(**inputs)      # the reference forward runs the shadow's weights

Departure from the authors' code (grpo_care.md 7): they lerp the bf16 parameters of the reference in place,
and a bf16 element only moves when 0.005 * |theta - phi| reaches half an ulp of phi (~40 % relative), which at
lr 1e-6 almost never happens: their reference stays nearly frozen. The paper's EMA is kept here: the shadow is
fp32 and `module` (a copy of the policy in the compute dtype) is refreshed from it after every update. When
the compute dtype is fp32 (CPU runs) the module's parameters are the shadow itself, with no second copy.

A frozen reference (`EMAReference(policy, frozen=True)`: `ref_ema_decay` 1.0, or plain GRPO's KL reference with
the decay unset) keeps no shadow of its own: nothing would ever read it (about 30 GB of fp32 at 7B). Its
`shadow` is its module's parameters, so checkpoints still hold the reference's weights.
"""

from __future__ import annotations

import copy

import torch

from grpo_care.modeling import set_checkpointing

CARE_EMA_DECAY = 0.995  # the paper's alpha (grpo_care.md 7)


def ema_decay(config) -> float | None:
    """The EMA decay a run applies: `ref_ema_decay` when set, whatever `use_care` (plain GRPO with a decay is
    Table 3's KL-EMA, as the authors' trainer updates whenever the decay is set); unset, the paper's 0.995 for
    GRPO-CARE and None (a frozen KL reference) for plain GRPO."""
    if config.ref_ema_decay is not None:
        return config.ref_ema_decay
    return CARE_EMA_DECAY if config.use_care else None


def ema_moves(decay: float | None) -> bool:
    """Whether a reference with this decay ever changes: None and 1.0 keep it frozen."""
    return decay is not None and decay < 1.0


def needs_reference(config) -> bool:
    """A reference exists for CARE's likelihood and for the KL term (beta > 0); nothing else reads one."""
    return bool(config.use_care or config.beta > 0)


def unused_decay(config) -> str | None:
    """What to tell a user whose ref_ema_decay has nothing to act on (use_care false and beta 0), or None."""
    if config.ref_ema_decay is None or needs_reference(config):
        return None
    return (
        f"ref_ema_decay={config.ref_ema_decay} is ignored: with use_care false and beta 0 no reference is built "
        "(nothing would read it). For Table 3's KL-EMA set beta > 0; for GRPO-CARE set use_care true; otherwise "
        "leave ref_ema_decay unset (null)"
    )


class EMAReference:
    """A frozen copy of the policy whose weights follow an fp32 exponential moving average of the policy's."""

    def __init__(
        self,
        policy: torch.nn.Module,
        dtype: torch.dtype = torch.float32,
        build_shadow: bool = True,
        frozen: bool = False,
    ):
        """build_shadow=False leaves a non-aliased shadow to be built later from sharded parameters
        (distributed.shard_reference), so an FSDP rank never holds a full fp32 copy of the model.
        frozen=True: the reference never moves (update() refuses) and keeps no fp32 shadow."""
        self.module = copy.deepcopy(policy).eval().requires_grad_(False)
        for param in self.module.parameters():  # parameters only: `.to(dtype)` would also round the buffers,
            param.data = param.data.to(dtype)   # e.g. RoPE's fp32 inv_freq (~1 rad off by position 1000 in bf16)
        if getattr(self.module, "supports_gradient_checkpointing", False):
            set_checkpointing(self.module, False)  # the reference never runs backward
        self._params = [p for _, p in self.module.named_parameters()]
        self.frozen = frozen
        self.aliased = frozen or dtype == torch.float32
        if self.aliased:
            self.shadow = [p.data for p in self._params]
        else:
            self.shadow = [p.detach().float().clone() for _, p in policy.named_parameters()] if build_shadow else []
        self.num_updates = 0

    @torch.no_grad()
    def update(self, policy: torch.nn.Module, decay: float) -> None:
        """shadow <- decay * shadow + (1 - decay) * policy (fp32), then refresh the module's weights."""
        if self.frozen:
            raise RuntimeError("this reference is frozen (its decay is 1.0 or unset): it keeps no EMA to update")
        theta = [p.detach() for _, p in policy.named_parameters()]
        if theta and not self.shadow:
            raise RuntimeError("the EMA shadow was never built (build_shadow=False): call "
                               "grpo_care.distributed.shard_reference(reference, policy, config, env) first")
        if len(theta) != len(self.shadow):
            raise ValueError("the policy's parameters no longer match the EMA reference's")
        theta = [t if t.dtype == torch.float32 else t.float() for t in theta]
        torch._foreach_lerp_(self.shadow, theta, 1.0 - decay)
        self.refresh_module()
        self.num_updates += 1

    @torch.no_grad()
    def refresh_module(self) -> None:
        """The module's weights <- the shadow (in the compute dtype; nothing to do when they alias it)."""
        if not self.aliased:
            for param, shadow in zip(self._params, self.shadow):
                param.copy_(shadow)

    def state_dict(self) -> dict:
        return {"shadow": [s.clone() for s in self.shadow], "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(
                f"EMA state has {len(state['shadow'])} tensors, the reference {len(self.shadow)}"
            )
        for dst, src in zip(self.shadow, state["shadow"]):
            dst.copy_(src)
        self.refresh_module()
        self.num_updates = int(state.get("num_updates", 0))
