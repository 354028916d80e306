"""The group ops of GRPO / GRPO-CARE on [B*G] rewards: advantages, answer likelihood, CARE bonus."""

import pytest
from _params import params


@pytest.mark.parametrize("spec", params("group_advantages", "answer_likelihood", "care_bonus"))
def test_group_ops(spec, run_case):
    run_case(spec)
