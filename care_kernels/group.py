"""GRPO / GRPO-CARE group statistics: advantages, answer likelihood, the CARE consistency bonus.

Rewards are laid out group by group, `[B * G]` with `G = group_size` (element `b * G + g` is generation
`g` of prompt `b`), as TRL and GRPO-CARE lay them out. Every op is vectorized over groups, never syncs
the host with the device, and returns float32.

Implementation: the native op of care_kernels._C (CPU tensors) or care_kernels._C_cuda (CUDA tensors)
when the extension is built with it, else the torch reference in care_kernels.reference.group; both
compute the same thing (tests/test_group_ops.py holds them to 1e-6). The native ops have fake
implementations, so the public functions work inside torch.compile.
"""

from __future__ import annotations

import math

import torch

from care_kernels import _ext
from care_kernels.reference import group as _ref

__all__ = ["group_advantages", "answer_likelihood", "care_bonus", "native_op"]

NATIVE_OPS = ("group_advantages", "answer_likelihood", "care_bonus")
_COMPUTE_DTYPES = (torch.float32, torch.float64)


def _has_kernel(name: str, dispatch_key: str) -> bool:
    return hasattr(torch.ops.care_kernels, name) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"care_kernels::{name}", dispatch_key
    )


def _find_native_kernels() -> dict[str, frozenset[str]]:
    """Device type -> the group ops the loaded extension implements for it (looked up once, at import)."""
    found = {"cpu": frozenset(), "cuda": frozenset()}
    if _ext.cpu_available():
        found["cpu"] = frozenset(name for name in NATIVE_OPS if _has_kernel(name, "CPU"))
        if _ext.cuda_available():
            found["cuda"] = frozenset(name for name in NATIVE_OPS if _has_kernel(name, "CUDA"))
    return found


_NATIVE_KERNELS = _find_native_kernels()


def native_op(name: str, device: torch.device):
    """torch.ops.care_kernels.<name> when the native extension implements it for `device`, else None."""
    if name in _NATIVE_KERNELS.get(device.type, ()):
        return getattr(torch.ops.care_kernels, name)
    return None


def _register_fakes() -> None:
    """Shape-only implementations of the native ops, so they trace under torch.compile / FakeTensor."""
    if not all(hasattr(torch.ops.care_kernels, name) for name in NATIVE_OPS):
        return

    @torch.library.register_fake("care_kernels::group_advantages")
    def _(rewards, group_size, scale, eps):
        return torch.empty_like(rewards, dtype=torch.float32)

    @torch.library.register_fake("care_kernels::answer_likelihood")
    def _(ref_logprobs, answer_mask):
        return ref_logprobs.new_empty(ref_logprobs.shape[:1], dtype=torch.float32)

    @torch.library.register_fake("care_kernels::care_bonus")
    def _(accuracy, likelihood, group_size, coef, likelihood_cap, accuracy_floor, margin):
        return torch.empty_like(accuracy, dtype=torch.float32)


if _NATIVE_KERNELS["cpu"]:
    _register_fakes()


# ----------------------------------------------------------------------------------------------------------
# validation


def _tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name} must be a real (float, int or bool) tensor, got {x.dtype}")
    return x


def _real_1d(x, name: str) -> torch.Tensor:
    x = _tensor(x, name)
    if x.dim() != 1:
        raise ValueError(
            f"{name} must be a 1-D tensor [B * group_size] laid out group by group, got shape "
            f"{tuple(x.shape)}; pass {name}.reshape(-1) for a [B, group_size] tensor"
        )
    return x


