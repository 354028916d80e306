"""grpo_care.ema: the EMA reference keeps an fp32 shadow, so small policy updates are not rounded away."""


import pytest
import torch
from grpo_care.config import GRPOCareConfig
from grpo_care.ema import EMAReference, ema_decay, ema_moves


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


def test_deferred_shadow_must_be_built_before_an_update():
    policy = _policy(1.0)
    ref = EMAReference(policy, dtype=torch.bfloat16, build_shadow=False)
    assert ref.shadow == [] and not ref.aliased
    with pytest.raises(RuntimeError, match="shard_reference"):
        ref.update(policy, decay=0.9)


_FSDP_BF16_REFERENCE = r"""
import os, types, warnings, torch, torch.distributed as dist
from grpo_care import distributed
from grpo_care.config import GRPOCareConfig
from grpo_care.ema import EMAReference, ema_decay, ema_moves
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
policy = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
with torch.no_grad():
    for p in policy.parameters():
        p.fill_(1.0)
ref = EMAReference(policy, dtype=torch.bfloat16, build_shadow=False)
frozen = EMAReference(policy, dtype=torch.bfloat16, build_shadow=False, frozen=True)
config = types.SimpleNamespace(bf16=False, fsdp_reshard_after_forward=True)
env = distributed.DistEnv(0, 1, 0, "fsdp", torch.device("cpu"))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a Sequential names no _no_split_modules
    distributed.fully_shard_model(policy, config, env)
    distributed.shard_reference(ref, policy, config, env)
    distributed.shard_reference(frozen, policy, config, env)
# a frozen reference's state is its own bf16 shards: no fp32 shadow on any rank
for shadow, p in zip(frozen.shadow, frozen.module.parameters()):
    assert shadow.dtype == torch.bfloat16 and shadow.to_local().data_ptr() == p.to_local().data_ptr()
with torch.no_grad():
    for p in policy.parameters():
        p.add_(0.01)
for _ in range(150):
    ref.update(policy, decay=0.995)
expected = 1.01 - 0.01 * 0.995 ** 150
for shadow in ref.shadow:
    local = shadow.to_local()
    assert local.dtype == torch.float32
    torch.testing.assert_close(local, torch.full_like(local, expected), rtol=0, atol=1e-6)
for p in ref.module.parameters():
    assert p.dtype == torch.bfloat16 and type(p.data).__name__ == "DTensor"
dist.destroy_process_group()
print("ok")
"""


def test_fsdp_reference_builds_its_fp32_shadow_from_the_shards(run_gloo_script):
    """The FSDP path with a bf16 reference (as on GPU): no full fp32 shadow before sharding; after it, the
    shadow is sharded like the policy and follows the policy's drift in fp32. A frozen reference keeps none."""
    run_gloo_script(_FSDP_BF16_REFERENCE)


def test_a_bf16_reference_keeps_the_policy_s_fp32_buffers():
    """Only parameters go to the compute dtype: RoPE frequencies rounded to bf16 would move every rotary
    angle (by about a radian at position 1000) and the reference would differ from the policy at step 0."""
    from grpo_care.tiny import byte_tokenizer, tiny_qwen2

    policy = tiny_qwen2(byte_tokenizer())
    ref = EMAReference(policy, dtype=torch.bfloat16)
    buffers = dict(policy.named_buffers())
    assert buffers and "model.rotary_emb.inv_freq" in buffers
    for name, buffer in ref.module.named_buffers():
        assert buffer.dtype == buffers[name].dtype == torch.float32 and torch.equal(buffer, buffers[name]), name
    assert all(p.dtype == torch.bfloat16 for p in ref.module.parameters())
    assert ref.module.lm_head.weight is ref.module.model.embed_tokens.weight  # the tie survives the cast


def test_a_frozen_reference_keeps_no_shadow_and_is_never_updated():
    """ref_ema_decay 1.0 (or plain GRPO's unset): nothing reads an EMA, so no fp32 copy is made (30 GB at 7B);
    the reference's own (bf16) weights are its state, and a checkpoint still holds them."""
    assert [ema_moves(d) for d in (None, 1.0, 0.995, 0.0)] == [False, False, True, True]
    policy = _policy(1.0)
    ref = EMAReference(policy, dtype=torch.bfloat16, frozen=True)
    assert ref.frozen and ref.aliased
    assert all(s.data_ptr() == p.data_ptr() for s, p in zip(ref.shadow, ref.module.parameters()))
    assert all(s.dtype == torch.bfloat16 for s in ref.shadow)  # no fp32 tensor anywhere
    with pytest.raises(RuntimeError, match="frozen"):
        ref.update(policy, decay=0.995)

    moving = EMAReference(_policy(1.0), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    moving.update(policy, 0.5)  # shadow 1.5
    restored = EMAReference(_policy(0.0), dtype=torch.bfloat16, frozen=True)
    restored.load_state_dict(moving.state_dict())  # an EMA checkpoint resumed as frozen: its weights, kept
    assert all(torch.all(p == 1.5) for p in restored.module.parameters())
    again = EMAReference(_policy(0.0), dtype=torch.bfloat16, frozen=True)
    again.load_state_dict(restored.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.module.parameters(), restored.module.parameters()))


def test_the_decay_applies_whenever_set_and_unset_follows_the_method():
    """As the authors' trainer: an EMA whenever ref_ema_decay is set, CARE or not (KL-EMA); unset, GRPO-CARE's
    0.995 and plain GRPO's frozen KL reference (the authors' default, None, with no --ref_ema_decay)."""
    cases = [
        (dict(use_care=True), 0.995),
        (dict(use_care=False, beta=0.04), None),
        (dict(use_care=False, beta=0.04, ref_ema_decay=0.995), 0.995),
        (dict(use_care=True, ref_ema_decay=1.0), 1.0),
    ]
    for fields, expected in cases:
        assert ema_decay(GRPOCareConfig(**fields)) == expected, fields
