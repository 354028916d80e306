"""The whole GRPO loss head of one step: policy forward+backward plus reference forward (10NHV counted;
8NHV of GEMMs for a head that knows each token's loss gradient during its forward)."""

import pytest
from _params import params


@pytest.mark.parametrize("spec", params("grpo_head"))
def test_grpo_head(spec, run_case):
    run_case(spec)
