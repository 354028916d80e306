"""The warm start's prompts, encoded once: each example's row of the processor's output, kept, and batches collated
from those rows instead of running the processor (chat template, tokenizer, image and video processors) again at
every step, which took about a tenth of a warm-start step.

    rows = encode_each(messages, images, videos, processor)  # one processor call; a row per prompt (unpadded)
    batch = collate([rows[1], rows[0]], pad_id)  # == encode_prompts([messages[1], messages[0]], ..., processor)

A row holds the example's unpadded `input_ids` and `mm_token_type_ids` ([P]) and its own visual tensors
(`pixel_values` [patches, C], `image_grid_thw` [images, 3], and the same for videos). `collate` left-pads the
token rows, as the processor does, and concatenates the visual tensors in batch order, so a batch is bit for bit
the processor's own encoding of it (tests/test_demo_encoded_prompts.py checks it on the demo's examples).
"""

from __future__ import annotations

import torch

from grpo_care.rollout import encode_prompts

TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")  # [B, P], left padded
VISUAL_KEYS = {"pixel_values": "image_grid_thw", "pixel_values_videos": "video_grid_thw"}  # patches -> their grids


def encode_each(messages: list[list[dict]], images: list[list], videos: list[list], processor) -> list[dict]:
    """One row per prompt (`images[i]` / `videos[i]`: the i-th prompt's visuals, in placeholder order), from one
    call of the processor over all of them (grpo_care.rollout.encode_prompts)."""
    out = encode_prompts(messages, [x for xs in images for x in xs], [x for xs in videos for x in xs], processor,
                         multimodal=True)
    unknown = set(out) - set(TOKEN_KEYS) - set(VISUAL_KEYS) - set(VISUAL_KEYS.values())
    if unknown:
        raise ValueError(f"the processor returned {sorted(unknown)}, which collate() cannot batch")
    real = out["attention_mask"].bool()
    rows = [{key: out[key][i][real[i]].clone() for key in ("input_ids", "mm_token_type_ids") if key in out}
            for i in range(len(messages))]
    for pixels_key, grid_key in VISUAL_KEYS.items():
        if pixels_key not in out:
            continue
        counts = [len(xs) for xs in (images if pixels_key == "pixel_values" else videos)]
        grids = out[grid_key].split(counts)
        patches = out[pixels_key].split([int(g.prod(-1).sum()) for g in grids])
        for row, grid, pixels in zip(rows, grids, patches):
            row[grid_key], row[pixels_key] = grid.clone(), pixels.clone()
    return rows


def collate(rows: list[dict], pad_token_id: int) -> dict:
    """The processor's batch encoding of `rows`' prompts: token tensors [B, P] left padded (`pad_token_id`,
    attention mask 0, token type 0), visual tensors concatenated in row order."""
    length = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": torch.full((len(rows), length), pad_token_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), length), dtype=torch.long)}
    if "mm_token_type_ids" in rows[0]:
        batch["mm_token_type_ids"] = torch.zeros((len(rows), length), dtype=rows[0]["mm_token_type_ids"].dtype)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, length - n:] = row["input_ids"]
        batch["attention_mask"][i, length - n:] = 1
        if "mm_token_type_ids" in batch:
            batch["mm_token_type_ids"][i, length - n:] = row["mm_token_type_ids"]
    for pixels_key, grid_key in VISUAL_KEYS.items():
        with_visuals = [row for row in rows if grid_key in row and len(row[grid_key])]
        if with_visuals:
            batch[pixels_key] = torch.cat([row[pixels_key] for row in with_visuals])
            batch[grid_key] = torch.cat([row[grid_key] for row in with_visuals])
    return batch
