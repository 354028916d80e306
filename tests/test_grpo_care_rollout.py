"""grpo_care.rollout: explicit sampling, groups, masks, training-forward log-probs that match generation."""

import pytest
import torch
from grpo_care.config import GRPOCareConfig
from grpo_care.data import build_messages, load_samples
from grpo_care.modeling import backbone_hidden, lm_head_params
from grpo_care.prompts import load_visuals
from grpo_care.rollout import (
    Rollout,
    completion_mask,
    encode_prompts,
    expand_group,
    generate_rollouts,
    own_generation_config,
    sampling_config,
    unsampleable_ids,
)
from grpo_care.video import VisualBudget

import care_kernels as ck

pytest.importorskip("av", reason="the synthetic clips are written with PyAV (pip install av)")
CONFIG = GRPOCareConfig(
    max_completion_length=10,
    num_generations=3,
    video_min_pixels=3136,
    video_max_pixels=3136,
    image_max_pixels=3136,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from grpo_care.synthetic import write_seed_bench_r1
    from grpo_care.tiny import byte_tokenizer, qwen2_5_vl_processor, tiny_qwen2, tiny_qwen2_5_vl

    paths = write_seed_bench_r1(tmp_path_factory.mktemp("data"), n_train=4, n_val=0)
    tok = byte_tokenizer()
    samples = load_samples(paths["training"])
    return {
        "tok": tok,
        "processor": qwen2_5_vl_processor(tok),
        "vl": tiny_qwen2_5_vl(tok),
        "lm": tiny_qwen2(tok),
        "samples": samples,
    }


def _prompts(setup, multimodal, n=3, max_prompt_length=0):
    items = [load_visuals(s, VisualBudget.from_config(CONFIG), multimodal) for s in setup["samples"][:n]]
    messages = [build_messages(it.sample, multimodal) for it in items]
    longer = " (a longer prompt, so the batch is left padded)"
    if n > 1 and multimodal:
        messages[1][0]["content"][-1]["text"] += longer
    elif n > 1:
        messages[1][0]["content"] += longer
    return encode_prompts(
        messages,
        [i for it in items for i in it.images],
        [v for it in items for v in it.videos],
        setup["processor"] if multimodal else setup["tok"],
        multimodal=multimodal,
        max_prompt_length=max_prompt_length,
    )


def test_prompts_over_max_prompt_length_are_named(setup):
    """Text prompts are left-truncated, multimodal ones kept whole: both with a warning that says so."""
    full = _prompts(setup, multimodal=False)["input_ids"]
    with pytest.warns(UserWarning, match=f"a prompt of {full.shape[1]} tokens exceeds max_prompt_length=32: left"):
        cut = _prompts(setup, multimodal=False, max_prompt_length=32)["input_ids"]
    assert torch.equal(cut, full[:, -32:])
    with pytest.warns(UserWarning, match="multimodal prompt of .* tokens exceeds max_prompt_length=32; it is not cut"):
        whole = _prompts(setup, multimodal=True, max_prompt_length=32)["input_ids"]
    assert torch.equal(whole, _prompts(setup, multimodal=True)["input_ids"])


def test_completion_mask_includes_the_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    assert completion_mask(ids, 2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert completion_mask(ids, [9, 7]).tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_expand_group_repeats_rows_and_each_samples_visual_patches(setup):
    prompts = _prompts(setup, multimodal=True, n=2)
    assert (prompts["attention_mask"][:, 0] == 0).any()  # left padding
    expanded = expand_group(prompts, 3)
    assert torch.equal(expanded["input_ids"], prompts["input_ids"].repeat_interleave(3, 0))
    assert torch.equal(expanded["video_grid_thw"], prompts["video_grid_thw"].repeat_interleave(3, 0))
    n0 = int(prompts["video_grid_thw"][0].prod())
    v = expanded["pixel_values_videos"]
    assert torch.equal(v[:n0], prompts["pixel_values_videos"][:n0])
    assert torch.equal(v[2 * n0 : 3 * n0], prompts["pixel_values_videos"][:n0])
    assert torch.equal(v[3 * n0 : 3 * n0 + 4], prompts["pixel_values_videos"][n0 : n0 + 4])
    assert "second_per_grid_ts" not in prompts  # dropped, as the authors' training code does


def test_real_video_timing_is_kept_per_video_and_follows_its_video_in_a_group(setup):
    """encode_prompts with the sampled fps of each video: second_per_grid_ts = 2 frames / fps, one per video,
    repeated with its video's patches by expand_group."""
    items = [load_visuals(s, VisualBudget.from_config(CONFIG), True) for s in setup["samples"][:3]]
    videos = [v for it in items for v in it.videos]
    fps = [f for it in items for f in it.video_fps]
    assert len(fps) == len(videos) == 3 and fps == [2.0] * 3  # 12 frames at 4 fps: 3 s sampled at 2 fps
    slow = [1.0, 0.5, 2.0]  # as if clips had been capped at fewer frames than 2 per second
    prompts = encode_prompts(
        [build_messages(it.sample, True) for it in items],
        [i for it in items for i in it.images],
        videos,
        setup["processor"],
        multimodal=True,
        video_fps=slow,
    )
    assert prompts["second_per_grid_ts"].tolist() == [2.0, 4.0, 1.0]
    expanded = expand_group(prompts, 3)
    assert expanded["second_per_grid_ts"].tolist() == [2.0] * 3 + [4.0] * 3 + [1.0] * 3
    assert expanded["video_grid_thw"].shape[0] == 9
    with pytest.raises(ValueError, match="1 rates for 3 videos"):
        encode_prompts(
            [build_messages(it.sample, True) for it in items],
            [i for it in items for i in it.images],
            videos,
            setup["processor"],
            multimodal=True,
            video_fps=[2.0],
        )


def test_sampling_parameters_are_explicit_and_never_inherited(setup):
    tok, model = setup["tok"], setup["lm"]
    gc = sampling_config(CONFIG, tok)
    assert (gc.do_sample, gc.temperature, gc.top_p, gc.top_k, gc.repetition_penalty) == (
        True,
        1.0,
        0.95,
        50,
        1.0,
    )
    assert gc.eos_token_id == [tok.eos_token_id, tok.pad_token_id] and gc.max_new_tokens == 10
    # the trap of grpo_care.md 3: a checkpoint whose generation_config says T = 1e-6 (greedy in effect)
    model.generation_config.temperature, model.generation_config.top_k = 1e-6, 1
    model.generation_config.repetition_penalty = 1.05
    torch.manual_seed(0)
    rollout = generate_rollouts(model, _prompts(setup, multimodal=False, n=1), gc, 4)
    assert len({tuple(r) for r in rollout.completion_ids.tolist()}) > 1  # sampled at T = 1, not greedy
    assert model.generation_config.temperature == 1e-6  # restored after generate
    with own_generation_config(model):
        assert model.generation_config.temperature != 1e-6  # a blank GenerationConfig while generating
    eval_gc = sampling_config(CONFIG, tok, eval_mode=True)
    assert (eval_gc.temperature, eval_gc.top_p, eval_gc.top_k, eval_gc.max_new_tokens) == (
        0.1,
        0.001,
        0,
        1024,
    )


@pytest.mark.parametrize("name", ["vl", "lm"])
def test_training_forward_logprobs_match_generation(setup, name):
    """Left-padded prompts, M-RoPE (Qwen2.5-VL) or mask-derived positions (Qwen2): the hidden states the
    trainer feeds care_kernels reproduce the log-probs of the tokens as they were sampled."""
    tok, model, multimodal = setup["tok"], setup[name], name == "vl"
    prompts = _prompts(setup, multimodal)
    gc = sampling_config(CONFIG, tok, suppress_tokens=unsampleable_ids(model, tok))
    gc.output_logits, gc.return_dict_in_generate = True, True
    expanded = expand_group(prompts, 3)
    with own_generation_config(model):
        out = model.generate(**expanded, generation_config=gc)
    P = expanded["input_ids"].shape[1]
    ids = out.sequences[:, P:]
    mask = completion_mask(ids, gc.eos_token_id)
    sampled_logp = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    visual = {k: v for k, v in expanded.items() if k not in ("input_ids", "attention_mask")}
    rollout = Rollout(expanded["input_ids"], expanded["attention_mask"], ids, mask, visual)
    hidden = backbone_hidden(model, rollout.model_inputs())[:, P - 1 : P - 1 + ids.shape[1]]
    logp = ck.linear_logprobs(hidden, lm_head_params(model)[0], ids.masked_fill(mask == 0, -100))
    assert ((logp - sampled_logp).abs() * mask).max() < 1e-4
    assert not torch.isin(ids, torch.tensor(unsampleable_ids(model, tok))).any()
