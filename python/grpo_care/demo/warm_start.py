"""The warm start: what the base model's pretraining and instruction tuning do for the paper's run, in two short
supervised stages, so that RL starts from a model that already looks at the clip and writes
`<think>...</think><answer>X</answer>`.

    history = warm_start(model, processor, files.sft, config, WarmStartSpec())

1. perception: short prompts (the clip, the image, "Which way did the red car drive, and where is it now?")
   with what the teacher sees as target (`teacher_observation`: the way the car faces, and its cell; without
   the random misreads of its chains of thought), worded as a chain of thought starts ("<think>The red car
   drove right and is now at row 2, column 3", no end token). A model trained from scratch needs many
   examples to learn to see; short prompts make them cheap.
2. chain of thought: the trainer's own prompts (grpo_care.data: the GRPO-CARE training template, and the
   evaluation template, whose wording differs slightly, as a base model has seen both kinds of instruction)
   with the record's `cot` + `<|im_end|>` as target: the teacher's premises followed faithfully to their
   answer (synthetic_data.Teacher).

Frames come through the trainer's path (grpo_care.video at the config's visual budget, rollout.encode_prompts)
and the loss is the target tokens' mean negative log-likelihood from care_kernels.linear_logprobs (no [N, V]
logits), so the model is fine-tuned on exactly the inputs GRPO will see.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import torch

import care_kernels as ck
from grpo_care.data import build_messages, load_samples
from grpo_care.modeling import backbone_hidden, lm_head_params
from grpo_care.prompts import load_visuals
from grpo_care.rollout import encode_prompts, tokenizer_of
from grpo_care.video import VisualBudget

IGNORE_INDEX = -100
PERCEPTION_QUESTION = "Which way did the {obj} drive, and where is it now?"


@dataclass(frozen=True)
class WarmStartSpec:
    perception_steps: int = 200
    perception_batch_size: int = 16
    cot_steps: int = 100
    cot_batch_size: int = 8
    learning_rate: float = 5e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class Example:
    messages: list
    images: list
    videos: list
    target: list  # token ids (chains of thought end with <|im_end|>)


def _perception_messages(sample, record: dict) -> list[dict]:
    truth = record["ground_truth"]
    question = PERCEPTION_QUESTION.format(obj=f"{truth['color']} {truth['shape']}")
    return [{"role": "user", "content": [{"type": "video", "video": sample.video},
                                         {"type": "image", "image": sample.image},
                                         {"type": "text", "text": question}]}]


def load_examples(sft_file, config, processor) -> tuple[list[Example], list[Example]]:
    """(perception examples, chain-of-thought examples) of the SFT file; visuals decoded once, shared."""
    tokenizer = tokenizer_of(processor)
    with open(sft_file, encoding="utf-8") as f:
        records = {str(r["sample_id"]): r for r in (json.loads(line) for line in f if line.strip())}
    budget = VisualBudget.from_config(config)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    perception, cot = [], []
    eval_wording = load_samples(sft_file, seed=config.seed, template="eval")
    for sample, eval_sample in zip(load_samples(sft_file, seed=config.seed, template="train"), eval_wording):
        record = records[sample.sample_id]
        item = load_visuals(sample, budget, multimodal=True)
        premises = tokenizer("<think>" + record["ground_truth"]["teacher_observation"][:-1],
                             add_special_tokens=False)
        perception.append(Example(_perception_messages(sample, record), item.images, item.videos,
                                  premises["input_ids"]))
        target = ids(record["cot"])
        for wording in (sample, eval_sample):
            cot.append(Example(build_messages(wording), item.images, item.videos, target))
    return perception, cot


def batch_inputs(examples: list[Example], processor) -> tuple[dict, torch.Tensor]:
    """Model inputs of prompt + target (prompts left padded, targets right padded) and the [B, L] targets."""
    tokenizer = tokenizer_of(processor)
    prompts = encode_prompts([e.messages for e in examples], [im for e in examples for im in e.images],
                             [v for e in examples for v in e.videos], processor, multimodal=True)
    length = max(len(e.target) for e in examples)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        targets[row, :len(e.target)] = torch.tensor(e.target)
    real = targets != IGNORE_INDEX
    mask_dtype = prompts["attention_mask"].dtype
    inputs = dict(prompts)
    inputs["input_ids"] = torch.cat([prompts["input_ids"], targets.masked_fill(~real, tokenizer.pad_token_id)], 1)
    inputs["attention_mask"] = torch.cat([prompts["attention_mask"], real.to(mask_dtype)], 1)
    if "mm_token_type_ids" in inputs:
        zeros = torch.zeros_like(targets, dtype=inputs["mm_token_type_ids"].dtype)
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], zeros], 1)
    return inputs, targets


def sft_loss(model, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (token mean over the batch)."""
    hidden = backbone_hidden(model, inputs)
    predictors = hidden[:, -targets.shape[1] - 1:-1]
    weight, bias = lm_head_params(model)
    logp = ck.linear_logprobs(predictors, weight, targets, bias, ignore_index=IGNORE_INDEX)
    real = targets != IGNORE_INDEX
    return -(logp * real).sum() / real.sum().clamp(min=1)


def _cosine(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def run_stage(model, processor, examples: list[Example], steps: int, batch_size: int, spec: WarmStartSpec,
              stage: str, log=print) -> list[dict]:
    """`steps` AdamW steps (fresh optimizer, warmup then cosine) over shuffled batches of `examples`."""
    if steps <= 0:
        return []
    if not examples:
        raise ValueError(f"warm start stage {stage!r} has no examples")
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)
    model.train()
    order: list[int] = []
    history = []
    start = time.perf_counter()
    for step in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        lr = _cosine(step, steps, spec.learning_rate, spec.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = sft_loss(model, *batch_inputs(batch, processor))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
        optimizer.step()
        value = float(loss.detach())
        history.append({"stage": stage, "step": step + 1, "loss": value, "lr": lr,
                        "seconds": round(time.perf_counter() - start, 2)})
        if log and ((step + 1) % 50 == 0 or step + 1 == steps):
            log(f"  {stage} step {step + 1:4d}/{steps}  loss {value:.3f}  ({time.perf_counter() - start:.0f}s)")
    model.eval()
    return history


def warm_start(model, processor, sft_file, config, spec: WarmStartSpec = WarmStartSpec(), log=print) -> list[dict]:
    """Both stages, in place on `model`; returns the per-step history [{stage, step, loss, lr, seconds}]."""
    perception, cot = load_examples(sft_file, config, processor)
    history = run_stage(model, processor, perception, spec.perception_steps, spec.perception_batch_size, spec,
                        "perception", log)
    history += run_stage(model, processor, cot, spec.cot_steps, spec.cot_batch_size, spec, "chain of thought", log)
    return history
