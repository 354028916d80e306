"""Does the warm start answer from the reasoning it is given? GRPO-CARE's reference starts as the warm start, and
the bonus can prefer consistent right answers only if the reference's likelihood of an answer depends on the
reasoning in front of it.

    probe = reference_probe(model, processor, files.train, config, teacher)
    probe["right_letter_after_true_premises"]      # e.g. 0.92: a right answer that follows its (true) premises
    probe["right_letter_after_teacher_premises"]   # e.g. 0.07: a right answer that contradicts its premises

Measured on the RL prompts whose car backs up away from a wall (`n_prompts` of them): there the teacher's
premises (the way the car faces) imply a wrong move, so a right answer after them is the inconsistent kind that
outcome reward can find through the signal, and a right answer after the clip's true premises is the consistent
kind. Each value is the mean over those prompts of the probability the model gives the answer letter,
teacher-forced after `<think>{reasoning}</think><answer>` (the reasoning as the teacher writes it:
`tasks.rationale`). `their_letter_after_random_premises`: on every prompt, premises drawn at random (any
direction, any cell the car can have come into that way) and the letter they imply: how far the answer follows
what is written rather than what the clip shows.
"""

from __future__ import annotations

import json
import math
import random

import torch

from care_kernels.answer_spans import answer_positions
from grpo_care.data import build_messages, load_samples
from grpo_care.demo.synthetic_data import LETTERS, Teacher, random_premises, teacher_belief
from grpo_care.demo.tasks import completion, rationale
from grpo_care.demo.warm_start import Example, batch_inputs, target_logprobs
from grpo_care.demo.world import Motion

BATCH = 16


def reference_probe(model, processor, train_file, config, teacher: Teacher, seed: int = 0) -> dict:
    """{right_letter_after_true_premises, right_letter_after_teacher_premises, their_letter_after_random_premises,
    n_prompts, n_random}: mean letter probabilities (see the module docstring); the model is left in eval mode."""
    cases = probe_cases(processor, train_file, config, teacher, seed)
    model.eval()
    result = {kind: mean_letter_probability(model, processor, examples) for kind, examples in cases.items()}
    result.update(n_prompts=len(cases["right_letter_after_true_premises"]),
                  n_random=len(cases["their_letter_after_random_premises"]))
    return result


def probe_cases(processor, train_file, config, teacher: Teacher, seed: int = 0) -> dict:
    """{kind: [(Example, index of the answer letter's token in its target)]} for the three kinds above."""
    from grpo_care.prompts import load_visuals
    from grpo_care.rollout import tokenizer_of
    from grpo_care.video import VisualBudget

    tokenizer = tokenizer_of(processor)
    budget = VisualBudget.from_config(config)
    with open(train_file, encoding="utf-8") as f:
        records = {str(r["sample_id"]): r for r in (json.loads(line) for line in f if line.strip())}
    rng = random.Random(f"reference-probe-{seed}")
    after_true, after_teacher, after_random = [], [], []
    for sample in load_samples(str(train_file), seed=seed, template="train", prompt_style=config.prompt_style):
        truth = records[sample.sample_id]["ground_truth"]
        item = load_visuals(sample, budget, multimodal=True)
        options = truth["option_directions"]
        motion = Motion(truth["color"], truth["shape"], truth["direction"], tuple(truth["previous"]),
                        tuple(truth["current"]), truth["reversing"])
        prompt = (build_messages(sample), item.images, item.videos)
        drawn = random_premises(rng, motion)
        after_random.append(_case(tokenizer, teacher, prompt, options, drawn, drawn))
        if motion.reversing and not motion.at_wall:
            after_true.append(_case(tokenizer, teacher, prompt, options, motion, motion))
            after_teacher.append(_case(tokenizer, teacher, prompt, options, teacher_belief(motion), motion))
    return {"right_letter_after_true_premises": after_true,
            "right_letter_after_teacher_premises": after_teacher,
            "their_letter_after_random_premises": after_random}


def _case(tokenizer, teacher: Teacher, prompt: tuple, options: list[str], premises: Motion,
          letter_of: Motion) -> tuple[Example, int]:
    """The prompt (messages, images, videos) with `premises` in the teacher's wording and the letter of
    `letter_of`'s next move as target; the index of that letter's token."""
    text = completion(rationale(premises, teacher.states_next_move, teacher.cell_first),
                      LETTERS[options.index(letter_of.next_direction)])
    ids, position = _letter_position(tokenizer, text)
    return Example(*prompt, ids), position


def _letter_position(tokenizer, text: str) -> tuple[list[int], int]:
    """The completion's token ids (+ <|im_end|>) and the index of its answer token: the span CARE's reference
    likelihood scores (care_kernels.answer_spans, `content`), one token (`>A`) with Qwen's BPE."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    span = answer_positions(ids, tokenizer)
    if len(span) != 1:
        raise ValueError(f"the answer of {text!r} is {len(span)} tokens, not one")
    return ids + [tokenizer.eos_token_id], span[0]


@torch.no_grad()
def mean_letter_probability(model, processor, examples: list[tuple[Example, int]]) -> float | None:
    """Mean over examples of exp(log p(letter token | prompt, completion before it)); the torch expression:
    log_softmax(model(prompt + target).logits[:, prompt_len - 1 + position]).gather(target[position])."""
    if not examples:
        return None
    total = 0.0
    for start in range(0, len(examples), BATCH):
        batch = examples[start:start + BATCH]
        logprobs = target_logprobs(model, *batch_inputs([e for e, _ in batch], processor))
        total += sum(math.exp(float(logprobs[row, position])) for row, (_, position) in enumerate(batch))
    return round(total / len(examples), 4)
