"""The demo's tokenizer: Qwen2.5's byte-level BPE restricted to the tokens the demo's texts use.

    tok = demo_tokenizer()            # ~1k tokens: every demo text tokenizes exactly as Qwen2.5's tokenizer does
    tok.convert_ids_to_tokens(tok("<answer>A</answer>")["input_ids"])   # ['<', 'answer', '>A', '</', 'answer', '>']

Why: with Qwen2.5's full vocabulary (151,665 tokens) the LM head of a hidden-64 model is 99% of the demo's
parameters and most of its time (sampling, scoring and the loss all run over the vocabulary). The demo's texts
(GRPO-CARE's prompt templates, the questions, options and chains of thought) use about a thousand of those
tokens. This tokenizer keeps them, every token the BPE merges pass through on the way to them, the 256 byte
tokens (so any text still encodes) and Qwen's 22 special tokens, with Qwen's relative id order (so merge
priorities are unchanged) renumbered from 0. A demo text therefore gives the same token strings as with
Qwen2.5's tokenizer (`tokens_match_qwen` checks it), answer spans included (grpo_care.md 5.2); only the ids
differ.
"""

from __future__ import annotations

import functools
import hashlib
import json
from itertools import product
from pathlib import Path

from grpo_care.tiny import QWEN_SPECIAL_TOKENS, qwen_tokenizer


def demo_texts() -> list[str]:
    """Every text the demo puts through the tokenizer: chat-templated prompts in both wordings (training,
    evaluation) and both prompt styles (data.PROMPT_STYLES) for every task kind and object, the warm start's
    questions and targets, every rationale the world allows."""
    from grpo_care.data import PROMPT_STYLES, build_messages, seed_bench_r1_sample
    from grpo_care.demo.synthetic_data import LETTERS, OPTION_ORDER
    from grpo_care.demo.tasks import TASK_KINDS, completion, observation, rationale
    from grpo_care.demo.warm_start import PERCEPTION_QUESTION
    from grpo_care.demo.world import COLORS, DIRECTIONS, GRID, SHAPES, Motion, inside, step
    from grpo_care.tiny import QWEN_VL_CHAT_TEMPLATE

    texts = [QWEN_VL_CHAT_TEMPLATE, " ".join(QWEN_SPECIAL_TOKENS)]
    for kind, color, shape in product(TASK_KINDS.values(), sorted(COLORS), SHAPES):
        motion = Motion(color, shape, "right", (1, 1), (1, 2))
        record = {"question": kind.question(motion), "answer": kind.option(motion, "up"), "golden_choice_idx": "A",
                  "video_source": "s", "video_basename": "v.mp4", "current_observation_basename": "i.png",
                  "task_progress_metadata": [{}]}
        for letter, direction in zip("abcd", OPTION_ORDER):
            record[f"choice_{letter}"] = kind.option(motion, direction)
        for template, style in product(("train", "eval"), PROMPT_STYLES):
            sample = seed_bench_r1_sample(record, root=Path("."), rng=None, template=template, prompt_style=style)
            texts.append(_chat_text(build_messages(sample)))
        texts.append(_chat_text([{"role": "user", "content": [
            {"type": "video"}, {"type": "image"},
            {"type": "text", "text": PERCEPTION_QUESTION.format(obj=motion.name)}]}]))
    for color, shape, direction in product(sorted(COLORS), SHAPES, sorted(DIRECTIONS)):
        for r, c in product(range(1, GRID + 1), repeat=2):
            previous = step((r, c), {"up": "down", "down": "up", "left": "right", "right": "left"}[direction])
            motion = Motion(color, shape, direction, previous, (r, c))
            for cell_first in (False, True):
                texts.append("<think>" + observation(motion, cell_first))
                if inside(previous):
                    texts += [completion(rationale(motion, states, cell_first), letter) + "<|im_end|>"
                              for letter in LETTERS for states in (False, True)]
    return texts


def _chat_text(messages: list[dict]) -> str:
    """Qwen2.5-VL's chat template rendered by hand for the corpus (no processor needed)."""
    parts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"]
    for content in messages[0]["content"]:
        if content["type"] == "video":
            parts.append("<|vision_start|><|video_pad|><|vision_end|>")
        elif content["type"] == "image":
            parts.append("<|vision_start|><|image_pad|><|vision_end|>")
        else:
            parts.append(content["text"])
    parts.append("<|im_end|>\n<|im_start|>assistant\n")
    return "".join(parts)


def _kept_tokens(model: dict, used: set[str]) -> set[str]:
    """`used`, every byte token, and the closure under merges: all parts of every merge producing a kept token."""
    producers: dict[str, list[tuple[str, str]]] = {}
    for merge in model["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        producers.setdefault(a + b, []).append((a, b))
    kept = {tok for tok in model["vocab"] if len(tok) == 1}  # the 256 byte-level symbols
    todo = list(used)
    while todo:
        tok = todo.pop()
        if tok in kept:
            continue
        kept.add(tok)
        for a, b in producers.get(tok, ()):
            todo += [a, b]
    return kept


@functools.lru_cache(maxsize=1)
def demo_tokenizer():
    """Qwen2.5's tokenizer restricted to the demo's texts (see the module docstring). Built once (a few
    seconds) and cached under $GRPO_CARE_CACHE (default ~/.cache/grpo_care), keyed by the demo's texts."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from grpo_care.tiny import _cache_dir, _finish

    texts = demo_texts()
    key = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
    cached = _cache_dir() / f"qwen2.5-demo-tokenizer-{key}" / "tokenizer.json"
    if cached.is_file():
        return _finish(PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(cached)),
                                               eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                               clean_up_tokenization_spaces=False))
    tok = _build(texts)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tok.backend_tokenizer.save(str(cached))
    except OSError:
        pass
    return tok


def _build(texts: list[str]):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from grpo_care.tiny import _finish

    qwen = qwen_tokenizer()
    spec = json.loads(qwen.backend_tokenizer.to_str())
    model = spec["model"]
    used = set()
    for text in texts:
        used.update(t for t in qwen.convert_ids_to_tokens(qwen(text, add_special_tokens=False)["input_ids"])
                    if t not in QWEN_SPECIAL_TOKENS)
    kept = _kept_tokens(model, used)
    order = sorted(kept, key=model["vocab"].__getitem__)
    new_id = {tok: i for i, tok in enumerate(order)}
    model["vocab"] = new_id
    model["merges"] = [m for m in model["merges"]
                       if all(t in new_id for t in _merge_parts(m)) and "".join(_merge_parts(m)) in new_id]
    for i, added in enumerate(sorted(spec["added_tokens"], key=lambda t: t["id"])):
        added["id"] = len(order) + i
    backend = Tokenizer.from_str(json.dumps(spec))
    tok = _finish(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                          pad_token="<|endoftext|>", clean_up_tokenization_spaces=False))
    return tok


def _merge_parts(merge) -> tuple[str, str]:
    a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
    return a, b


def tokens_match_qwen(tokenizer, texts: list[str]) -> bool:
    """True when every text gives the same token strings with `tokenizer` as with Qwen2.5's tokenizer."""
    qwen = qwen_tokenizer()
    for text in texts:
        ours = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
        theirs = qwen.convert_ids_to_tokens(qwen(text, add_special_tokens=False)["input_ids"])
        if ours != theirs:
            return False
    return True
