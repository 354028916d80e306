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
"""

from __future__ import annotations

import copy

import torch

from grpo_care.modeling import set_checkpointing


class EMAReference:
    """A frozen copy of the policy whose weights follow an fp32 exponential moving average of the policy's."""

    def __init__(self, policy: torch.nn.Module, dtype: torch.dtype = torch.float32, build_shadow: bool = True):
        """build_shadow=False leaves a non-aliased shadow to be built later from sharded parameters
        (distributed.shard_reference), so an FSDP rank never holds a full fp32 copy of the model."""
        self.module = copy.deepcopy(policy).eval().requires_grad_(False)
        for param in self.module.parameters():  # parameters only: `.to(dtype)` would also round the buffers,
            param.data = param.data.to(dtype)   # e.g. RoPE's fp32 inv_freq (~1 rad off by position 1000 in bf16)
        if getattr(self.module, "supports_gradient_checkpointing", False):
            set_checkpointing(self.module, False)  # the reference never runs backward
        self._params = [p for _, p in self.module.named_parameters()]
        self.aliased = dtype == torch.float32
        if self.aliased:
            self.shadow = [p.data for p in self._params]
        else:
            self.shadow = [p.detach().float().clone() for _, p in policy.named_parameters()] if build_shadow else []
        self.num_updates = 0

    @torch.no_grad()
    def update(self, policy: torch.nn.Module, decay: float) -> None:
        """shadow <- decay * shadow + (1 - decay) * policy (fp32), then refresh the module's weights."""
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
