"""Prompts to model inputs, and G sampled completions per prompt.

    prompts = encode_prompts(samples, visuals, processor_or_tokenizer, multimodal=True)   # left padded
    rollout = generate_rollouts(model, prompts, sampling_config(config, tokenizer), group_size=8)

Sampling parameters are always set explicitly: `generate` runs with the model's own generation_config
swapped for a blank one, so nothing (a Qwen2.5-VL `temperature: 1e-06`, `repetition_penalty: 1.05`) is
inherited from the checkpoint (grpo_care.md 3 explains the trap). Each prompt is repeated G times before
`generate` (visual patches included), so a group is G consecutive rows, and the same expanded inputs serve
the policy and reference forwards. The completion mask runs up to and including the first EOS.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

# processor outputs that are per-sample rows (batch-first) vs. visual patch tensors indexed by grid_thw
_ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
_VISUAL = (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))


@dataclass
class Rollout:
    """G completions per prompt; tensors are [B*G, ...], group g of prompt b at row b*G + g."""

    prompt_ids: torch.Tensor  # [N, P] left padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, L] (pad after EOS)
    completion_mask: torch.Tensor  # [N, L] 1 up to and including the first EOS
    visual: dict  # expanded pixel_values*/grid_thw, per-row mm_token_type_ids for the prompt
    finished: torch.Tensor | None = None  # [N] bool: the row ended with an EOS (not cut at the length limit)

    def model_inputs(self) -> dict:
        """Inputs of a forward pass over prompt + completion (the completion is text: mm type 0)."""
        inputs = dict(self.visual)
        inputs["input_ids"] = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        inputs["attention_mask"] = torch.cat(
            [self.prompt_mask, self.completion_mask.to(self.prompt_mask.dtype)], 1
        )
        if "mm_token_type_ids" in inputs:
            pad = torch.zeros_like(self.completion_ids, dtype=inputs["mm_token_type_ids"].dtype)
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], dim=1)
        return inputs


def tokenizer_of(processor_or_tokenizer):
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def encode_prompts(
    messages: list[list[dict]],
    images: list,
    videos: list,
    processor_or_tokenizer,
    *,
    multimodal: bool,
    max_prompt_length: int = 0,
    video_fps: list[float] | None = None,
) -> dict:
    """Chat-templated, left-padded prompt tensors (plus visual tensors for a multimodal processor).

    images / videos: flat lists in placeholder order (uint8 arrays from grpo_care.video). Frames arrive
    already at the visual budget, so the processor's own resize and frame sampling are off.
    `second_per_grid_ts` (M-RoPE's seconds per temporal patch) is dropped, as the authors' training code does
    (grpo_care.md 2.3): every clip then gets 1.0. With `video_fps` (the sampled rate of each video, in order)
    it is kept as the real spacing instead, `temporal_patch_size / fps` per video, float32 [num_videos]: what
    the authors' evaluation gets from vLLM, which is given the sampled fps.
    """
    tokenizer = tokenizer_of(processor_or_tokenizer)
    tokenizer.padding_side = "left"
    if multimodal:
        texts = [
            processor_or_tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
            for m in messages
        ]
        kwargs = {}
        if images:
            kwargs["images"] = images
            kwargs["images_kwargs"] = {"do_resize": False}
        if videos:
            kwargs["videos"] = videos
            kwargs["videos_kwargs"] = {"do_resize": False, "do_sample_frames": False}
            if hasattr(processor_or_tokenizer.video_processor, "cap_pixels_per_frame"):  # newer transformers
                kwargs["videos_kwargs"]["cap_pixels_per_frame"] = False  # frames are already at the budget
        out = processor_or_tokenizer(
            text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs
        )
        out = dict(out)
        out.pop("second_per_grid_ts", None)
        if video_fps is not None and videos:
            out["second_per_grid_ts"] = seconds_per_grid(processor_or_tokenizer, video_fps, len(videos))
        length = out["input_ids"].shape[1]
        if max_prompt_length and length > max_prompt_length:
            warnings.warn(
                f"a multimodal prompt of {length} tokens exceeds max_prompt_length={max_prompt_length}; it is not "
                "cut (that would split its visual tokens): lower the frame or pixel budget, or raise "
                "max_prompt_length",
                stacklevel=2,
            )
        return out
    if getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages
        ]
    else:
        texts = [
            m[-1]["content"] if isinstance(m[-1]["content"], str) else m[-1]["content"][-1]["text"]
            for m in messages
        ]
    out = dict(
        tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    )
    length = out["input_ids"].shape[1]
    if max_prompt_length and length > max_prompt_length:
        warnings.warn(
            f"a prompt of {length} tokens exceeds max_prompt_length={max_prompt_length}: left-truncated to its "
            f"last {max_prompt_length} tokens (raise max_prompt_length to keep its start)",
            stacklevel=2,
        )
        out = {k: v[:, -max_prompt_length:] for k, v in out.items()}
    return out


def seconds_per_grid(processor, video_fps: list[float], num_videos: int) -> torch.Tensor:
    """float32 [num_videos]: seconds of video per temporal patch (temporal_patch_size frames at each fps)."""
    if len(video_fps) != num_videos:
        raise ValueError(f"video_fps has {len(video_fps)} rates for {num_videos} videos")
    if any(not fps > 0 for fps in video_fps):
        raise ValueError(f"every video's sampled fps must be > 0, got {video_fps}")
    patch = getattr(getattr(processor, "video_processor", None), "temporal_patch_size", 2)
    return torch.tensor([patch / fps for fps in video_fps], dtype=torch.float32)


def expand_group(inputs: dict, group_size: int) -> dict:
    """Repeat every prompt `group_size` times: rows repeat-interleaved, visual patches repeated per sample
    (and each video's `second_per_grid_ts` with its video)."""
    out = {}
    for key, value in inputs.items():
        if key in _ROW_KEYS:
            out[key] = value.repeat_interleave(group_size, dim=0)
    if "second_per_grid_ts" in inputs:
        out["second_per_grid_ts"] = inputs["second_per_grid_ts"].repeat_interleave(group_size, dim=0)
    for pixels_key, grid_key in _VISUAL:
        if pixels_key not in inputs:
            continue
        grid = inputs[grid_key]
        sizes = grid.prod(dim=-1).tolist()
        chunks = torch.split(inputs[pixels_key], sizes, dim=0)
        out[pixels_key] = torch.cat([c for c in chunks for _ in range(group_size)], dim=0)
        out[grid_key] = grid.repeat_interleave(group_size, dim=0)
    return out


def sampling_config(config, tokenizer, *, eval_mode: bool = False, suppress_tokens: list[int] | None = None):
    """A GenerationConfig with every sampling field explicit (train: T, top_p, top_k; eval: near-greedy).

    `suppress_tokens`: ids never sampled (`unsampleable_ids`).
    """
    from transformers import GenerationConfig

    eos = [tokenizer.eos_token_id]
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos:
        eos.append(tokenizer.pad_token_id)  # Qwen: [<|im_end|>, <|endoftext|>], as the checkpoint's config
    if eval_mode:
        temperature, top_p, top_k, max_new = (
            config.eval_temperature,
            config.eval_top_p,
            0,
            config.eval_max_new_tokens,
        )
    else:
        temperature, top_p, top_k = config.temperature, config.top_p, config.top_k
        max_new = config.max_completion_length
    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=config.repetition_penalty if not eval_mode else 1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new,
        min_new_tokens=0,
        num_beams=1,
        num_return_sequences=1,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
        bad_words_ids=None,
        suppress_tokens=list(suppress_tokens) if suppress_tokens else None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        use_cache=True,
    )


@contextlib.contextmanager
def own_generation_config(model):
    """Swap the model's generation_config for a blank one so that `generate` can inherit nothing from it."""
    from transformers import GenerationConfig

    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def unsampleable_ids(model, tokenizer) -> list[int]:
    """Ids a rollout must not contain: the image / video placeholders of a multimodal model (they would be
    taken for visual features on the training forward) and the padded rows of the embedding beyond the
    tokenizer's vocabulary (never trained, not decodable)."""
    ids = [
        i
        for i in (
            getattr(model.config, "image_token_id", None),
            getattr(model.config, "video_token_id", None),
        )
        if i is not None
    ]
    vocab = model.get_output_embeddings().weight.shape[0]
    return ids + list(range(len(tokenizer), vocab))


def completion_mask(completion_ids: torch.Tensor, eos_token_id) -> torch.Tensor:
    """[N, L] int: 1 up to and including the first EOS (`eos_token_id`: an id or a list of ids); all ones
    for a row without one."""
    eos = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)
    is_eos = torch.isin(completion_ids, eos)
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), completion_ids.shape[1])
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    return (positions[None, :] <= first[:, None]).int()


