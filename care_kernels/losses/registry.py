"""Loss types by name: each is a normalizer turning the per-token loss into the scalar loss.

    @register_loss_type("seq_sum")
    def seq_sum(per_token_loss, mask, *, max_completion_length, num_items_in_batch):
        return (per_token_loss * mask).sum(-1).mean()

    loss, metrics = ck.policy_loss(logp, adv, mask, loss_type="seq_sum")

A normalizer receives `per_token_loss [B, T]` (float32, finite at every position: masked-out positions
hold a finite placeholder, so always multiply by the mask) and `mask [B, T]` (float32, 1 for a
completion token, 0 for padding, or the caller's weights), plus the keyword arguments
`max_completion_length` and `num_items_in_batch` exactly as passed to `policy_loss`, and returns a 0-dim
tensor. It must keep each token's contribution linear in that token's loss (a weighted sum), which is what
`FusedLinearGRPOLoss` relies on to take per-token gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Protocol

import torch


class Normalizer(Protocol):
    def __call__(
        self,
        per_token_loss: torch.Tensor,
        mask: torch.Tensor,
        *,
        max_completion_length: int | None,
        num_items_in_batch,
    ) -> torch.Tensor: ...


_REGISTRY: dict[str, Normalizer] = {}

LOSS_TYPES: MappingProxyType[str, Normalizer] = MappingProxyType(_REGISTRY)
"""Read-only view name -> normalizer of every registered loss type (it reflects later registrations)."""


def register_loss_type(name: str, normalizer: Normalizer | None = None, *, overwrite: bool = False):
    """Register `normalizer` as loss type `name`; usable as a decorator (`@register_loss_type("name")`).

    Returns the normalizer. Registering an existing name raises ValueError unless `overwrite=True`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str (the loss_type to pass to policy_loss), got {name!r}")

    def register(fn: Normalizer) -> Normalizer:
        if not callable(fn):
            raise ValueError(
                f"the normalizer of loss type {name!r} must be callable, got {type(fn).__name__}"
            )
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not fn:
            raise ValueError(
                f"loss type {name!r} is already registered; pass overwrite=True to replace it, "
                "or pick another name"
            )
        _REGISTRY[name] = fn
        return fn

    return register if normalizer is None else register(normalizer)


def get_loss_type(name: str) -> Callable[..., torch.Tensor]:
    """The normalizer of `name`, or ValueError listing the registered ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(k) for k in _REGISTRY)
        raise ValueError(
            f"unknown loss_type {name!r}; pass one of {valid} (or register a new one with register_loss_type)"
        ) from None
