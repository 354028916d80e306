"""Per-token log-probs from hidden states: forward (2NHV), forward+backward (8NHV with recompute), and
forward+backward with the entropy and its gradient (8NHV)."""

import pytest
from _params import params


@pytest.mark.parametrize("spec", params("forward", "fwd_bwd", "entropy"))
def test_logprobs(spec, run_case):
    run_case(spec)
