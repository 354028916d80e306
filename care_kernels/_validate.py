"""Input validation at the public boundary: every message names the argument and says what to pass."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(x: torch.Tensor, name: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16 (float64 for gradcheck), got {x.dtype}")


def check_temperature(temperature) -> float:
    """A positive finite Python float. Comparisons only: under torch.compile a float argument that changes
    between calls is symbolic, and `math.isfinite` on it would break the graph."""
    if isinstance(temperature, torch.Tensor) or isinstance(temperature, bool):
        raise ValueError(f"temperature must be a Python float, got {type(temperature).__name__}")
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}") from None
    if not 0.0 < t < math.inf:  # False for NaN too
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
    return t


def check_head(hidden, weight, bias, hidden_name: str, weight_name: str, bias_name: str) -> None:
    """hidden [..., H], weight [V, H], bias [V] | None, all floating, weight/bias of hidden's dtype."""
    check_tensor(hidden, hidden_name)
    check_tensor(weight, weight_name)
    check_float(hidden, hidden_name)
    check_float(weight, weight_name)
    if hidden.dim() < 1:
        raise ValueError(f"{hidden_name} must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must have shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{weight_name} has an empty vocabulary (V = 0); pass the LM head's weight [V, H]")
    if weight.shape[1] == 0:
        raise ValueError(f"{weight_name} has hidden size H = 0; pass the LM head's weight [V, H] with H > 0")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{hidden_name} has hidden size {hidden.shape[-1]} but {weight_name} is {tuple(weight.shape)}: "
            f"pass {weight_name} of shape [V, {hidden.shape[-1]}] (nn.Linear.weight layout)"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"{hidden_name} is {hidden.dtype} but {weight_name} is {weight.dtype}: cast both to one dtype "
            "(for a mixed-precision head under autocast, pass hidden.to(weight.dtype))"
        )
    if hidden.device != weight.device:
        raise ValueError(f"{hidden_name} is on {hidden.device} but {weight_name} on {weight.device}")
    if bias is not None:
        check_tensor(bias, bias_name)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{bias_name} must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(
                f"{bias_name} must have {weight_name}'s dtype and device ({weight.dtype}, {weight.device})"
            )


def check_targets(targets, hidden: torch.Tensor, name: str = "targets") -> None:
    check_tensor(targets, name)
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor (int64) of token ids, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{name} must have the shape of hidden without its last dim, {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"{name} is on {targets.device} but hidden on {hidden.device}")


def check_target_range(targets, vocab_size: int, ignore_index: int) -> None:
    """The target check that stays on with check_finite=False: a target outside [0, V) would read out of bounds.
    On CPU it is the same ValueError as check_values (no sync to save there); on a GPU a device-side assert that
    costs no host sync and fails the next synchronizing call, as torch's own indexing ops do."""
    bad_target = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    if targets.device.type == "cpu":
        if bad_target.any():
            _raise_bad_targets(targets, bad_target, vocab_size, ignore_index)
        return
    torch._assert_async(
        ~bad_target.any(), f"care_kernels: targets must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}"
    )


def _raise_bad_targets(targets, bad_target, vocab_size: int, ignore_index: int):
    pos = bad_target.nonzero()[:5].tolist()
    vals = targets[bad_target][:5].tolist()
    raise ValueError(
        f"targets must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; found {vals} at positions {pos}"
    )


def check_values(hidden, targets, vocab_size: int, ignore_index: int, ref_hidden=None) -> None:
    """Value checks that need the data: one host sync for all of them.

    targets must lie in [0, V) or equal ignore_index; hidden (and ref_hidden) must be finite. Both
    failures would otherwise show up as an out-of-bounds read or as NaN log-probs far from the cause.
    """
    bad_target = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    flags = [bad_target.any(), ~torch.isfinite(hidden).all()]
    if ref_hidden is not None:
        flags.append(~torch.isfinite(ref_hidden).all())
    found = torch.stack(flags).tolist()
    if found[0]:
        _raise_bad_targets(targets, bad_target, vocab_size, ignore_index)
    for flag, name, x in zip(found[1:], ("hidden", "ref_hidden"), (hidden, ref_hidden)):
        if flag:
            rows = (~torch.isfinite(x)).reshape(-1, x.shape[-1]).any(-1).nonzero()[:5, 0].tolist()
            raise ValueError(
                f"{name} contains NaN or inf (flattened rows {rows}); the model's forward diverged "
                "before the LM head. Pass check_finite=False to skip this check (and its host sync)."
            )
