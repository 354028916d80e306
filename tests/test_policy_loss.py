"""policy_loss: parity with TRL 1.16's own GRPOTrainer._compute_loss, masking, gradients, the registry."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from care_kernels.losses import LOSS_TYPES, policy_loss, register_loss_type
from care_kernels.losses import registry as loss_registry

BUILTIN = ("grpo", "bnpo", "dr_grpo", "dapo")


def _batch(b=5, t=9, *, fully_masked_row=True, off_policy=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) * 3
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    if fully_masked_row:
        mask[1] = 0
    old = logp + 0.3 * torch.randn(b, t, generator=g) if off_policy else None
    ref = logp + 0.5 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    return logp, old, ref, adv, mask


# ----------------------------------------------------------------------------------------------------------
# TRL parity: run TRL's own _compute_loss on a minimal stand-in for the trainer


def _trl_compute_loss(
    logp, adv, mask, *, old, ref, beta, eps_low, eps_high, loss_type, max_len, num_items, grad_accum
):
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    b, t = logp.shape
    metrics = defaultdict(lambda: defaultdict(list))
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        max_completion_length=max_len,
        current_gradient_accumulation_steps=grad_accum,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        _metrics=metrics,
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=grad_accum),
        accelerator=types.SimpleNamespace(
            num_processes=1,
            reduce=lambda x, reduction="sum": x,
            gather=lambda x: x,
            gather_for_metrics=lambda x: x,
        ),
        # The model forward, replaced by the given log-probs (entropy is only logged).
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "num_items_in_batch": num_items,
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[0] for k, v in metrics["train"].items()}


@pytest.mark.parametrize("loss_type", BUILTIN)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [False, True], ids=["old=None", "old"])
def test_matches_trl_compute_loss(loss_type, beta, off_policy):
    logp, old, ref, adv, mask = _batch(off_policy=off_policy)
    eps_low, eps_high, max_len, grad_accum = 0.2, 0.28, 12, 3
    num_items = mask.sum()

    trl_logp = logp.clone().requires_grad_(True)
    trl_loss, trl_metrics = _trl_compute_loss(
        trl_logp,
        adv,
        mask,
        old=old,
        ref=ref,
        beta=beta,
        eps_low=eps_low,
        eps_high=eps_high,
        loss_type=loss_type,
        max_len=max_len,
        num_items=num_items,
        grad_accum=grad_accum,
    )
    # TRL divides every type but dapo by the gradient accumulation steps (dapo's window-wide
    # num_items_in_batch already spans them); policy_loss leaves that to the caller.
    if loss_type != "dapo":
        trl_loss = trl_loss * grad_accum
    trl_loss.backward()

    ours_logp = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(
        ours_logp,
        adv,
        mask,
        old_logprobs=old,
        ref_logprobs=ref,
        beta=beta,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        loss_type=loss_type,
        max_completion_length=max_len,
        num_items_in_batch=num_items,
    )
    loss.backward()

    torch.testing.assert_close(loss, trl_loss.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_logp.grad, trl_logp.grad, rtol=0, atol=1e-6)
    assert abs(metrics["clip_ratio"].item() - trl_metrics["clip_ratio/region_mean"]) <= 1e-6
    assert abs(metrics["clip_ratio/low_mean"].item() - trl_metrics["clip_ratio/low_mean"]) <= 1e-6
    assert abs(metrics["clip_ratio/high_mean"].item() - trl_metrics["clip_ratio/high_mean"]) <= 1e-6
    if beta != 0.0:
        assert abs(metrics["kl"].item() - trl_metrics["kl"]) <= 1e-6
    else:
        assert "kl" not in metrics and "kl" not in trl_metrics
    if off_policy:
        assert metrics["clip_ratio"].item() > 0  # the clipped branch is really exercised


# ----------------------------------------------------------------------------------------------------------
# masking, gradients


@pytest.mark.parametrize("loss_type", BUILTIN)
def test_fully_masked_sequence_gives_no_nan(loss_type):
    logp, old, ref, adv, mask = _batch(fully_masked_row=True)
    # Padding may hold anything: the masked-out positions must not reach the loss or its gradient.
    logp = torch.where(mask.bool(), logp, torch.full_like(logp, -torch.inf))
    logp[1, 0] = float("nan")
    old = torch.where(mask.bool(), old, torch.full_like(old, torch.inf))
    ref = torch.where(mask.bool(), ref, torch.full_like(ref, float("nan")))
    logp.requires_grad_(True)
    loss, metrics = policy_loss(
        logp,
        adv,
        mask,
        old_logprobs=old,
        ref_logprobs=ref,
        beta=0.04,
        loss_type=loss_type,
        max_completion_length=9,
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask.bool()] == 0).all()


def test_all_sequences_masked():
    logp = torch.zeros(2, 4, requires_grad=True)
    loss, metrics = policy_loss(
        logp, torch.ones(2), torch.zeros(2, 4, dtype=torch.bool), beta=0.1, ref_logprobs=torch.zeros(2, 4)
    )
    loss.backward()
    assert loss.item() == 0.0 and metrics["clip_ratio"].item() == 0.0 and metrics["kl"].item() == 0.0
    assert (logp.grad == 0).all()


def test_on_policy_grpo_gradient_is_minus_advantage_over_length():
    logp, _, _, adv, mask = _batch(fully_masked_row=False, off_policy=False)
    logp.requires_grad_(True)
    loss, metrics = policy_loss(logp, adv, mask, loss_type="grpo")
    loss.backward()
    lengths = mask.sum(-1, keepdim=True).float()
    expected = -adv[:, None] * mask / lengths / logp.shape[0]
    torch.testing.assert_close(logp.grad, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss, -(adv * (mask.sum(-1) > 0)).mean(), rtol=1e-6, atol=1e-7)
    assert metrics["clip_ratio"].item() == 0.0


def test_metrics_are_detached_0d_tensors():
    logp, old, ref, adv, mask = _batch()
    logp.requires_grad_(True)
    _, metrics = policy_loss(logp, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.04)
    assert set(metrics) == {"clip_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean", "kl"}
    for value in metrics.values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
        assert value.dtype == torch.float32


def test_epsilon_high_defaults_to_epsilon_low():
    logp, old, _, adv, mask = _batch()
    a = policy_loss(logp, adv, mask, old_logprobs=old, epsilon_low=0.1)
    b = policy_loss(logp, adv, mask, old_logprobs=old, epsilon_low=0.1, epsilon_high=0.1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["clip_ratio"], b[1]["clip_ratio"])


def test_advantages_per_token_and_bf16_logprobs():
    logp, old, _, adv, mask = _batch()
    ref_loss, _ = policy_loss(logp, adv, mask, old_logprobs=old)
    loss_bt, _ = policy_loss(logp, adv[:, None].expand_as(logp), mask, old_logprobs=old)
    torch.testing.assert_close(loss_bt, ref_loss, rtol=0, atol=0)
    bf16 = logp.bfloat16().requires_grad_(True)
    loss, _ = policy_loss(bf16, adv, mask, old_logprobs=old)
    loss.backward()
    assert loss.dtype == torch.float32 and bf16.grad.dtype == torch.bfloat16


def test_dapo_normalizer_defaults_to_mask_sum():
    logp, old, _, adv, mask = _batch()
    a, _ = policy_loss(logp, adv, mask, old_logprobs=old, loss_type="dapo")
    b, _ = policy_loss(
        logp, adv, mask, old_logprobs=old, loss_type="dapo", num_items_in_batch=int(mask.sum())
    )
    c, _ = policy_loss(logp, adv, mask, old_logprobs=old, loss_type="bnpo")
    assert torch.equal(a, b) and torch.equal(a, c)


def test_policy_loss_inside_torch_compile():
    logp, old, ref, adv, mask = _batch()
    fn = torch.compile(
        lambda lp: policy_loss(
            lp, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.04, loss_type="grpo"
        ),
        backend="aot_eager",
        fullgraph=True,
    )
    lp = logp.clone().requires_grad_(True)
    loss, metrics = fn(lp)
    loss.backward()
    lp_eager = logp.clone().requires_grad_(True)
    loss_eager, metrics_eager = policy_loss(
        lp_eager, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.04
    )
    loss_eager.backward()
    torch.testing.assert_close(loss, loss_eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lp.grad, lp_eager.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(metrics["kl"], metrics_eager["kl"], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# registry


def test_builtin_loss_types_are_registered():
    assert set(BUILTIN) <= set(LOSS_TYPES)
    with pytest.raises(TypeError):
        LOSS_TYPES["x"] = None  # read-only view


def test_unknown_loss_type_lists_the_valid_ones():
    logp, _, _, adv, mask = _batch()
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'.*'grpo'.*'bnpo'.*'dr_grpo'.*'dapo'"):
        policy_loss(logp, adv, mask, loss_type="ppo")


def test_register_new_loss_type():
    @register_loss_type("test_seq_sum")
    def seq_sum(per_token_loss, mask, *, max_completion_length=None, num_items_in_batch=None):
        return (per_token_loss * mask).sum(-1).mean()

    try:
        assert LOSS_TYPES["test_seq_sum"] is seq_sum
        logp, old, _, adv, mask = _batch()
        loss, _ = policy_loss(logp, adv, mask, old_logprobs=old, loss_type="test_seq_sum")
        # sum over tokens, mean over sequences == dr_grpo's sum / (B * max_completion_length) with length 1
        same, _ = policy_loss(logp, adv, mask, old_logprobs=old, loss_type="dr_grpo", max_completion_length=1)
        torch.testing.assert_close(loss, same, rtol=1e-6, atol=1e-7)
        with pytest.raises(ValueError, match="already registered"):
            register_loss_type("test_seq_sum", lambda *a, **k: None)
        register_loss_type("test_seq_sum", seq_sum)  # re-registering the same function is harmless
    finally:
        loss_registry._REGISTRY.pop("test_seq_sum", None)


def test_kl_clamp_bounds_the_log_ratio_as_the_authors_trainer():
    """kl_clamp=c: k3 of clamp(ref - logp, -c, c), zero gradient where the clamp binds; None is TRL's k3."""
    logp = torch.tensor([[-1.0, -2.0, -30.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -1.0, -20.0]])  # x = ref - logp: -0.5, 1, 29 (clamped), -19.5 (clamped)
    mask, adv = torch.ones(1, 4), torch.zeros(1)
    loss, metrics = policy_loss(logp, adv, mask, ref_logprobs=ref, beta=1.0, kl_clamp=10.0)
    loss.backward()
    x = torch.tensor([-0.5, 1.0, 10.0, -10.0])
    want = (x.exp() - x - 1).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(metrics["kl"], want)
    # d/dlogp of exp(x) - x - 1 with x = ref - logp is 1 - exp(x) where unclamped, 0 where clamped
    torch.testing.assert_close(logp.grad, torch.tensor([[1 - math.exp(-0.5), 1 - math.e, 0.0, 0.0]]) / 4)

    unclamped, m = policy_loss(logp.detach(), adv, mask, ref_logprobs=ref, beta=1.0)
    x = ref[0] - logp.detach()[0]
    torch.testing.assert_close(m["kl"], (x.exp() - x - 1).mean())
    assert unclamped > 1e11  # exp(29): what one far-off token costs without the clamp


