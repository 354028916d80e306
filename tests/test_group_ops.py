"""Group ops: group_advantages, answer_likelihood, care_bonus (grpo_care.md 5.3 and 6).

Public functions against plain torch / TRL / a literal per-group transcription of section 5.3, the edge
cases the spec names, and each native implementation against the torch reference.
"""

from __future__ import annotations

import pytest
import torch

from care_kernels import _ext
from care_kernels.group import NATIVE_OPS, answer_likelihood, care_bonus, group_advantages
from care_kernels.reference import group as ref

NAN, INF = float("nan"), float("inf")


def _native_ops():
    """torch.ops.care_kernels with the group ops, or skip saying why not."""
    if _ext.native("_C") is None:
        pytest.skip(f"native extension care_kernels._C not loaded: {_ext.why_not('_C')}")
    missing = [name for name in NATIVE_OPS if not hasattr(torch.ops.care_kernels, name)]
    if missing:
        pytest.skip(
            f"care_kernels._C was built without csrc/cpu/group_ops.cpp (missing {missing}); rebuild it"
        )
    return torch.ops.care_kernels


# ----------------------------------------------------------------------------------------------------------
# group_advantages


@pytest.mark.parametrize("group_size", [2, 3, 8, 16])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_plain_torch(group_size, scale):
    rewards = torch.randn(7 * group_size, dtype=torch.float64)
    r = rewards.view(-1, group_size)
    centered = r - r.mean(1, keepdim=True)
    if scale == "group":
        expected = centered / (r.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        expected = centered / (rewards.std() + 1e-4)
    else:
        expected = centered
    out = group_advantages(rewards.float(), group_size, scale=scale)
    assert out.dtype == torch.float32 and out.shape == rewards.shape
    torch.testing.assert_close(out.double(), expected.view(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl_nan_aware_formula(scale):
    from trl.trainer.utils import nanstd

    g = 6
    rewards = torch.randn(8 * g)
    rewards[[1, 4, 13, 40, 41, 42, 43, 44]] = (
        NAN  # reward functions returning None; the last group has one left
    )
    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
    if scale == "group":
        std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
    else:
        std = nanstd(rewards).expand_as(rewards)
    trl = rewards - mean
    if scale != "none":
        trl = trl / (std + 1e-4)
    trl = torch.nan_to_num(trl, nan=0.0)  # TRL 1.16, GRPOTrainer._generate_and_score_completions
    out = group_advantages(rewards, g, scale=scale)
    torch.testing.assert_close(out, trl, rtol=1e-5, atol=1e-6)
    assert (out[torch.isnan(rewards)] == 0).all()


def test_singleton_and_all_equal_groups_give_exact_zero():
    assert (group_advantages(torch.randn(5), 1) == 0).all()
    # Equal values whose float32 sum / n is not exactly the value (0.7 * 3 / 3 != 0.7 in float32).
    for value in (0.7, 0.1, 1.3, 1e6 + 0.1):
        for eps in (1e-4, 0.0):
            for scale in ("group", "batch", "none"):
                out = group_advantages(torch.full((12,), value), 3, scale=scale, eps=eps)
                assert (out == 0).all(), (value, eps, scale, out)


def test_all_wrong_group_has_zero_advantage():
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    out = group_advantages(rewards, 4)
    assert (out[:4] == 0).all() and (out[4:] != 0).all()


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_reward_is_missing(bad):
    rewards = torch.tensor([1.0, bad, 0.0, 1.0, 0.5, 0.25, 0.0, 1.0])
    out = group_advantages(rewards, 4)
    expected = group_advantages(torch.tensor([1.0, 0.0, 1.0]), 3)
    assert out[1] == 0
    torch.testing.assert_close(out[[0, 2, 3]], expected, rtol=0, atol=0)
    assert torch.isfinite(out).all()
    # only one finite reward left in the group: no signal, 0 for everyone
    lone = group_advantages(torch.tensor([bad, 2.0, bad, bad]), 4)
    assert (lone == 0).all()


def test_advantages_accept_int_bool_and_float64():
    expected = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    torch.testing.assert_close(group_advantages(torch.tensor([1, 0, 0, 1]), 2), expected)
    torch.testing.assert_close(group_advantages(torch.tensor([True, False, False, True]), 2), expected)
    out64 = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64), 2)
    assert out64.dtype == torch.float32
    torch.testing.assert_close(out64, expected)
    assert group_advantages(torch.empty(0), 4).shape == (0,)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.zeros(10), 4), {}, "not a multiple of group_size=4"),
        ((torch.zeros(8), 0), {}, "group_size must be a positive int"),
        ((torch.zeros(8), 2.0), {}, "group_size must be a positive int"),
        ((torch.zeros(2, 4), 4), {}, r"1-D tensor \[B \* group_size\]"),
        ((torch.zeros(8), 4), {"scale": "std"}, "scale must be one of"),
        ((torch.zeros(8), 4), {"eps": -1.0}, "eps must be a finite float >= 0"),
        (([0.0, 1.0], 2), {}, "rewards must be a torch.Tensor"),
    ],
)
def test_advantages_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# answer_likelihood