def _group_size(group_size, n: int, name: str) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be a positive int (generations per prompt), got {group_size!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be a positive int (generations per prompt), got {group_size}")
    if n % group_size != 0:
        raise ValueError(
            f"{name} has {n} elements, which is not a multiple of group_size={group_size}; pass "
            f"{name} laid out group by group, [B * group_size]"
        )
    return group_size


def _finite_float(value, name: str, *, minimum: float | None = None) -> float:
    if isinstance(value, (bool, torch.Tensor)):
        raise ValueError(f"{name} must be a Python float, got {type(value).__name__}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite float, got {value!r}") from None
    if not math.isfinite(v) or (minimum is not None and v < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be a finite float{bound}, got {value!r}")
    return v


def _as_compute(x: torch.Tensor) -> torch.Tensor:
    """float32 / float64 stay; bf16, fp16, ints and bools become float32."""
    return x if x.dtype in _COMPUTE_DTYPES else x.float()


# ----------------------------------------------------------------------------------------------------------
# public ops


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages of GRPO: rewards [B*G] -> float32 [B*G].

    - `scale="group"`: `(r - mean_group) / (std_group + eps)`, std unbiased (Bessel, N-1), as TRL and
      GRPO-CARE compute it (grpo_care.md section 6);
    - `scale="batch"`: `(r - mean_group) / (std_batch + eps)`, the std of the whole batch;
    - `scale="none"`: `r - mean_group` (Dr. GRPO).

    Equivalent torch for finite rewards (`scale="group"`):

        r = rewards.float().view(-1, group_size)
        adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
        adv.nan_to_num(0.0).view(-1)

    A group with one member, or whose rewards are all equal, gets exactly 0 (never NaN).

    Missing rewards: a NaN reward (TRL's marker for a reward function that returned None) and likewise a
    +-inf reward (a reward-function bug that would otherwise turn its whole group into NaN) is excluded
    from its group's mean and std (and from the batch std) and gets advantage 0, like TRL's `nanmean` /
    `nanstd` + `nan_to_num(0)`. So a group with fewer than two finite rewards gets 0 throughout.

    Args: rewards: 1-D, any real dtype (computed in float32, float64 for float64 input). group_size: the
    generations per prompt G (`rewards.numel()` must be a multiple of it). eps: >= 0 added to the std.
    """
    rewards = _real_1d(rewards, "rewards")
    group_size = _group_size(group_size, rewards.numel(), "rewards")
    if scale not in _ref.SCALES:
        raise ValueError(f"scale must be one of {_ref.SCALES}, got {scale!r}")
    eps = _finite_float(eps, "eps", minimum=0.0)
    rewards = _as_compute(rewards.detach())
    if rewards.numel() == 0:
        return torch.empty(0, dtype=torch.float32, device=rewards.device)
    op = native_op("group_advantages", rewards.device)
    if op is not None:
        return op(rewards, group_size, scale, eps)
    return _ref.group_advantages(rewards, group_size, scale, eps)


def answer_likelihood(ref_logprobs: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """GRPO-CARE's reasoning-to-answer likelihood: ref_logprobs [B, T], answer_mask [B, T] -> float32 [B].

    The geometric mean of the answer tokens' probabilities under the reference model (grpo_care.md 5.3):

        m = answer_mask.bool()
        torch.exp((ref_logprobs.float() * m).sum(-1) / (m.sum(-1) + 1e-6))

    An empty mask gives exactly 1.0. Positions outside the mask are never read, so padding holding -inf or
    NaN does not leak in. answer_mask may be bool or any real dtype (nonzero marks an answer token). No
    gradient: the reference model's log-probs are constants of the reward.
    """
    ref_logprobs = _tensor(ref_logprobs, "ref_logprobs")
    answer_mask = _tensor(answer_mask, "answer_mask")
    if ref_logprobs.dim() != 2:
        raise ValueError(f"ref_logprobs must be a 2-D tensor [B, T], got shape {tuple(ref_logprobs.shape)}")
    if not ref_logprobs.is_floating_point():
        raise ValueError(
            f"ref_logprobs must be a floating tensor of log-probabilities, got {ref_logprobs.dtype}"
        )
    if answer_mask.shape != ref_logprobs.shape:
        raise ValueError(
            f"answer_mask must have ref_logprobs' shape {tuple(ref_logprobs.shape)}, "
            f"got {tuple(answer_mask.shape)}"
        )
    if answer_mask.device != ref_logprobs.device:
        raise ValueError(f"answer_mask is on {answer_mask.device} but ref_logprobs on {ref_logprobs.device}")
    lp = _as_compute(ref_logprobs.detach())
    mask = answer_mask.detach()
    mask = mask if mask.dtype == torch.bool else mask != 0
    op = native_op("answer_likelihood", lp.device)
    if op is not None:
        return op(lp, mask)
    return _ref.answer_likelihood(lp, mask)


def care_bonus(
    accuracy: torch.Tensor,
    likelihood: torch.Tensor,
    group_size: int,
    *,
    coef: float = 0.5,
    likelihood_cap: float = 0.95,
    accuracy_floor: float = 0.1,
    margin: float | None = 0.0,
) -> torch.Tensor:
    """The GRPO-CARE consistency bonus (grpo_care.md 5.3): accuracy, likelihood [B*G] -> float32 [B*G].

    Group by group, with `p~ = min(likelihood, likelihood_cap)`:

        high     = (acc > accuracy_floor) & (acc >= acc.mean())        # relative high-accuracy set
        baseline = p~[high].mean()                                       # over the high-accuracy set only
        bonus    = where(high & (p~ >= baseline - margin), coef * acc, 0)

    A group with no high-accuracy member gives 0 to all (all-wrong groups get no bonus). Likelihoods tied
    at the cap all clear the baseline. For binary accuracy the bonus is exactly `coef` or 0.

    A member whose accuracy is NaN/inf is absent from its group. One whose likelihood is NaN counts in the
    mean accuracy (as in the authors' code, which reads likelihoods only of high-accuracy members) but is not
    in the high-accuracy set or the baseline, and gets bonus 0 (the authors' NaN baseline would give the whole
    group 0). The mean accuracy is the correctly rounded float32 mean, as torch's `mean()`: a member equal to
    it is high-accuracy.

    Args: accuracy: the accuracy reward only (not the format reward). likelihood: `answer_likelihood` of each
    generation. coef: lambda_cons (bonus_coefficient). likelihood_cap: gamma_p (confidence_upper_bound).
    accuracy_floor: gamma_acc. margin: eps_p (consistency_margin; None means 0, as in GRPO-CARE).
    """
    accuracy = _real_1d(accuracy, "accuracy")
    likelihood = _real_1d(likelihood, "likelihood")
    if likelihood.shape != accuracy.shape:
        raise ValueError(
            f"likelihood must have accuracy's shape {tuple(accuracy.shape)}, got {tuple(likelihood.shape)}"
        )
    if likelihood.device != accuracy.device:
        raise ValueError(f"likelihood is on {likelihood.device} but accuracy on {accuracy.device}")
    group_size = _group_size(group_size, accuracy.numel(), "accuracy")
    coef = _finite_float(coef, "coef")
    likelihood_cap = _finite_float(likelihood_cap, "likelihood_cap")
    accuracy_floor = _finite_float(accuracy_floor, "accuracy_floor")
    margin = 0.0 if margin is None else _finite_float(margin, "margin")
    dtype = torch.promote_types(_as_compute(accuracy).dtype, _as_compute(likelihood).dtype)
    acc = accuracy.detach().to(dtype)
    lik = likelihood.detach().to(dtype)
    if acc.numel() == 0:
        return torch.empty(0, dtype=torch.float32, device=acc.device)
    op = native_op("care_bonus", acc.device)
    if op is not None:
        return op(acc, lik, group_size, coef, likelihood_cap, accuracy_floor, margin)
    return _ref.care_bonus(acc, lik, group_size, coef, likelihood_cap, accuracy_floor, margin)
