"""GRPO policy losses: `policy_loss` over per-token log-probs, the loss-type registry, and the fused head.

loss, metrics = ck.policy_loss(logp, advantages, completion_mask, loss_type="grpo")
LOSS_TYPES            # read-only name -> normalizer of every registered loss type
register_loss_type    # add a variant by name
"""

from care_kernels.losses.fused_linear_grpo import FusedLinearGRPOLoss, TokenStats
from care_kernels.losses.policy_loss import policy_loss
from care_kernels.losses.registry import LOSS_TYPES, get_loss_type, register_loss_type

__all__ = ["policy_loss", "register_loss_type", "get_loss_type", "LOSS_TYPES", "FusedLinearGRPOLoss", "TokenStats"]
