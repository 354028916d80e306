"""What the adapters need to know about a Hugging Face causal LM or vision-language model."""

from __future__ import annotations

import torch


def backbone_and_head(model: torch.nn.Module):
    """(the backbone, whose output has `last_hidden_state` [B, T, H]; the LM head, whose `weight` is [V, H]).

    The backbone is `model.base_model`, or `model.model` for a vision-language model under transformers < 5
    (where `base_model` is not the language backbone); this is the rule TRL's `add_fused_lm_head` follows.
    NotImplementedError for a model that has neither."""
    import transformers

    backbone = model.base_model
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is not config and int(transformers.__version__.split(".")[0]) < 5:
        backbone = getattr(model, "model", backbone)
    head = model.get_output_embeddings()
    if backbone is model or head is None:
        raise NotImplementedError(f"{type(model).__name__} exposes no backbone / LM head to score with")
    return backbone, head
