"""grpo_care.batch: prompts_per_step pins the optimizer step's batch whatever the number of ranks."""

import pytest
from grpo_care.batch import micro_batches_per_step, with_pinned_batch
from grpo_care.config import GRPOCareConfig


@pytest.mark.parametrize(
    "prompts, per_device, world_size, expected",
    [(4, 1, 1, 4), (4, 1, 2, 2), (4, 1, 4, 1), (8, 2, 2, 2), (16, 2, 8, 1)],
)
def test_micro_batches_per_step(prompts, per_device, world_size, expected):
    assert micro_batches_per_step(prompts, per_device, world_size) == expected


def test_a_step_that_cannot_be_split_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"on 8 rank\(s\) \(8 prompts per round\).*--prompts_per_step 8"):
        micro_batches_per_step(4, 1, 8)
    with pytest.raises(ValueError, match="per_device_train_batch_size=3"):
        micro_batches_per_step(4, 3, 1)


def test_unpinned_configs_are_left_as_they_are():
    config = GRPOCareConfig(gradient_accumulation_steps=3)
    assert with_pinned_batch(config, 4) is config  # prompts_per_step 0: 3 x 1 x 4 = 12 prompts, as configured
    pinned = with_pinned_batch(GRPOCareConfig(prompts_per_step=4, gradient_accumulation_steps=4), 4)
    assert pinned.gradient_accumulation_steps == 1 and pinned.prompts_per_step == 4
