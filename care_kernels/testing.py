"""Helpers for testing kernels the way this project requires.

A kernel's error against a float64 ground truth must be at most `factor` times the error of the
same-dtype naive torch computation, plus a small absolute floor (so an exact baseline does not demand
an exact kernel).
"""

from __future__ import annotations

import torch


def max_abs_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - truth.double()).abs().max().item()


def assert_error_within(
    actual: torch.Tensor,
    truth: torch.Tensor,
    baseline: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float = 1e-5,
    name: str = "value",
) -> None:
    """Assert max|actual - truth| <= factor * max|baseline - truth| + floor * (1 + max|truth|)."""
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = max_abs_error(actual, truth)
    base = max_abs_error(baseline, truth)
    scale = truth.double().abs().max().item() if truth.numel() else 0.0
    limit = factor * base + floor * (1.0 + scale)
    assert err <= limit, f"{name}: error {err:.3e} > {factor} x baseline error {base:.3e} + floor (limit {limit:.3e})"
