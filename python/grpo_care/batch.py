"""The optimizer step's batch, pinned in prompts: the same recipe on one GPU or under torchrun.

    config = with_pinned_batch(config, world_size=4)   # prompts_per_step 4 -> gradient_accumulation_steps 1

One optimizer step sees `per_device_train_batch_size x gradient_accumulation_steps x world_size` prompts. The
paper's step is 4 prompts (4 GPUs x 1 prompt x 8 rollouts, grpo_care.md 8). A config that reaches it on one
process through `gradient_accumulation_steps: 4` would train on 16 prompts per step under a 4-rank torchrun
(and 1500 steps would then be 4 epochs of the 6k set). `prompts_per_step` pins the step instead:
gradient_accumulation_steps = prompts_per_step / (per_device_train_batch_size x world_size), refused when that
is not a whole number. A gradient_accumulation_steps set by the user (in the YAML file, on the command line, or
a non-default value in Python) must agree with the derived one: two settings that disagree are refused, not
silently resolved. The loss is the mean over the step's sequences either way.
"""

from __future__ import annotations

import dataclasses

from grpo_care.user_errors import UsageError

DEFAULT = "the default"


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


def _accumulation_was_set(config) -> bool:
    """gradient_accumulation_steps came from the user: named in the YAML file or on the command line, or (a config
    built in Python, which records no sources) different from the field's default."""
    if config.describe_source("gradient_accumulation_steps") != DEFAULT:
        return True
    default = next(f.default for f in dataclasses.fields(config) if f.name == "gradient_accumulation_steps")
    return config.gradient_accumulation_steps != default


def with_pinned_batch(config, world_size: int):
    """`config` with gradient_accumulation_steps derived from prompts_per_step (unchanged when that is 0). The
    run's saved config.yaml then records the accumulation it ran with. A UsageError (a ValueError) when
    prompts_per_step does not split on `world_size` ranks, or when the user also set a gradient_accumulation_steps
    that differs from the derived one."""
    if not config.prompts_per_step:
        return config
    try:
        steps = micro_batches_per_step(config.prompts_per_step, config.per_device_train_batch_size, world_size)
    except ValueError as err:
        raise UsageError(str(err), source=config.describe_source("prompts_per_step")) from err
    given = config.gradient_accumulation_steps
    if steps == given:
        return config
    if _accumulation_was_set(config):
        gives = config.per_device_train_batch_size * given * world_size
        raise UsageError(
            f"gradient_accumulation_steps={given} disagrees with prompts_per_step={config.prompts_per_step}, "
            f"which needs gradient_accumulation_steps={steps} with per_device_train_batch_size="
            f"{config.per_device_train_batch_size} on {world_size} rank(s)",
            source="; ".join(
                f"{name} {where}" if name == "prompts_per_step" else where
                for name in ("gradient_accumulation_steps", "prompts_per_step")
                if (where := config.describe_source(name)) != DEFAULT
            ),
            hint=f"leave gradient_accumulation_steps out (prompts_per_step sets it), pass "
            f"--gradient_accumulation_steps {steps}, or pass --prompts_per_step {gives} to keep the {gives}-prompt "
            f"step that gradient_accumulation_steps {given} gives (--prompts_per_step 0 unpins it)",
        )
    pinned = dataclasses.replace(config, gradient_accumulation_steps=steps)
    pinned._sources = getattr(config, "_sources", {})
    return pinned