def test_answer_likelihood_formula():
    lp = -torch.rand(6, 11) * 4
    mask = torch.rand(6, 11) > 0.5
    mask[0, :] = False
    expected = torch.exp((lp.double() * mask).sum(-1) / (mask.sum(-1) + 1e-6))
    out = answer_likelihood(lp, mask)
    assert out.dtype == torch.float32 and out.shape == (6,)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-7)


def test_answer_likelihood_empty_mask_is_one_and_padding_never_read():
    lp = torch.full((3, 4), -INF)
    lp[1, 2] = -0.5
    lp[2, 0] = NAN
    mask = torch.zeros(3, 4, dtype=torch.long)  # an int mask works too
    mask[1, 2] = 1
    out = answer_likelihood(lp, mask)
    assert out[0] == 1.0 and out[2] == 1.0
    torch.testing.assert_close(out[1], torch.tensor(0.5 / (1 + 1e-6)).neg().exp())


def test_answer_likelihood_single_token_is_its_probability():
    lp = torch.log(torch.tensor([[0.9, 0.2, 0.3]]))
    out = answer_likelihood(lp, torch.tensor([[True, False, False]]))
    torch.testing.assert_close(out, torch.tensor([0.9]), rtol=1e-6, atol=1e-7)


def test_answer_likelihood_bad_arguments():
    with pytest.raises(ValueError, match=r"ref_logprobs must be a 2-D tensor \[B, T\]"):
        answer_likelihood(torch.zeros(4), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="answer_mask must have ref_logprobs' shape"):
        answer_likelihood(torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="floating tensor"):
        answer_likelihood(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------
# care_bonus: a literal, per-group transcription of grpo_care.md 5.3, in float64


def _literal_care_bonus(acc, lik, g, coef=0.5, cap=0.95, floor=0.1, margin=0.0):
    out = []
    for a_grp, p_grp in zip(acc.double().view(-1, g).tolist(), lik.double().view(-1, g).tolist()):
        p_cap = [min(p, cap) for p in p_grp]
        mean_acc = sum(a_grp) / len(a_grp)
        high = [a > floor and a >= mean_acc for a in a_grp]
        if not any(high):
            out += [0.0] * g
            continue
        mu = sum(p for p, h in zip(p_cap, high) if h) / sum(high)
        out += [coef * a if h and p >= mu - margin else 0.0 for a, p, h in zip(a_grp, p_cap, high)]
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("group_size", [1, 2, 8, 16])
@pytest.mark.parametrize("margin", [0.0, 0.01])
def test_care_bonus_matches_literal_spec(group_size, margin):
    acc = (torch.rand(24 * group_size) > 0.4).float()
    lik = torch.rand(24 * group_size) * 1.1  # some above the cap
    out = care_bonus(acc, lik, group_size, margin=margin)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _literal_care_bonus(acc, lik, group_size, margin=margin), rtol=0, atol=0)


