"""OpenRLHF (0.11) drop-ins backed by care_kernels: the actor's log-probs and entropy without `[B, T, V]` logits.

    from care_kernels.integrations.openrlhf import patch_actor, patch_actor_class, log_probs_from_hidden

    patch_actor(actor)          # this openrlhf.models.Actor (or a DeepSpeed engine's .module) streams the vocabulary
    patch_actor_class()         # every openrlhf.models.actor.Actor in this process; unpatch_actor_class() undoes it
    log_probs = log_probs_from_hidden(hidden, lm_head.weight, labels, temperature)

OpenRLHF's `Actor.forward(sequences, action_mask, attention_mask, return_output, ..., return_entropy, **mm_inputs)`
runs the whole Hugging Face model, casts the `[B, T, V]` logits to float32, divides them by the actor's
temperature in place, then computes the entropy (`compute_entropy`) and the log-probs of the next tokens
(`log_probs_from_logits`). With V ~ 152k that fp32 copy is the largest tensor of the PPO step. The patched
forward keeps the contract (same arguments, same `action_log_probs` [B, A] = log-probs of the last A tokens times
`action_mask`, same `output.entropy` [B, T - 1]) and computes both outputs with `care_kernels.linear_logprobs` from
the backbone's last hidden states and the LM head's weight. It builds the model inputs exactly as OpenRLHF does:
position ids from the attention mask for text models, the model's own (M-RoPE) positions and the image / video
token types for vision-language models. Without `return_entropy` only the action positions are scored.

A LoRA actor (OpenRLHF wraps the model with peft's `get_peft_model`) is scored through `get_base_model()`, the
adapters in its layers included. Not covered (NotImplementedError naming it, with the way back):
`packing_samples` (flash-attention varlen and ring attention), calls that want the logits themselves (no
`action_mask` and no `return_logprobs`), MoE models' load-balancing loss (`output_router_logits`), an adapter on
the LM head itself, and DeepSpeed ZeRO-3, which partitions the LM head outside its module's forward. Matmuls run
in the model's dtype with float32 accumulation, where OpenRLHF rounds the logits to the model's dtype before its
float32 cast.

Nothing here imports OpenRLHF (which needs Ray, DeepSpeed, flash-attn ...) except `patch_actor_class()` without
an argument.
"""

from __future__ import annotations

import types
from typing import Optional

import torch

from care_kernels.backends import IMPLS
from care_kernels.integrations._hf import backbone_and_head
from care_kernels.logprobs import linear_logprobs

__all__ = ["log_probs_from_hidden", "care_actor_forward", "patch_actor", "unpatch_actor", "is_patched",
           "patch_actor_class", "unpatch_actor_class"]

Tensor = torch.Tensor

_ORIGINAL_FORWARD = "_care_kernels_original_forward"


def log_probs_from_hidden(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                          bias: Optional[Tensor] = None, *, return_entropy: bool = False, impl: str = "auto"):
    """OpenRLHF's `log_probs_from_logits(hidden @ weight.T + bias, labels, temperature)` without the logits.

    hidden [..., H], weight [V, H] (the LM head's), labels [...] int64 in [0, V), temperature > 0. Returns float32
    log-probs [...], and with return_entropy also OpenRLHF's `compute_entropy` of the same tempered logits [...]:
    `z = (hidden @ weight.T + bias).float() / temperature; (z.log_softmax(-1).gather(-1, labels[..., None])[..., 0],
    z.logsumexp(-1) - (z.softmax(-1) * z).sum(-1))`. Differentiable w.r.t. hidden, weight and bias.
    """
    return linear_logprobs(hidden, weight, labels, bias, temperature=temperature, return_entropy=return_entropy,
                           impl=impl)


def _refuse(what: str) -> None:
    raise NotImplementedError(
        f"care_kernels' OpenRLHF actor forward does not cover {what}; use OpenRLHF's own forward for it "
        "(care_kernels.integrations.openrlhf.unpatch_actor(actor) or unpatch_actor_class())"
    )


def _model_inputs(actor, sequences: Tensor, attention_mask: Optional[Tensor], mm_inputs: dict) -> dict:
    """The keyword inputs OpenRLHF's Actor.forward hands the model (non-packed samples)."""
    inputs = dict(mm_inputs)
    if getattr(actor, "is_vlm", False):
        position_ids = None  # the model computes its own (Qwen's 3-D M-RoPE positions)
        if inputs:
            config = getattr(actor, "_vlm_config", None) or actor.model.config
            kinds = (sequences == config.image_token_id).to(torch.int32)
            if getattr(config, "video_token_id", None) is not None:
                kinds[sequences == config.video_token_id] = 2
            inputs["mm_token_type_ids" if "image_grid_thw" in inputs else "token_type_ids"] = kinds
    else:
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
    return dict(inputs, attention_mask=attention_mask, position_ids=position_ids)


