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

Optional, off in study 1's plan: **answer drills** (`WarmStartSpec.drill_steps`, `drill_share`): the record's
`drill` (random premises in the teacher's wording and the letter they imply, synthetic_data.answer_drill) after
a black clip and image, trained only from the end of the premises on, as a stage of their own (before
perception with `drills_first`, else after it) or mixed into the chain-of-thought stage. With nothing to see,
the letter can only come from the written premises: the step the reference must take for the CARE bonus to
tell consistent answers from inconsistent ones (demo README, development runs 30-33).

Frames come through the trainer's path (grpo_care.video at the config's visual budget, rollout.encode_prompts;
each example's prompt is encoded once, when the examples are loaded, and batches are collated from those rows:
encoded_prompts.py) and the loss is the target tokens' mean negative log-likelihood from
care_kernels.linear_logprobs (no [N, V] logits), so the model is fine-tuned on exactly the inputs GRPO will see.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import care_kernels as ck
from grpo_care.data import build_messages, load_samples
from grpo_care.demo.encoded_prompts import VISUAL_KEYS, collate, encode_each
from grpo_care.modeling import backbone_hidden, lm_head_params
from grpo_care.prompts import load_visuals
from grpo_care.rollout import tokenizer_of
from grpo_care.video import VisualBudget

IGNORE_INDEX = -100
ENCODE_CHUNK = 64  # examples per processor call when load_examples encodes them
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
    drill_steps: int = 0  # a stage of answer drills alone (batches of cot_batch_size)
    drills_first: bool = False  # that stage before perception (else between perception and chain of thought)
    drill_share: float = 0.0  # share of the chain-of-thought stage's examples that are answer drills
    misreads_as_context: bool = False  # a misread target's premises are fed, not trained (only what follows)

    def __post_init__(self):
        if self.drill_steps < 0 or not 0.0 <= self.drill_share < 1.0:
            raise ValueError(f"need drill_steps >= 0 and 0 <= drill_share < 1, got {self.drill_steps}, "
                             f"{self.drill_share}")


@dataclass
class Example:
    messages: list
    images: list
    videos: list
    target: list  # token ids (chains of thought end with <|im_end|>)
    trained_from: int = 0  # target tokens before this index are context only (an answer drill's premises)
    # its row of the processor's output (encoded_prompts.encode_each), once encoded; tensors: not printed or compared
    prompt: dict | None = field(default=None, repr=False, compare=False)


def _perception_messages(sample, record: dict) -> list[dict]:
    truth = record["ground_truth"]
    question = PERCEPTION_QUESTION.format(obj=f"{truth['color']} {truth['shape']}")
    return [{"role": "user", "content": [{"type": "video", "video": sample.video},
                                         {"type": "image", "image": sample.image},
                                         {"type": "text", "text": question}]}]


def load_examples(sft_file, config, processor, misreads_as_context: bool = False
                  ) -> tuple[list[Example], list[Example], list[Example]]:
    """(perception, chain-of-thought, answer-drill) examples of the SFT file, their prompts encoded (`prompt`);
    visuals decoded and encoded once per clip, shared.
    Drills are empty when the records carry none (data written before they existed). `misreads_as_context`:
    a misread chain of thought (`cot_kind`) trains only what follows its premises, like a drill on the real
    clip, so the answer learns to follow written premises that the model does not learn to write."""
    tokenizer = tokenizer_of(processor)
    with open(sft_file, encoding="utf-8") as f:
        records = {str(r["sample_id"]): r for r in (json.loads(line) for line in f if line.strip())}
    budget = VisualBudget.from_config(config)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    perception, cot, drills = [], [], []
    black: dict = {}  # one set of black frames per frame shape, shared by every drill
    visual_rows: dict = {}  # (id of an images list, id of a videos list) -> the first row encoded with them
    eval_wording = load_samples(sft_file, seed=config.seed, template="eval", prompt_style=config.prompt_style)
    train_wording = load_samples(sft_file, seed=config.seed, template="train", prompt_style=config.prompt_style)
    for sample, eval_sample in zip(train_wording, eval_wording):
        record = records[sample.sample_id]
        item = load_visuals(sample, budget, multimodal=True)
        premises = tokenizer("<think>" + record["ground_truth"]["teacher_observation"][:-1],
                             add_special_tokens=False)
        made = [Example(_perception_messages(sample, record), item.images, item.videos, premises["input_ids"])]
        target, trained_from = ids(record["cot"]), 0
        if misreads_as_context and record.get("cot_kind") == "misread":
            target, trained_from = drill_target(tokenizer, record["cot"], record["cot_premises"])
        made += [Example(build_messages(wording), item.images, item.videos, target, trained_from)
                 for wording in (sample, eval_sample)]
        if "drill" in record:
            drill, trained_from = drill_target(tokenizer, record["drill"], record["drill_premises"])
            shapes = tuple(x.shape for x in item.images + item.videos)
            if shapes not in black:
                black[shapes] = ([np.zeros_like(x) for x in item.images], [np.zeros_like(x) for x in item.videos])
            images, videos = black[shapes]
            made += [Example(build_messages(wording), images, videos, drill, trained_from)
                     for wording in (sample, eval_sample)]
        perception.append(made[0])
        cot += made[1:3]
        drills += made[3:]
    examples = perception + cot + drills
    for start in range(0, len(examples), ENCODE_CHUNK):
        _encode(examples[start:start + ENCODE_CHUNK], processor, visual_rows)
    return perception, cot, drills


