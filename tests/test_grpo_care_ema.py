"""grpo_care.ema: the EMA reference keeps an fp32 shadow, so small policy updates are not rounded away."""

import pytest
import torch
from grpo_care.ema import EMAReference


def _policy(value: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def test_fp32_shadow_follows_a_drift_that_a_bf16_lerp_freezes():
    policy = _policy(1.0)
    ref = EMAReference(policy, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)  # theta - phi = 1e-2: 0.005 * 1e-2 is far below half a bf16 ulp at 1.0 (2^-8)
    naive = torch.ones(4, dtype=torch.bfloat16)
    for _ in range(150):
        ref.update(policy, decay=0.995)
        naive.lerp_(torch.full((4,), 1.01, dtype=torch.bfloat16), 0.005)
    assert torch.all(naive == 1.0)  # the authors' bf16 reference never moves (grpo_care.md 7)
    expected = 1.01 - 0.01 * 0.995**150  # ~1.0053
    for shadow in ref.shadow:
        assert shadow.dtype == torch.float32
        torch.testing.assert_close(shadow, torch.full_like(shadow, expected), rtol=0, atol=1e-6)
    for param in ref.module.parameters():  # the module runs the shadow's weights, rounded to bf16 once
        assert param.dtype == torch.bfloat16 and not param.requires_grad
        assert torch.all(param == torch.tensor(expected, dtype=torch.bfloat16))
    assert ref.num_updates == 150


def test_fp32_reference_aliases_its_shadow_and_leaves_the_policy_alone():
    policy = _policy(0.0)
    ref = EMAReference(policy, dtype=torch.float32)
    assert ref.aliased and all(
        s is p.data or s.data_ptr() == p.data_ptr() for s, p in zip(ref.shadow, ref.module.parameters())
    )
    with torch.no_grad():
        for p in policy.parameters():
            p.fill_(1.0)
    ref.update(policy, decay=0.9)
    for p in ref.module.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.1))
    assert all(torch.all(p == 1.0) for p in policy.parameters())


def test_state_dict_round_trip():
    policy = _policy(1.0)
    ref = EMAReference(policy, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    ref.update(policy, 0.5)
    other = EMAReference(_policy(1.0), dtype=torch.bfloat16)
    other.load_state_dict(ref.state_dict())
    assert other.num_updates == 1
    for a, b in zip(other.module.parameters(), ref.module.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="EMA state has"):
        other.load_state_dict({"shadow": other.shadow[:1]})
