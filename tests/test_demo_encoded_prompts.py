"""The warm start's prompts, encoded once (grpo_care.demo.encoded_prompts): a batch collated from the saved rows is
the processor's own encoding of that batch, bit for bit."""

import numpy as np
import pytest
import torch
from grpo_care.demo.encoded_prompts import collate, encode_each
from grpo_care.demo.pipeline import DESIGN_3
from grpo_care.demo.synthetic_data import DatasetSizes
from grpo_care.demo.warm_start import Example, batch_inputs, load_examples
from grpo_care.rollout import encode_prompts


@pytest.fixture(scope="module")
def examples(demo_setup):
    files, _, processor, config = demo_setup("encoded", DatasetSizes(train=2, sft=12, eval_per_level=2), 7, DESIGN_3)
    return processor, load_examples(files.sft, config, processor)


def _processor_batch(batch: list[Example], processor) -> dict:
    return encode_prompts([e.messages for e in batch], [x for e in batch for x in e.images],
                          [x for e in batch for x in e.videos], processor, multimodal=True)


def _assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_a_collated_batch_is_the_processors_encoding_of_it(examples):
    processor, (perception, cot, drills) = examples
    assert all(e.prompt is not None for e in perception + cot + drills)  # load_examples encodes them all
    # prompts of different lengths (the two wordings, short perception prompts) and black and real clips
    for batch in ([cot[3], drills[0], cot[0], drills[5], cot[6]], [perception[2], cot[1], perception[0]],
                  [drills[1]]):
        _assert_same(collate([e.prompt for e in batch], processor.tokenizer.pad_token_id),
                     _processor_batch(batch, processor))


def test_batch_inputs_encodes_examples_made_by_hand_the_same_way(examples):
    processor, (perception, cot, _) = examples
    fresh = [Example(e.messages, e.images, e.videos, e.target, e.trained_from) for e in (cot[4], perception[1])]
    inputs, _ = batch_inputs(fresh, processor)
    assert all(e.prompt is not None for e in fresh)
    want = _processor_batch(fresh, processor)
    prompt_length = want["input_ids"].shape[1]  # batch_inputs appends the targets after the prompts
    got = {k: v[:, :prompt_length] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
           for k, v in inputs.items()}
    _assert_same(got, want)


def test_examples_of_one_clip_share_their_visual_tensors(examples):
    _, (perception, cot, drills) = examples
    for i, seen in enumerate(perception):
        for wording in cot[2 * i:2 * i + 2]:
            assert wording.prompt["pixel_values"] is seen.prompt["pixel_values"]
            assert wording.prompt["pixel_values_videos"] is seen.prompt["pixel_values_videos"]
    black = {id(d.prompt["pixel_values_videos"]) for d in drills}
    assert len(black) == 1  # every drill's black clip: one tensor
    assert not np.asarray(drills[0].videos[0]).any()


def test_rows_with_and_without_an_image_collate_like_the_processor(examples):
    processor, (_, cot, _) = examples
    with_image = cot[0]
    video_only = [dict(m, content=[c for c in m["content"] if c.get("type") != "image"])
                  if isinstance(m["content"], list) else m for m in with_image.messages]
    rows = encode_each([with_image.messages, video_only], [with_image.images, []],
                       [with_image.videos, with_image.videos], processor)
    assert "image_grid_thw" not in rows[1] or len(rows[1]["image_grid_thw"]) == 0
    for order in ([0, 1], [1, 0]):
        messages = [(with_image.messages, video_only)[i] for i in order]
        want = encode_prompts(messages, [x for i in order for x in ([with_image.images[0]] if i == 0 else [])],
                              [with_image.videos[0]] * 2, processor, multimodal=True)
        _assert_same(collate([rows[i] for i in order], processor.tokenizer.pad_token_id), want)


def test_the_warm_starts_prompts_follow_the_configs_prompt_style(examples):
    """QUICK (design 4's sizes cut down) asks in the short style: every chain-of-thought and drill prompt ends with
    its instruction sentence, in the training wording for half of them and the evaluation wording for the other."""
    from grpo_care.data import SHORT_EVAL_QUESTION_TEMPLATE, SHORT_QUESTION_TEMPLATE

    _, (_, cot, drills) = examples
    endings = [e.messages[0]["content"][-1]["text"].rsplit("\n", 1)[1] for e in cot + drills]
    wordings = [t.rsplit("\n", 1)[1] for t in (SHORT_QUESTION_TEMPLATE, SHORT_EVAL_QUESTION_TEMPLATE)]
    assert sorted(set(endings)) == sorted(wordings) and endings.count(wordings[0]) == len(endings) // 2