def _encode(examples: list[Example], processor, visual_rows: dict | None = None) -> None:
    """Set each example's `prompt` (one processor call for all of them). With `visual_rows`, examples that share
    their visual lists (one clip's perception and chain-of-thought prompts, every drill's black frames) share one
    copy of the visual tensors instead of keeping one each."""
    if not examples:
        return
    rows = encode_each([e.messages for e in examples], [e.images for e in examples], [e.videos for e in examples],
                       processor)
    for example, row in zip(examples, rows):
        if visual_rows is not None:
            first = visual_rows.setdefault((id(example.images), id(example.videos)), row)
            row.update({k: first[k] for k in (*VISUAL_KEYS, *VISUAL_KEYS.values()) if k in first})
        example.prompt = row


def drill_target(tokenizer, drill: str, premises: str) -> tuple[list[int], int]:
    """The drill's token ids (+ <|im_end|>) and the index of its first trained token: the first one that ends
    after the premises' last word (a token that spans both, as `.</`, is trained: it states no premise)."""
    context = len("<think>" + premises[:-1])
    if not drill.startswith("<think>" + premises[:-1]):
        raise ValueError(f"drill {drill!r} does not start with its premises {premises!r}")
    encoded = tokenizer(drill, add_special_tokens=False, return_offsets_mapping=True)
    trained_from = next(i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > context)
    return encoded["input_ids"] + [tokenizer.eos_token_id], trained_from


def mix_drills(cot: list[Example], drills: list[Example], share: float, seed: int) -> list[Example]:
    """The chain-of-thought stage's examples: all of `cot` and as many drills as make `share` of the whole (a
    seeded choice of them; all of them when there are too few)."""
    if share == 0.0:
        return list(cot)
    if not drills:
        raise ValueError("drill_share > 0 but the SFT records carry no answer drills (`drill`): write the data "
                         "with this version of synthetic_data")
    wanted = min(len(drills), round(share / (1 - share) * len(cot)))
    chosen = torch.randperm(len(drills), generator=torch.Generator().manual_seed(seed))[:wanted].tolist()
    return list(cot) + [drills[i] for i in sorted(chosen)]


def batch_inputs(examples: list[Example], processor) -> tuple[dict, torch.Tensor]:
    """Model inputs of prompt + target (prompts left padded, targets right padded) and the [B, L] labels: the
    target ids, IGNORE_INDEX on padding and on a drill's context tokens (fed, not trained)."""
    tokenizer = tokenizer_of(processor)
    _encode([e for e in examples if e.prompt is None], processor)
    prompts = collate([e.prompt for e in examples], tokenizer.pad_token_id)
    length = max(len(e.target) for e in examples)
    tokens = torch.full((len(examples), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    real = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, e in enumerate(examples):
        tokens[row, :len(e.target)] = torch.tensor(e.target)
        labels[row, e.trained_from:len(e.target)] = torch.tensor(e.target[e.trained_from:])
        real[row, :len(e.target)] = True
    mask_dtype = prompts["attention_mask"].dtype
    inputs = dict(prompts)
    inputs["input_ids"] = torch.cat([prompts["input_ids"], tokens], 1)
    inputs["attention_mask"] = torch.cat([prompts["attention_mask"], real.to(mask_dtype)], 1)
    if "mm_token_type_ids" in inputs:
        zeros = torch.zeros_like(tokens, dtype=inputs["mm_token_type_ids"].dtype)
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], zeros], 1)
    return inputs, labels


def target_logprobs(model, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
    """[B, L] log-probs of the target tokens (0 at IGNORE_INDEX) given everything before them (batch_inputs'
    layout: the targets are the last L input positions); the torch expression:
    log_softmax(model(**inputs).logits[:, -L - 1:-1], -1).gather(-1, targets[..., None])[..., 0]."""
    hidden = backbone_hidden(model, inputs)
    weight, bias = lm_head_params(model)
    return ck.linear_logprobs(hidden[:, -targets.shape[1] - 1:-1], weight, targets, bias, ignore_index=IGNORE_INDEX)


def sft_loss(model, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (token mean over the batch)."""
    logp = target_logprobs(model, inputs, targets)
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
    # foreach: the per-tensor updates torch runs on CPU by default, bit for bit, in a few calls instead of ~70
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay,
                                  foreach=True)
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
    """The stages, in place on `model`; returns the per-step history [{stage, step, loss, lr, seconds}]."""
    perception, cot, drills = load_examples(sft_file, config, processor, spec.misreads_as_context)
    if spec.drill_steps > 0 and not drills:
        raise ValueError("drill_steps > 0 but the SFT records carry no answer drills (`drill`): write the data "
                         "with this version of synthetic_data")

    def drill_stage() -> list[dict]:
        return run_stage(model, processor, drills, spec.drill_steps, spec.cot_batch_size, spec, "answer drills", log)

    history = drill_stage() if spec.drills_first else []
    history += run_stage(model, processor, perception, spec.perception_steps, spec.perception_batch_size, spec,
                         "perception", log)
    if not spec.drills_first:
        history += drill_stage()
    history += run_stage(model, processor, mix_drills(cot, drills, spec.drill_share, spec.seed), spec.cot_steps,
                         spec.cot_batch_size, spec, "chain of thought", log)
    return history