# ----------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=0.04), "needs ref_logprobs"),
        (dict(loss_type="dr_grpo"), "pass max_completion_length"),
        (dict(epsilon_low=-0.1), "epsilon_low"),
        (dict(epsilon_high=float("nan")), "epsilon_high"),
        (dict(old_logprobs=torch.zeros(5, 8)), r"old_logprobs must have shape \[B, T\] = \[5, 9\]"),
        (dict(max_completion_length=0), "max_completion_length"),
        (dict(num_items_in_batch="10"), "num_items_in_batch"),
        (dict(beta=torch.tensor(0.1)), "beta must be a finite float"),
        (dict(kl_clamp=0.0), "kl_clamp must be a float > 0"),
        (dict(kl_clamp=float("nan")), "kl_clamp must be a float > 0"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    logp, _, _, adv, mask = _batch()
    with pytest.raises(ValueError, match=match):
        policy_loss(logp, adv, mask, **kwargs)


def test_bad_shapes_raise_value_error():
    logp, _, _, adv, mask = _batch()
    with pytest.raises(ValueError, match="advantages must have shape"):
        policy_loss(logp, adv[:3], mask)
    with pytest.raises(ValueError, match="mask must be"):
        policy_loss(logp, adv, mask[:, :3])
    with pytest.raises(ValueError, match="logprobs must be a floating tensor"):
        policy_loss(logp[0], adv, mask)