def test_care_bonus_continuous_accuracy_matches_literal_spec():
    acc = torch.rand(40 * 4) ** 0.5
    acc[::7] = 0.05  # below the floor
    lik = torch.rand(40 * 4)
    out = care_bonus(acc, lik, 4, coef=0.7, margin=0.02)
    torch.testing.assert_close(
        out, _literal_care_bonus(acc, lik, 4, coef=0.7, margin=0.02), rtol=0, atol=1e-7
    )


def test_all_wrong_group_gets_no_bonus_and_zero_advantage():
    acc = torch.zeros(4)
    bonus = care_bonus(acc, torch.tensor([0.9, 0.2, 0.99, 0.5]), 4)
    assert (bonus == 0).all()
    assert (group_advantages(acc + bonus, 4) == 0).all()


def test_all_right_group_rewards_the_consistent_half():
    acc = torch.ones(4)
    lik = torch.tensor([0.2, 0.5, 0.8, 0.9])  # baseline 0.6
    bonus = care_bonus(acc, lik, 4)
    assert bonus.tolist() == [0.0, 0.0, 0.5, 0.5]
    assert (group_advantages(acc + bonus, 4) != 0).all()  # all-correct groups still carry a gradient


def test_ties_at_the_cap_all_get_the_bonus():
    for g in (3, 4, 7, 16):
        lik = torch.linspace(0.95, 1.0, g)  # all capped to exactly 0.95
        assert (care_bonus(torch.ones(g), lik, g) == 0.5).all()
    # float32 mean of three 0.96 values capped to 0.95 must not land one ulp above 0.95
    assert (care_bonus(torch.ones(3), torch.full((3,), 0.96), 3) == 0.5).all()
    # two tied at the cap beside a low one: baseline (0.95 + 0.95 + 0.5) / 3 = 0.8
    bonus = care_bonus(torch.ones(3), torch.tensor([0.99, 0.96, 0.5]), 3)
    assert bonus.tolist() == [0.5, 0.5, 0.0]


def test_no_high_accuracy_member_gives_no_bonus():
    assert (care_bonus(torch.full((4,), 0.05), torch.rand(4), 4) == 0).all()  # all below the floor
    assert (care_bonus(torch.tensor([0.1, 0.1, 0.0, 0.0]), torch.rand(4), 4) == 0).all()  # floor is strict


def test_accuracy_ties_with_inexact_mean_are_high_accuracy():
    # mean of (0.7, 0.7, 0.7) in float32 is not exactly 0.7 when computed as sum / n
    bonus = care_bonus(torch.full((3,), 0.7), torch.tensor([0.5, 0.6, 0.7]), 3, coef=1.0)
    torch.testing.assert_close(bonus, torch.tensor([0.0, 0.7, 0.7]))


def test_only_above_mean_accuracy_is_high_accuracy():
    acc = torch.tensor([0.05, 0.5, 0.8, 0.8])  # mean 0.5375: only the two 0.8s are high-accuracy
    lik = torch.tensor([0.99, 0.99, 0.3, 0.4])  # baseline over the high set: 0.35
    torch.testing.assert_close(care_bonus(acc, lik, 4), torch.tensor([0.0, 0.0, 0.0, 0.4]))


def test_group_size_one():
    bonus = care_bonus(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.3, 0.9, 0.99]), 1)
    assert bonus.tolist() == [0.5, 0.0, 0.5]  # a lone correct member is its own baseline


def test_margin_lets_near_average_members_through():
    acc = torch.ones(3)
    lik = torch.tensor([0.6, 0.5, 0.545])  # baseline 0.5483: 0.545 is 0.0033 below it
    assert care_bonus(acc, lik, 3, margin=0.0).tolist() == [0.5, 0.0, 0.0]
    assert care_bonus(acc, lik, 3, margin=0.01).tolist() == [0.5, 0.0, 0.5]
    assert care_bonus(acc, lik, 3, margin=None).tolist() == [0.5, 0.0, 0.0]  # GRPO-CARE's None means 0


