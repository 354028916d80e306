"""Loading the policy and its processor, and running its backbone without the LM head.

    model, processor, tokenizer = load_model(config)
    hidden = backbone_hidden(model, inputs)          # [N, T, H]: the decoder's last hidden states
    weight, bias = lm_head_params(model)             # what care_kernels multiplies, chunk by chunk

The trainer never calls the LM head on a sequence: log-probs come from `hidden` and `weight` through
care_kernels, so no `[N, T, V]` logits exist in a training step (only `generate` calls the head, on the last
position of each row).
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_multimodal(model) -> bool:
    return getattr(model.config, "vision_config", None) is not None


def is_on_meta(module: torch.nn.Module) -> bool:
    """Whether `module` is (partly) a skeleton on the meta device, with parameters that hold no data."""
    return any(p.is_meta for p in module.parameters())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def attn_implementation(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(config, device: torch.device | None = None):
    """(model, processor or None, tokenizer) from `config.model_name_or_path` (Qwen2.5-VL or a causal LM)."""
    model = build_model(config, device)
    processor, tokenizer = load_processor(config.model_name_or_path, is_multimodal(model))
    return model, processor, tokenizer


def build_model(config, device: torch.device | None = None, on_meta: bool = False, path: str | None = None):
    """The model saved at `path` (default `config.model_name_or_path`) in `model_dtype`, its weights on the
    CPU (`device` picks the attention implementation). on_meta=True: its skeleton on the meta device, built
    from config.json (and generation_config.json) without reading any weights or allocating memory, which FSDP
    start-up fills from rank 0 (fsdp_init.materialize)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    device = device or resolve_device(config.device)
    path = str(path or config.model_name_or_path)
    hf_config = AutoConfig.from_pretrained(path)
    kwargs = dict(
        dtype=_DTYPES[config.model_dtype],
        attn_implementation=attn_implementation(config.attn_implementation, device),
    )
    multimodal = getattr(hf_config, "vision_config", None) is not None
    model_class = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    if not on_meta:
        return model_class.from_pretrained(path, **kwargs)
    with torch.device("meta"):
        model = model_class.from_config(hf_config, **kwargs)
    try:  # what from_pretrained would attach, so checkpoints saved from the skeleton keep it (EOS ids...)
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: from_config's default, as from_pretrained would keep
        pass
    return model


def load_processor(path: str, multimodal: bool):
    """(processor or None, tokenizer with left padding) saved at `path`."""
    from transformers import AutoProcessor, AutoTokenizer

    if multimodal:
        processor = AutoProcessor.from_pretrained(path)
        tokenizer = processor.tokenizer
    else:
        processor, tokenizer = None, AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return processor, tokenizer


def prepare_for_training(model, config, device: torch.device):
    """Move to device, freeze what is frozen, gradient checkpointing, (on GPU) Liger's layer kernels and (on CPU)
    Qwen2.5-VL's vision windows in one SDPA call per window length (grpo_care.vision_windows: the same math).

    A skeleton on the meta device stays there (FSDP start-up allocates its shards after sharding)."""
    if not is_on_meta(model):
        model.to(device)
    if config.freeze_vision_tower:
        visual = getattr(getattr(model, "model", model), "visual", None)
        if visual is None:
            warnings.warn("freeze_vision_tower: the model has no vision tower", stacklevel=2)
        else:
            visual.requires_grad_(False)
    if config.use_liger_kernel:
        apply_liger_layer_kernels(model, device)
    if device.type == "cpu":  # GPU runs keep transformers' loop until gpu_check.sh has run the gpu-marked test
        from grpo_care.vision_windows import batch_vision_windows

        batch_vision_windows(model)
    if config.gradient_checkpointing:
        set_checkpointing(model, True)
    model.config.use_cache = False
    model.train()
    return model


def set_checkpointing(model, enabled: bool) -> None:
    """Activation (gradient) checkpointing on or off, under transformers' new name when it has it."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def apply_liger_layer_kernels(model, device: torch.device) -> bool:
    """Liger's RMSNorm, SwiGLU and RoPE (never its loss or LM head) on a CUDA model; False if not applied."""
    if device.type != "cuda":
        warnings.warn(
            "use_liger_kernel: Liger's Triton kernels need a CUDA device; not applied", stacklevel=2
        )
        return False
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    except ImportError:
        warnings.warn("use_liger_kernel: liger-kernel is not installed; not applied", stacklevel=2)
        return False
    _apply_liger_kernel_to_instance(
        model=model,
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )
    return True


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; a no-op on CPU (fp32 there)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def backbone(model):
    """The module mapping inputs to last hidden states (Qwen2.5-VL: vision + language model; LMs: decoder)."""
    base = getattr(model, "model", None)
    if base is None:
        base = model.base_model
    return base


def backbone_hidden(model, inputs: dict) -> torch.Tensor:
    """Last hidden states [N, T, H] of `inputs` without the LM head.

    Text models get position ids from the attention mask (as `generate` builds them for left-padded rows);
    Qwen2.5-VL computes its 3-D rope positions from the mask and `mm_token_type_ids` itself.
    """
    kwargs = dict(inputs)
    if not is_multimodal(model):
        mask = kwargs["attention_mask"].long()
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    out = backbone(model)(**kwargs, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def lm_head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)
