"""SEED-Bench-R1 accuracy (grpo_care.md 9.3): near-greedy decoding, exact letter match, per level/domain.

    result = evaluate(model, processor, "annotations/validation_L1.jsonl", config)
    result["accuracy"], result["per_level"], result["per_domain"], result["records"][0]

Protocol: the eval question template (the authors' eval_bench.py wording), validation options in their A-D
order, temperature `eval_temperature` (0.1) and top_p `eval_top_p` (0.001), at most `eval_max_new_tokens`
(1024) new tokens and `eval_video_max_frames` (16) frames. The prediction is the stripped content of the first
`<answer>...</answer>`, or the whole output when there is none; a sample scores 1 iff prediction == gold.
The authors ran vLLM; this runs HF `generate` on batches of `eval_batch_size` prompts.

Each record keeps the completion, its reasoning (`think`), the parsed answer, the gold letter, correctness and
whether the format reward would be 1, so consistency between reasoning and answer can be judged afterwards.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict

import torch

from grpo_care.data import build_messages, load_samples
from grpo_care.modeling import autocast, is_multimodal
from grpo_care.prompts import load_visuals
from grpo_care.rewards import ANSWER_RE, FORMAT_RE, extract_answer
from grpo_care.rollout import (
    encode_prompts,
    generate_rollouts,
    sampling_config,
    tokenizer_of,
    unsampleable_ids,
)
from grpo_care.video import VideoReadError, VisualBudget

THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def prediction(text: str) -> str:
    """The first `<answer>` content, stripped; the whole output (stripped) when there is no answer tag."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip() if match else text.strip()


def _accuracy_table(records: list[dict], key: str) -> dict:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        if r.get(key):
            groups[r[key]].append(r["correct"])
    return {name: {"accuracy": sum(v) / len(v), "num_samples": len(v)} for name, v in sorted(groups.items())}


@torch.no_grad()
def evaluate(
    model,
    processor_or_tokenizer,
    data_file: str,
    config,
    *,
    data_root: str | None = None,
    max_samples: int = 0,
) -> dict:
    """Accuracy of `model` on one annotation file; see the module docstring for the protocol.

    Returns {"accuracy", "num_samples", "num_skipped", "per_level", "per_domain", "records"}; each record has
    sample_id, level, domain, completion, think, answer, gold, correct, format_ok.
    """
    tokenizer = tokenizer_of(processor_or_tokenizer)
    multimodal = is_multimodal(model)
    device = next(model.parameters()).device
    samples = load_samples(
        data_file,
        data_root or config.data_root or None,
        fmt=config.dataset_format,
        seed=config.seed,
        template="eval",
        limit=max_samples,
    )
    budget = VisualBudget.from_config(config, max_frames=config.eval_video_max_frames)
    generation_config = sampling_config(
        config, tokenizer, eval_mode=True, suppress_tokens=unsampleable_ids(model, tokenizer)
    )
    records, skipped = [], 0
    for start in range(0, len(samples), config.eval_batch_size):
        items = []
        for sample in samples[start : start + config.eval_batch_size]:
            try:
                items.append(load_visuals(sample, budget, multimodal))
            except VideoReadError as e:
                skipped += 1
                warnings.warn(
                    f"evaluation skips sample {sample.sample_id!r} ({sample.where}): {e}", stacklevel=2
                )
        if not items:
            continue
        prompts = encode_prompts(
            [build_messages(it.sample, multimodal) for it in items],
            [im for it in items for im in it.images],
            [v for it in items for v in it.videos],
            processor_or_tokenizer,
            multimodal=multimodal,
        )
        prompts = {k: v.to(device) if torch.is_tensor(v) else v for k, v in prompts.items()}
        with autocast(device, config.bf16):
            rollout = generate_rollouts(model, prompts, generation_config, 1)
        texts = tokenizer.batch_decode(
            rollout.completion_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        for item, text in zip(items, texts):
            gold, answer = extract_answer(item.sample.solution), prediction(text)
            think = THINK_RE.search(text)
            records.append(
                {
                    "sample_id": item.sample.sample_id,
                    "level": item.sample.level,
                    "domain": item.sample.domain,
                    "completion": text,
                    "think": think.group(1).strip() if think else "",
                    "answer": answer,
                    "gold": gold,
                    "correct": answer.strip() == gold.strip(),
                    "format_ok": bool(FORMAT_RE.fullmatch(text)),
                }
            )
    n = len(records)
    return {
        "accuracy": sum(r["correct"] for r in records) / n if n else float("nan"),
        "num_samples": n,
        "num_skipped": skipped,
        "per_level": _accuracy_table(records, "level"),
        "per_domain": _accuracy_table(records, "domain"),
        "records": records,
    }
