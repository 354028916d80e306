"""What the adapters need to know about a Hugging Face causal LM or vision-language model."""

from __future__ import annotations

import torch

# What a PEFT adapter layer carries (peft's LoraLayer / BaseTunerLayer, ModulesToSaveWrapper): on the LM head, its
# `weight` would be the frozen base weight alone, and the adapter's share of the logits would be lost.
_ADAPTER_ATTRIBUTES = ("base_layer", "lora_A", "modules_to_save")


def backbone_and_head(model: torch.nn.Module):
    """(the backbone, whose output has `last_hidden_state` [B, T, H]; the LM head, whose `weight` is [V, H]).

    The backbone is `model.base_model`, or `model.model` for a vision-language model under transformers < 5
    (where `base_model` is not the language backbone); this is the rule TRL's `add_fused_lm_head` follows.
    A PEFT model (LoRA, ...) is first unwrapped with `get_base_model()`: its `base_model` is peft's tuner model,
    whose forward returns logits; the adapters stay in the unwrapped model's layers, so the backbone's hidden
    states include them. NotImplementedError for a model that has no backbone or LM head, and for an adapter
    on the LM head itself."""
    import transformers

    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    backbone = model.base_model
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is not config and int(transformers.__version__.split(".")[0]) < 5:
        backbone = getattr(model, "model", backbone)
    head = model.get_output_embeddings()
    if backbone is model or head is None:
        raise NotImplementedError(f"{type(model).__name__} exposes no backbone / LM head to score with")
    if any(hasattr(head, name) for name in _ADAPTER_ATTRIBUTES):
        raise NotImplementedError(
            f"the LM head of {type(model).__name__} carries a PEFT adapter ({type(head).__name__}); care_kernels "
            "scores with the head's weight alone: merge the adapter (merge_and_unload) or leave the LM head out of "
            "the adapter's target modules (peft's `all-linear` does)"
        )
    return backbone, head
