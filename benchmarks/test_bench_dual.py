"""Policy and reference log-probs of the same targets (4NHV): one dual pass against two single passes."""

import pytest
from _params import params


@pytest.mark.parametrize("spec", params("dual"))
def test_dual(spec, run_case):
    run_case(spec)
