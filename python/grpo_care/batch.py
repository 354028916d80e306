"""The optimizer step's batch, pinned in prompts: the same recipe on one GPU or under torchrun.

    config = with_pinned_batch(config, world_size=4)   # prompts_per_step 4 -> gradient_accumulation_steps 1

One optimizer step sees `per_device_train_batch_size x gradient_accumulation_steps x world_size` prompts. The
paper's step is 4 prompts (4 GPUs x 1 prompt x 8 rollouts, grpo_care.md 8). A config that reaches it on one
process through `gradient_accumulation_steps: 4` would train on 16 prompts per step under a 4-rank torchrun
(and 1500 steps would then be 4 epochs of the 6k set). `prompts_per_step` pins the step instead:
gradient_accumulation_steps = prompts_per_step / (per_device_train_batch_size x world_size), refused when that
is not a whole number. The loss is the mean over the step's sequences either way.
"""

from __future__ import annotations

import dataclasses


def micro_batches_per_step(prompts_per_step: int, per_device: int, world_size: int) -> int:
    """How many micro-batches each rank accumulates so that a step holds `prompts_per_step` prompts."""
    per_round = per_device * world_size
    if prompts_per_step % per_round:
        raise ValueError(
            f"prompts_per_step={prompts_per_step} cannot be split into micro-batches of "
            f"per_device_train_batch_size={per_device} on {world_size} rank(s) ({per_round} prompts per round): "
            f"launch a number of ranks that divides it, change per_device_train_batch_size, or pass "
            f"--prompts_per_step {per_round * max(1, round(prompts_per_step / per_round))} to train on another batch"
        )
    return prompts_per_step // per_round


def with_pinned_batch(config, world_size: int):
    """`config` with gradient_accumulation_steps derived from prompts_per_step (unchanged when that is 0). The
    run's saved config.yaml then records the accumulation it ran with."""
    if not config.prompts_per_step:
        return config
    steps = micro_batches_per_step(config.prompts_per_step, config.per_device_train_batch_size, world_size)
    if steps == config.gradient_accumulation_steps:
        return config
    return dataclasses.replace(config, gradient_accumulation_steps=steps)