def test_care_bonus_missing_members():
    acc = torch.tensor([1.0, NAN, 0.0, 1.0])
    lik = torch.tensor([0.5, 0.99, 0.2, NAN])
    # member 1 (NaN accuracy) is absent; member 3 (NaN likelihood) counts in the mean accuracy (2/3) but is not
    # high-accuracy: high set {0}, its own baseline
    assert care_bonus(acc, lik, 4).tolist() == [0.5, 0.0, 0.0, 0.0]
    # a NaN likelihood of a wrong rollout, never read by the authors' code, changes nothing
    acc, lik = torch.tensor([0.0, 0.5, 0.5, 1.0]), torch.tensor([NAN, 0.9, 0.9, 0.1])
    assert care_bonus(acc, lik, 4).tolist() == [0.0, 0.25, 0.25, 0.0]
    torch.testing.assert_close(care_bonus(acc, lik.nan_to_num(0.3), 4), care_bonus(acc, lik, 4))


def _exact_care_bonus(acc_tenths, lik, g):
    """grpo_care.md 5.3 in exact arithmetic (cap 0.95, floor 0.1, margin 0, coef 0.5) on accuracies in tenths
    (what the rewards stand for: 0.7 is 7/10, not the float nearest it) and float32 likelihoods taken as the
    exact values they hold (their sums in float64 are exact)."""
    out = []
    for a, p in zip(acc_tenths.view(-1, g).tolist(), lik.clamp(max=0.95).double().view(-1, g).tolist()):
        high = [x > 1 and x * g >= sum(a) for x in a]
        n, total = sum(high), sum(y for y, h in zip(p, high) if h)
        out += [0.5 * x / 10 if h and y * n >= total else 0.0 for x, y, h in zip(a, p, high)]
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_partial_credit_ties_with_the_mean_count_as_high_accuracy(impl):
    """acc equal to mean(acc) counts as high-accuracy, for the decimal values the rewards stand for: e.g.
    (0.6, 1, 0.6, 0.6, 0.7) has mean 0.7, and (1, 0.7, 0.4) too, where a float32 sum (torch's CPU mean gives
    0.70000005 there) or a mean built from rounded differences lands an ulp above 0.7. The float32 mean here is
    the correctly rounded one. (Likelihoods are continuous, so ties with their baseline are not tested: 0.3f,
    0.6f and 0.45f do not tie as 0.3, 0.6 and 0.45 do, whatever the mean.)"""
    if impl == "reference":
        fn = ref.care_bonus
    else:
        ops = _native_ops()

        def fn(acc, lik, group_size):
            return ops.care_bonus(acc, lik, group_size, 0.5, 0.95, 0.1, 0.0)

    acc, lik = torch.tensor([0.6, 1.0, 0.6, 0.6, 0.7]), torch.tensor([0.5, 0.5, 0.5, 0.5, 0.9])
    torch.testing.assert_close(fn(acc, lik, 5), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.35]), rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    for group_size in (3, 5, 8):
        tenths = torch.randint(0, 11, (4000 * group_size,), generator=g)  # partial credit, many ties
        lik = torch.rand(4000 * group_size, generator=g)
        got = fn(tenths.float() / 10, lik, group_size)
        torch.testing.assert_close(got, _exact_care_bonus(tenths, lik, group_size), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# native implementations against the torch reference


def _random_rewards(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    r[torch.rand(n, generator=g) < 0.1] = NAN
    r[torch.rand(n, generator=g) < 0.03] = INF
    r[torch.rand(n, generator=g) < 0.03] = -INF
    r[: n // 4] = torch.randint(0, 2, (n // 4,), generator=g).to(dtype)  # binary groups, with ties
    return r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_cpu_matches_reference(dtype):
    ops = _native_ops()
    # (group size, groups); the last is large enough to be split across threads
    for seed, (g, b) in enumerate(((1, 64), (2, 64), (3, 64), (8, 64), (16, 64), (100, 64), (8, 16384))):
        r = _random_rewards(b * g, dtype, seed)
        for scale in ("group", "batch", "none"):
            torch.testing.assert_close(
                ops.group_advantages(r, g, scale, 1e-4),
                ref.group_advantages(r, g, scale, 1e-4),
                rtol=1e-6,
                atol=1e-6,
            )
        acc = (torch.rand(b * g, dtype=dtype) > 0.5).to(dtype)
        acc[::5] = torch.rand(acc[::5].shape, dtype=dtype)
        acc[::13] = NAN
        lik = torch.rand(b * g, dtype=dtype) * 1.1
        lik[::11] = NAN
        for margin in (0.0, 0.01):
            torch.testing.assert_close(
                ops.care_bonus(acc, lik, g, 0.5, 0.95, 0.1, margin),
                ref.care_bonus(acc, lik, g, 0.5, 0.95, 0.1, margin),
                rtol=1e-6,
                atol=1e-6,
            )
    lp = -torch.rand(333, 257, dtype=dtype) * 5
    mask = torch.rand(333, 257) > 0.7
    mask[3] = False
    torch.testing.assert_close(
        ops.answer_likelihood(lp, mask), ref.answer_likelihood(lp, mask), rtol=1e-6, atol=1e-6
    )


def test_native_cpu_checks_its_inputs():
    ops = _native_ops()
    with pytest.raises(RuntimeError, match="not a multiple of group_size=4"):
        ops.group_advantages(torch.zeros(6), 4, "group", 1e-4)
    with pytest.raises(RuntimeError, match="scale must be one of"):
        ops.group_advantages(torch.zeros(8), 4, "std", 1e-4)
    with pytest.raises(RuntimeError, match="answer_mask must be a bool tensor"):
        ops.answer_likelihood(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.care_bonus(
            torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2, 0.5, 0.95, 0.1, 0.0
        )


def test_native_ops_opcheck():
    ops = _native_ops()
    r = _random_rewards(32, torch.float32, 0)
    torch.library.opcheck(ops.group_advantages.default, (r, 4, "group", 1e-4))
    torch.library.opcheck(ops.answer_likelihood.default, (torch.randn(3, 5), torch.rand(3, 5) > 0.5))
    torch.library.opcheck(ops.care_bonus.default, (torch.rand(8), torch.rand(8), 4, 0.5, 0.95, 0.1, 0.0))


@pytest.mark.gpu
def test_native_cuda_matches_reference():
    _native_ops()
    if not _ext.cuda_available():
        pytest.skip(f"care_kernels._C_cuda not loaded: {_ext.why_not('_C_cuda')}")
    ops = torch.ops.care_kernels
    for seed, g in enumerate((1, 2, 3, 8, 16, 100)):
        r = _random_rewards(64 * g, torch.float32, seed).cuda()
        for scale in ("group", "batch", "none"):
            torch.testing.assert_close(
                ops.group_advantages(r, g, scale, 1e-4),
                ref.group_advantages(r, g, scale, 1e-4),
                rtol=1e-6,
                atol=1e-6,
            )
        acc = (torch.rand(64 * g, device="cuda") > 0.5).float()
        lik = torch.rand(64 * g, device="cuda") * 1.1
        torch.testing.assert_close(
            ops.care_bonus(acc, lik, g, 0.5, 0.95, 0.1, 0.01),
            ref.care_bonus(acc, lik, g, 0.5, 0.95, 0.1, 0.01),
            rtol=1e-6,
            atol=1e-6,
        )
    lp = -torch.rand(33, 1000, device="cuda") * 5
    mask = torch.rand(33, 1000, device="cuda") > 0.7
    mask[3] = False
    torch.testing.assert_close(
        ops.answer_likelihood(lp, mask), ref.answer_likelihood(lp, mask), rtol=1e-6, atol=1e-6
    )


# ----------------------------------------------------------------------------------------------------------
# torch.compile: the foundation's one real op end to end (schema, fake impl, checks, dispatch)


def test_group_ops_inside_torch_compile():
    @torch.compile(fullgraph=True)
    def care_rewards(acc, lik, fmt):
        rewards = acc + fmt + care_bonus(acc, lik, 4)
        return group_advantages(rewards, 4)

    acc = (torch.rand(32) > 0.5).float()
    lik = torch.rand(32)
    fmt = (torch.rand(32) > 0.2).float()
    expected = ref.group_advantages(acc + fmt + ref.care_bonus(acc, lik, 4), 4)
    torch.testing.assert_close(care_rewards(acc, lik, fmt), expected, rtol=1e-6, atol=1e-6)
