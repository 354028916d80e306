"""care_kernels: fused per-token log-prob kernels, GRPO / GRPO-CARE group ops and losses.

    import care_kernels as ck
    logp = ck.linear_logprobs(hidden, lm_head.weight, targets)          # never builds [N, V] logits
    logp, ref_logp = ck.dual_linear_logprobs(h, w, ref_h, ref_w, targets)
    adv = ck.group_advantages(rewards, group_size=8)
"""

from care_kernels import cpu_backend as _cpu_backend  # noqa: F401 - fake impls of the native CPU ops
from care_kernels.group import answer_likelihood, care_bonus, group_advantages
from care_kernels.logprobs import dual_linear_logprobs, linear_logprobs
from care_kernels.losses import FusedLinearGRPOLoss, policy_loss, register_loss_type
from care_kernels.version import __version__

__all__ = [
    "__version__",
    "linear_logprobs",
    "dual_linear_logprobs",
    "group_advantages",
    "answer_likelihood",
    "care_bonus",
    "policy_loss",
    "register_loss_type",
    "FusedLinearGRPOLoss",
]
