"""Helpers for testing kernels the way this project requires.

A kernel's error against a float64 ground truth must be at most `factor` times the error of the
same-dtype naive torch computation, plus a small absolute floor (so an exact baseline does not demand
an exact kernel), plus, for an output in a 16-bit dtype, the error of the truth rounded to that dtype:
no kernel that returns bf16 can do better than the correctly rounded answer, while a naive baseline with
a handful of elements can land closer by luck.
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 24  # elements compared at a time: float64 temporaries of 128 MiB, whatever the tensors' size


def max_abs_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """max |actual - truth| in float64 (computed a chunk at a time)."""
    if actual.numel() == 0:
        return 0.0
    a, t = actual.reshape(-1), truth.reshape(-1)
    return max((a[i : i + _CHUNK].double() - t[i : i + _CHUNK].double()).abs().max().item()
               for i in range(0, a.numel(), _CHUNK))  # fmt: skip


def _max_abs(x: torch.Tensor) -> float:
    flat = x.reshape(-1)
    return max(flat[i : i + _CHUNK].double().abs().max().item() for i in range(0, flat.numel(), _CHUNK))


def _rounding_error(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """max |truth.to(dtype) - truth| (chunked)."""
    flat = truth.reshape(-1)
    return max((flat[i : i + _CHUNK].to(dtype).double() - flat[i : i + _CHUNK].double()).abs().max().item()
               for i in range(0, flat.numel(), _CHUNK))  # fmt: skip


def assert_error_within(
    actual: torch.Tensor,
    truth: torch.Tensor,
    baseline: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float = 1e-6,
    name: str = "value",
) -> None:
    """Assert max|actual - truth| <= factor * max|baseline - truth| + floor * (1 + max|truth|)
    (+ max|truth.to(actual.dtype) - truth| when actual is bf16 or fp16)."""
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = max_abs_error(actual, truth)
    base = max_abs_error(baseline, truth)
    scale = _max_abs(truth) if truth.numel() else 0.0
    sixteen_bit = actual.dtype in (torch.bfloat16, torch.float16) and truth.numel()
    rounding = _rounding_error(truth, actual.dtype) if sixteen_bit else 0.0
    limit = factor * base + floor * (1.0 + scale) + rounding
    assert err <= limit, (
        f"{name}: error {err:.3e} > {factor} x baseline error {base:.3e} + floor + output rounding {rounding:.3e} "
        f"(limit {limit:.3e})"
    )
