"""verl drop-ins backed by `care_kernels.linear_logprobs` (verl itself is not needed to use them).

    from care_kernels.integrations.verl import linear_cross_entropy, FusedLinearForPPO
    log_probs, entropy = linear_cross_entropy(hidden, lm_head.weight, rolled_labels, temperature, "none")

- `linear_cross_entropy` has the contract of `verl.utils.kernel.linear_cross_entropy` (verl's Triton fused
  kernel, `fused_kernel_options.impl_backend=triton`), checked against verl 0.9.1's source and test reference.
- `FusedLinearForPPO` has the contract of `verl.utils.experimental.torch_functional.FusedLinearForPPO` (verl's
  torch backend), except that the temperature divide happens in float32 instead of in the input dtype.

Unlike verl's kernels these run on CPU too, need no `H % 128 == 0`, and never build the `[N, V]` logits.
"""

from __future__ import annotations

import torch

from care_kernels.logprobs import linear_logprobs

__all__ = ["linear_cross_entropy", "FusedLinearForPPO", "REDUCTIONS", "IGNORE_INDEX"]

Tensor = torch.Tensor

REDUCTIONS = ("none", "sum", "mean")
IGNORE_INDEX = -100


def _check_process_group(dist_process_group) -> None:
    if dist_process_group is None:
        return
    import torch.distributed as dist

    world_size = dist.get_world_size(dist_process_group)
    if world_size != 1:
        raise NotImplementedError(
            f"dist_process_group with {world_size} ranks (a vocabulary-parallel LM head) is not supported by "
            "care_kernels' linear_cross_entropy; pass dist_process_group=None with the full [V, H] weight "
            "(gather the vocabulary shards first), or keep verl's kernel for tensor-parallel heads"
        )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
    *,
    impl: str = "auto",
    check_finite: bool = True,
) -> tuple[Tensor, Tensor]:
    """verl's fused LM-head log-probs and entropy: `(logprobs, entropy)`, never building `[N, V]` logits.

    Args:
        hidden: [N, H] or [..., H] (flattened to [N, H], as verl does), float32 / bfloat16 / float16.
        weight: [V, H], hidden's dtype (the LM head weight; verl passes no bias).
        labels: [N] or [...] int64, the next-token targets aligned with `hidden` (verl passes the rolled
            input ids), in [0, V); -100 is also accepted and gives log-prob 0 (verl has no ignore index).
        temperature: > 0, logits are divided by it before the softmax.
        reduction: "none" -> logprobs [N]; "sum" -> 0-dim sum over the N tokens; "mean" -> 0-dim sum / N
            (all N tokens, ignored ones included, as verl divides by `num_tokens`).
        dist_process_group: None (or a one-rank group); a vocabulary-parallel group raises
            NotImplementedError.
        impl, check_finite: as in `care_kernels.linear_logprobs`.

    Returns:
        logprobs float32 ([N], or 0-dim when reduced) and entropy float32 [N] (never reduced, also at -100
        labels), both differentiable w.r.t. hidden and weight. Same as verl's test reference:
        `z = (hidden @ weight.T).float() / temperature`;
        `logprobs = -F.cross_entropy(z, labels, reduction=reduction)` (with verl's "mean" = sum / N);
        `entropy = z.logsumexp(-1) - (z.softmax(-1) * z).sum(-1)`.
        The log-probs are log-probabilities (<= 0), not negative log-likelihoods: verl's kernel negates the
        cross-entropy in its epilogue, and so does this function.
    """
    _check_process_group(dist_process_group)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(hidden, Tensor) or hidden.dim() < 2:
        shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a tensor [N, H] or [..., H], got {shape}")
    if not isinstance(labels, Tensor) or labels.numel() * hidden.shape[-1] != hidden.numel():
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"labels must be a tensor with one target per row of hidden {tuple(hidden.shape)}, got {shape}"
        )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    ignored = flat_labels == IGNORE_INDEX
    # Score ignored rows against token 0 so their entropy is still computed, then zero their log-prob.
    logprobs, entropy = linear_logprobs(
        flat_hidden, weight, flat_labels.masked_fill(ignored, 0), temperature=temperature,
        ignore_index=IGNORE_INDEX, return_entropy=True, impl=impl, check_finite=check_finite,
    )
    logprobs = logprobs.masked_fill(ignored, 0.0)
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy


class FusedLinearForPPO(torch.nn.Module):
    """verl's `FusedLinearForPPO` (torch backend) computed by care_kernels: `(log_probs, entropy)`.

    `forward(hidden_states [B, T, H] or [T, H], vocab_weights [V, H], input_ids [B, T] or [T],
    temperature=1.0)` returns `log_probs` float32 and `entropy` in hidden_states' dtype, both shaped like
    `input_ids`, as verl's does. `input_ids` are the targets aligned with `hidden_states` (verl passes the
    rolled input ids).
    `chunk_size` and `impl_backend` are accepted for config compatibility; care_kernels streams the
    vocabulary itself, so neither changes the result. Equivalent to
    `z = (hidden_states @ vocab_weights.T).float() / temperature;
    (z.log_softmax(-1).gather(-1, input_ids[..., None])[..., 0], entropy(z).to(hidden_states.dtype))`.
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch", *, impl: str = "auto",
                 check_finite: bool = True):
        super().__init__()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"impl_backend must be 'torch' or 'liger' (as in verl), got {impl_backend!r}")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend
        self.impl = impl
        self.check_finite = check_finite

    def forward(
        self,
        hidden_states: Tensor,
        vocab_weights: Tensor,
        input_ids: Tensor,
        temperature: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        if hidden_states.dim() not in (2, 3):
            raise ValueError(
                f"hidden_states must be [T, H] or [B, T, H], got shape {tuple(hidden_states.shape)}")
        if tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
            raise ValueError(
                f"input_ids must have shape {tuple(hidden_states.shape[:-1])} (hidden_states without H), "
                f"got {tuple(input_ids.shape)}"
            )
        log_probs, entropy = linear_logprobs(
            hidden_states, vocab_weights, input_ids.to(torch.int64), temperature=temperature,
            return_entropy=True, impl=self.impl, check_finite=self.check_finite,
        )
        return log_probs, entropy.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, impl={self.impl!r}"