@torch.no_grad()
def generate_rollouts(model, prompts: dict, generation_config, group_size: int, eos_token_id=None) -> Rollout:
    """Sample `group_size` completions for every prompt (prompts: left-padded tensors on the model's device).

    The completion mask stops at the first of the generation config's EOS ids (or `eos_token_id`): Qwen's
    `<|im_end|>`, or `<|endoftext|>`, after which `generate` pads.
    """
    expanded = expand_group(prompts, group_size)
    was_training = model.training
    model.eval()
    try:
        with own_generation_config(model):
            sequences = model.generate(**expanded, generation_config=generation_config)
    finally:
        model.train(was_training)
    prompt_len = expanded["input_ids"].shape[1]
    completion_ids = sequences[:, prompt_len:]
    eos = generation_config.eos_token_id if eos_token_id is None else eos_token_id
    mask = completion_mask(completion_ids, eos)
    finished = torch.isin(completion_ids, torch.as_tensor(eos, device=completion_ids.device).reshape(-1)).any(
        1
    )
    completion_ids = completion_ids.masked_fill(mask == 0, generation_config.pad_token_id)
    visual = {k: v for k, v in expanded.items() if k not in ("input_ids", "attention_mask")}
    return Rollout(expanded["input_ids"], expanded["attention_mask"], completion_ids, mask, visual, finished)