def care_actor_forward(self, sequences: Tensor, action_mask: Optional[Tensor] = None,
                       attention_mask: Optional[Tensor] = None, return_output: bool = False,
                       allgather_logits: bool = False, return_logprobs: bool = False, ring_attn_group=None,
                       packed_seq_lens=None, return_entropy: bool = False, **mm_inputs):
    """OpenRLHF 0.11's `Actor.forward`, computed by care_kernels (bound to an Actor by `patch_actor`).

    sequences [B, T] (prompt left-padded, response right-padded), action_mask [B, A] (the response tokens),
    attention_mask [B, T]. Returns `action_log_probs` [B, A] float32 = log p(sequences[:, t + 1]) at the last A
    positions t of the T - 1 scored ones, times action_mask; with return_logprobs and no action_mask, all
    [B, T - 1]; with return_output also `output` (the backbone's output; `output.entropy` [B, T - 1] float32 when
    return_entropy). Temperature: the actor's `temperature`, as OpenRLHF applies it to both outputs.
    """
    if getattr(self, "packing_samples", False):
        _refuse("packing_samples=True (flash-attention varlen / ring attention)")
    if action_mask is None and not return_logprobs:
        _refuse("calls that return the logits (no action_mask and no return_logprobs)")
    if return_entropy and not return_output:
        raise ValueError("return_entropy needs return_output=True (the entropy comes back as output.entropy)")
    model = self.model
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "output_router_logits", False):
        _refuse("MoE models' load-balancing loss (output_router_logits)")
    backbone, head = backbone_and_head(model)
    if hasattr(head.weight, "ds_id"):
        _refuse("a DeepSpeed ZeRO-3 partitioned LM head")

    output = backbone(sequences, **_model_inputs(self, sequences, attention_mask, mm_inputs))
    hidden = output.last_hidden_state[:, :-1]
    targets = sequences[:, 1:]
    if action_mask is not None and not return_entropy:  # score only the actions
        hidden, targets = hidden[:, -action_mask.shape[1]:], targets[:, -action_mask.shape[1]:]
    hidden = hidden.to(head.weight.device)
    result = linear_logprobs(hidden, head.weight, targets.to(head.weight.device), head.bias,
                             temperature=getattr(self, "temperature", 1.0), return_entropy=return_entropy,
                             impl=getattr(self, "_care_kernels_impl", "auto"), check_finite=False)
    log_probs, entropy = result if return_entropy else (result, None)
    if entropy is not None:
        output.entropy = entropy
    if action_mask is None:
        return (log_probs, output) if return_output else log_probs
    action_log_probs = log_probs[:, -action_mask.shape[1]:] * action_mask.float()
    return (action_log_probs, output) if return_output else action_log_probs


def patch_actor(actor: torch.nn.Module, impl: str = "auto") -> torch.nn.Module:
    """Make this OpenRLHF Actor's forward `care_actor_forward` (an instance attribute: other actors, and
    `unpatch_actor`, are unaffected). Returns the actor."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not hasattr(actor, "model"):
        raise TypeError(f"patch_actor takes an openrlhf.models.Actor (with .model), got {type(actor).__name__}")
    actor._care_kernels_impl = impl
    actor.forward = types.MethodType(care_actor_forward, actor)
    return actor


def unpatch_actor(actor: torch.nn.Module) -> None:
    actor.__dict__.pop("forward", None)


def is_patched(actor: torch.nn.Module) -> bool:
    forward = getattr(actor, "forward", None)
    return getattr(forward, "__func__", forward) is care_actor_forward


def patch_actor_class(actor_class: Optional[type] = None, impl: str = "auto") -> type:
    """Replace `Actor.forward` on the class (default `openrlhf.models.actor.Actor`), for every actor this process
    builds; `unpatch_actor_class` restores OpenRLHF's. Returns the class."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if actor_class is None:
        try:
            from openrlhf.models.actor import Actor as actor_class
        except ImportError as err:
            raise ImportError(f"patch_actor_class() needs OpenRLHF ({err}); or pass the Actor class") from err
    if _ORIGINAL_FORWARD not in actor_class.__dict__:
        setattr(actor_class, _ORIGINAL_FORWARD, actor_class.forward)
    actor_class._care_kernels_impl = impl
    actor_class.forward = care_actor_forward
    return actor_class


def unpatch_actor_class(actor_class: Optional[type] = None) -> None:
    if actor_class is None:
        from openrlhf.models.actor import Actor as actor_class
    original = actor_class.__dict__.get(_ORIGINAL_FORWARD)
    if original is not None:
        actor_class.forward = original
        delattr(actor_class, _ORIGINAL_FORWARD)
