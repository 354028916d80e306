"""grpo_care.batch: prompts_per_step pins the optimizer step's batch whatever the number of ranks."""

from pathlib import Path

import pytest
from grpo_care.batch import micro_batches_per_step, with_pinned_batch
from grpo_care.config import GRPOCareConfig
from grpo_care.user_errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


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
    pinned = with_pinned_batch(GRPOCareConfig(prompts_per_step=4), 4)  # accumulation left at its default
    assert pinned.gradient_accumulation_steps == 1 and pinned.prompts_per_step == 4


PAPER = "configs/seed_bench_r1_care.yaml"


def test_an_accumulation_the_user_set_must_agree_with_prompts_per_step(monkeypatch):
    """Set on the command line, in the YAML file or (in Python) to a non-default value, a disagreeing
    gradient_accumulation_steps is refused with what to pass; an agreeing one is kept."""
    monkeypatch.chdir(ROOT)
    asked = GRPOCareConfig.from_cli(["--config", PAPER, "--gradient_accumulation_steps", "1"])
    with pytest.raises(UsageError, match=r"gradient_accumulation_steps=1 disagrees with prompts_per_step=4, which "
                       r"needs gradient_accumulation_steps=4 .* on 1 rank\(s\) \(given on the command line"):
        with_pinned_batch(asked, 1)
    with pytest.raises(UsageError, match=r"pass --gradient_accumulation_steps 4, or pass --prompts_per_step 1 "):
        with_pinned_batch(asked, 1)
    assert with_pinned_batch(asked, 4).gradient_accumulation_steps == 1  # 4 ranks: it agrees
    assert with_pinned_batch(GRPOCareConfig.from_cli(["--config", PAPER]), 2).gradient_accumulation_steps == 2
    with pytest.raises(UsageError, match="gradient_accumulation_steps=2 disagrees"):
        with_pinned_batch(GRPOCareConfig(prompts_per_step=4, gradient_accumulation_steps=2), 1)
    pinned = with_pinned_batch(GRPOCareConfig.from_yaml(PAPER, ["gradient_accumulation_steps=4"]), 1)
    assert pinned.gradient_accumulation_steps == 4
    with pytest.raises(UsageError, match="given as the override gradient_accumulation_steps=4"):
        with_pinned_batch(GRPOCareConfig.from_yaml(PAPER, ["gradient_accumulation_steps=4"]), 2)
