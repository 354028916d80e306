"""care_kernels inside TRL 1.16 for a vision-language model: image prompts, a tiny Qwen2.5-VL built from a config
and Qwen's processor around a small byte-level BPE (grpo_care.tiny; no downloads).

- `patch_trl()`: TRL's multimodal per-token log-probs (pixel_values, image_grid_thw, mm_token_type_ids sliced
  per micro-batch by TRL) and their gradients match TRL's own.
- `CareGRPOTrainer`: trains image prompts; the EMA reference scores each prompt + completion with the policy's
  multimodal inputs, through care_kernels (its LM head never runs), checked against the likelihood computed by
  hand from the reference's full logits, one unpadded sequence at a time; the bonus is added; the reference
  follows the policy. Video is refused with a message that points to grpo_care's trainer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install care-kernels[trl])")
pytest.importorskip("torchvision", reason="Qwen2.5-VL's image processor needs torchvision")

from care_kernels.group import care_bonus  # noqa: E402
from care_kernels.integrations import trl as ck_trl  # noqa: E402

COLORS = ["red", "blue", "green", "white", "black", "yellow"]


@pytest.fixture(scope="module")
def processor():
    from grpo_care.tiny import byte_tokenizer, qwen2_5_vl_processor

    return qwen2_5_vl_processor(byte_tokenizer())


def tiny_vlm(processor, seed=0):
    from grpo_care.tiny import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(processor.tokenizer, seed=seed).float()


def images(sizes, start=0):
    from PIL import Image

    return [Image.new("RGB", size, COLORS[(start + i) % len(COLORS)]) for i, size in enumerate(sizes)]


def image_dataset():
    """Two prompts: one image, then two images of other sizes (different numbers of image tokens per row)."""
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "What colour is it?"}],
                   [{"role": "user", "content": "Which two colours?"}]] * 2,
        "images": [images([(56, 56)]), images([(28, 56), (56, 28)], start=1)] * 2,
    })


def grpo_args(tmp_path, **overrides):
    from trl import GRPOConfig

    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  num_generations=4, max_completion_length=6, max_steps=3, learning_rate=1e-2, report_to=[],
                  logging_steps=1, use_cpu=True, seed=0, save_strategy="no", bf16=False, disable_tqdm=True,
                  beta=0.0)
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def trl_layout_batch(processor, completion_len=5):
    """Prompt + completion tensors as TRL 1.16's GRPOTrainer lays them out for a VLM: the processor's left-padded
    prompts, random completions right-padded, mm_token_type_ids extended with zeros over the completion."""
    prompts = ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
               "<|im_start|>assistant\n",
               "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|>"
               "<|vision_end|>Two colours?<|im_end|>\n<|im_start|>assistant\n"] * 2
    batch_images = [images([(56, 56)]), images([(28, 56), (56, 28)], 1), images([(56, 84)], 3),
                    images([(28, 28), (28, 28)], 4)]
    encoded = processor(images=batch_images, text=prompts, padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    completion = torch.randint(300, 500, (4, completion_len), generator=generator)
    completion_mask = torch.ones_like(completion)
    completion_mask[1, -2:] = 0
    completion_mask[3, -1:] = 0
    extras = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}
    extras["mm_token_type_ids"] = torch.cat(
        [extras["mm_token_type_ids"], extras["mm_token_type_ids"].new_zeros(completion.shape)], 1)
    input_ids = torch.cat([encoded["input_ids"], completion], 1)
    attention_mask = torch.cat([encoded["attention_mask"], completion_mask], 1)
    return input_ids, attention_mask, completion_len, dict(extras, num_images=[1, 2, 1, 2])


def test_patch_trl_multimodal_logps_match_trl(tmp_path, processor, monkeypatch):
    from trl import GRPOTrainer

    trainer = GRPOTrainer(model=tiny_vlm(processor), reward_funcs=[lambda completions, **k: [0.0] * len(completions)],
                          args=grpo_args(tmp_path), train_dataset=image_dataset(), processing_class=processor)
    model = trainer.model
    input_ids, attention_mask, logits_to_keep, multimodal = trl_layout_batch(processor)
    assert multimodal["image_grid_thw"].shape[0] == 6 and "pixel_values" in multimodal

    def per_token():
        model.zero_grad()
        logps, entropy, _ = trainer._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size=2, compute_entropy=True, **multimodal)
        weights = torch.linspace(-1, 1, logps.numel()).view_as(logps)
        ((logps * weights).sum() + 0.1 * entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logps.detach(), entropy.detach(), grads

    trl_logps, trl_entropy, trl_grads = per_token()
    calls = []
    real = ck_trl.linear_logprobs
    monkeypatch.setattr(ck_trl, "linear_logprobs", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    with ck_trl.use_care_kernels():
        ck_logps, ck_entropy, ck_grads = per_token()
    assert len(calls) == 2, "one care_kernels call per micro-batch of 2"
    assert ck_logps.shape == (4, logits_to_keep) and (ck_logps[1, -2:] == 0).all()
    torch.testing.assert_close(ck_logps, trl_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(ck_entropy, trl_entropy, atol=1e-5, rtol=0)
    assert any(n.startswith("model.visual") for n in trl_grads), "the vision tower is in the graph"
    assert trl_grads.keys() == ck_grads.keys()
    for name, grad in trl_grads.items():
        torch.testing.assert_close(ck_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def hand_likelihood(reference, input_ids, attention_mask, logits_to_keep, answer_mask, multimodal):
    """exp(mean answer-token log-prob) per row from the reference's full float64 logits, each row alone and
    unpadded, with its own images (pixel rows located through image_grid_thw)."""
    grid = multimodal["image_grid_thw"]
    rows_per_image = grid.prod(-1).tolist()
    first_image = [0]
    for n in multimodal["num_images"]:
        first_image.append(first_image[-1] + n)
    out = []
    for i in range(input_ids.shape[0]):
        kept = attention_mask[i].bool()
        ids = input_ids[i][kept]
        lo, hi = first_image[i], first_image[i + 1]
        pixels = multimodal["pixel_values"][sum(rows_per_image[:lo]):sum(rows_per_image[:hi])]
        logits = reference(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid[lo:hi],
                           mm_token_type_ids=multimodal["mm_token_type_ids"][i][kept][None]).logits[0].double()
        completion = kept[-logits_to_keep:]
        n_completion = int(completion.sum())
        targets = ids[-n_completion:]
        token_logps = logits[-n_completion - 1:-1].log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        answer = answer_mask[i][completion]
        out.append(token_logps[answer].mean().exp() if answer.any() else torch.tensor(1.0, dtype=torch.float64))
    return torch.stack(out).float()


def test_care_grpo_trainer_trains_image_prompts(tmp_path, processor):
    accuracy = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]

    def accuracy_reward(prompts, completions, completion_ids, **kwargs):
        assert all(len(images) in (1, 2) for images in kwargs["images"])  # TRL hands the images on
        return accuracy[: len(completions)]

    trainer = ck_trl.CareGRPOTrainer(
        model=tiny_vlm(processor), reward_funcs=[accuracy_reward], args=grpo_args(tmp_path),
        train_dataset=image_dataset(), processing_class=processor,
        care_config=ck_trl.CareConfig(ref_ema_decay=0.5, ref_ema_update_every=1),
        answer_mask_fn=lambda rows: [[j >= len(r) - 3 for j in range(len(r))] for r in rows],
    )
    reference = trainer.care_reference.module
    head_calls = []
    reference.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    checks, seen_counts = [], set()
    score = trainer.reference_answer_likelihood

    def checked_score(input_ids, attention_mask, logits_to_keep, answer_mask, **kwargs):
        multimodal = {k: v for k, v in kwargs.items() if k not in ("batch_size", "num_tiles")}
        assert {"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= multimodal.keys()
        groups = [multimodal["num_images"][g:g + 4] for g in (0, 4)]
        assert all(len(set(g)) == 1 and g[0] in (1, 2) for g in groups) and kwargs["batch_size"] == 4
        seen_counts.update(multimodal["num_images"])
        likelihood = score(input_ids, attention_mask, logits_to_keep, answer_mask, **kwargs)
        assert not head_calls, "the reference built [B, T, V] logits"
        with torch.no_grad():
            expected = hand_likelihood(reference, input_ids, attention_mask, logits_to_keep, answer_mask, multimodal)
        head_calls.clear()
        checks.append((likelihood, expected))
        return likelihood

    trainer.reference_answer_likelihood = checked_score
    rewards_seen = []
    calculate = trainer._calculate_rewards

    def recorded(*args):
        rewards = calculate(*args)
        rewards_seen.append(rewards.clone())
        return rewards

    trainer._calculate_rewards = recorded
    policy_start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    assert len(checks) == 3 and len(rewards_seen) == 3  # one generation (8 rollouts, 2 prompts) per step
    assert seen_counts == {1, 2}
    for (likelihood, expected), rewards in zip(checks, rewards_seen):
        assert likelihood.shape == (8,) and likelihood.dtype == torch.float32 and (expected < 1).all()
        torch.testing.assert_close(likelihood, expected, atol=1e-5, rtol=1e-5)
        bonus = care_bonus(torch.tensor(accuracy), expected, 4)
        assert bonus.sum() > 0
        torch.testing.assert_close(rewards[:, 0], torch.tensor(accuracy) + bonus, atol=1e-5, rtol=1e-5)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(h["care/bonus"] > 0 for h in logs)
    assert trainer.care_reference.num_updates == 3
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, policy_start[n])]
    assert any(n.startswith("model.visual") for n in moved) and any("language_model" in n for n in moved)
    # phi_3 = 0.5 phi_2 + 0.5 theta_3 with phi_0 = theta_0: the reference sits strictly between
    for name, phi in reference.named_parameters():
        if name in moved:
            assert not torch.equal(phi, policy_start[name]) and not torch.equal(phi, dict(
                trainer.model.named_parameters())[name]), name
            break
    assert not torch.equal(checks[0][0], checks[2][0]), "the reference did not change between steps"


def test_care_grpo_trainer_refuses_video(tmp_path, processor):
    from datasets import Dataset

    video_set = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What happens?"}]] * 2,
                                   "video": ["a.mp4", "b.mp4"]})
    with pytest.raises(NotImplementedError, match=r"no video path.*grpo-care train"):
        ck_trl.CareGRPOTrainer(model=tiny_vlm(processor), reward_funcs=[lambda completions, **k: [0.0]],
                               args=grpo_args(tmp_path), train_dataset=video_set, processing_class=processor)

    trainer = ck_trl.CareGRPOTrainer(model=tiny_vlm(processor), reward_funcs=[lambda completions, **k: [0.0]],
                                     args=grpo_args(tmp_path), train_dataset=image_dataset(),
                                     processing_class=processor)
    video_part = [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(NotImplementedError, match=r"message part of type 'video'.*grpo-care train"):
        trainer._generate_and_score_completions([{"prompt": video_part}] * 4)
    with pytest.raises(NotImplementedError, match=r"'videos' column"):
        trainer._generate_and_score_completions([{"prompt": "p", "videos": ["a.mp4"]}] * 4)


def test_readme_image_example_runs(tmp_path, processor, monkeypatch):
    """The README's CareGRPOTrainer image example, run as written with the model, processor and sizes swapped for
    the tiny CPU ones."""
    import transformers
    from trl import GRPOConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- trl-image-example:start -->")[1].split("<!-- trl-image-example:end -->")[0]
    code = block.split("```python")[1].split("```")[0]
    assert "CareGRPOTrainer(" in code and "trainer.train()" in code

    model = tiny_vlm(processor)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: processor)
    cpu_sized = dict(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, max_steps=1, num_generations=4,
                     per_device_train_batch_size=4, max_completion_length=8, report_to=[], save_strategy="no",
                     disable_tqdm=True, logging_steps=1)
    monkeypatch.setattr(trl, "GRPOConfig", lambda **kwargs: GRPOConfig(**{**kwargs, **cpu_sized}))
    scope = {}
    try:
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        ck_trl.unpatch_trl()
    trainer = scope["trainer"]
    assert trainer.state.global_step == 1 and trainer.care_reference.num_updates == 0
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert {"care/bonus", "care/answer_likelihood", "rewards/accuracy/mean", "rewards/format_reward/mean"} <= set(log)


def test_a_trl_whose_scoring_inputs_moved_is_refused_up_front():
    class ChangedTRL:
        def _generate_and_score_completions(self, inputs):
            prompt_completion_ids = attention_mask = inputs
            return prompt_completion_ids, attention_mask

    with pytest.raises(RuntimeError, match=r"no logits_to_keep, batch_size, .*Pin trl==1\.16"):
        ck_trl._check_scoring_locals(ChangedTRL)
    ck_trl._check_scoring_locals(trl.GRPOTrainer)  # the installed TRL has them
