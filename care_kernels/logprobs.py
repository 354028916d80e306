"""Per-token log-probabilities (and entropy) straight from hidden states and the LM-head weight.

    logprobs = ck.linear_logprobs(hidden, lm_head.weight, targets)
    # == log_softmax((hidden @ W.T + b).float() / T, -1).gather(-1, targets[..., None])[..., 0]

The `[N, V]` logits are never materialized, forward or backward. The op is a pair of torch.library custom
ops (`care_kernels::linear_logprobs_fwd` / `_bwd`) with fake implementations and registered autograd, so it
works under torch.compile whichever backend (`impl`) computes it.
"""

from __future__ import annotations

from typing import Optional

import torch

from care_kernels import _validate, backends

Tensor = torch.Tensor


def _empty(like: Tensor) -> Tensor:
    """The [0] placeholder for an absent output (ref_logprobs, grad_bias), in the outputs' dtype."""
    return like.new_empty(0, dtype=_out_dtype(like))


def _out_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _lse_dtype(hidden: Tensor, impl: str) -> torch.dtype:
    """The C++ kernel keeps the logsumexp it saves for the backward in float64 (cpu_backend.forward says why)."""
    return torch.float64 if impl == "cpp" else _out_dtype(hidden)


@torch.library.custom_op("care_kernels::linear_logprobs_fwd", mutates_args=())
def _fwd_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    ref_hidden: Optional[Tensor],
    ref_weight: Optional[Tensor],
    ref_bias: Optional[Tensor],
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    check_values: bool,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (logprobs [N], entropy [N], lse [N], ref_logprobs [N] or [0]), float32 (lse float64 from "cpp")."""
    n = hidden.shape[0]
    if n > 0 and check_values:
        _validate.check_values(hidden, targets, weight.shape[0], ignore_index, ref_hidden)
    elif n > 0:  # without the host sync: the range only (an out-of-range target would read out of bounds)
        _validate.check_target_range(targets, weight.shape[0], ignore_index)
    if n == 0:
        e = hidden.new_zeros(0, dtype=_out_dtype(hidden))
        lse = hidden.new_zeros(0, dtype=_lse_dtype(hidden, impl))
        return e, e.clone(), lse, e.clone() if ref_weight is not None else _empty(hidden)
    with torch.no_grad():  # the backends compute; autograd is this op's registered backward
        logprobs, entropy, lse, ref_logprobs = backends.module(impl).forward(
            hidden, weight, bias, targets, temperature=temperature, ignore_index=ignore_index,
            with_entropy=with_entropy, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
        )
    ref_logprobs = _empty(hidden) if ref_logprobs is None else ref_logprobs
    return logprobs, entropy, lse, ref_logprobs


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature, ignore_index,
      with_entropy, check_values, impl):
    n = hidden.shape[0]
    out = hidden.new_empty(n, dtype=_out_dtype(hidden))
    ref = hidden.new_empty(n, dtype=_out_dtype(hidden)) if ref_weight is not None else _empty(hidden)
    return out, out.new_empty(n), out.new_empty(n, dtype=_lse_dtype(hidden, impl)), ref


@torch.library.custom_op("care_kernels::linear_logprobs_bwd", mutates_args=())
def _bwd_op(
    grad_logprobs: Tensor,
    grad_entropy: Optional[Tensor],
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    temperature: float,
    ignore_index: int,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or [0]) in the inputs' dtypes."""
    if hidden.shape[0] == 0:
        gb = torch.zeros_like(bias) if bias is not None else _empty(hidden)
        return torch.zeros_like(hidden), torch.zeros_like(weight), gb
    with torch.no_grad():
        gh, gw, gb = backends.module(impl).backward(
            grad_logprobs.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
            hidden, weight, bias, targets, lse, entropy, temperature=temperature, ignore_index=ignore_index,
        )
    return gh, gw, _empty(hidden) if gb is None else gb


@_bwd_op.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
      impl):
    gb = torch.empty_like(bias) if bias is not None else _empty(hidden)
    return torch.empty_like(hidden), torch.empty_like(weight), gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, _, _, _, temperature, ignore_index, with_entropy, _, impl = inputs
    _, entropy, lse, _ = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.with_entropy, ctx.impl = temperature, ignore_index, with_entropy, impl


def _backward(ctx, grad_logprobs, grad_entropy, _grad_lse, _grad_ref):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(lse)
    if not ctx.with_entropy:
        grad_entropy = None
    gh, gw, gb = _bwd_op(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy,
                         ctx.temperature, ctx.ignore_index, ctx.impl)
    return gh, gw, (gb if bias is not None else None), None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _run(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature, ignore_index,
         return_entropy, impl, check_finite):
    _validate.check_head(hidden, weight, bias, "hidden", "weight", "bias")
    _validate.check_targets(targets, hidden)
    if ref_weight is not None:
        _validate.check_head(ref_hidden, ref_weight, ref_bias, "ref_hidden", "ref_weight", "ref_bias")
        if ref_hidden.shape != hidden.shape or ref_hidden.device != hidden.device:
            raise ValueError(
                f"ref_hidden must have hidden's shape {tuple(hidden.shape)} and device, got "
                f"{tuple(ref_hidden.shape)} on {ref_hidden.device}"
            )
        if ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(
                f"ref_weight must have weight's vocabulary size {weight.shape[0]}, got {ref_weight.shape[0]}"
            )
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    temperature = _validate.check_temperature(temperature)
    impl = backends.resolve(impl, hidden.device, hidden.dtype)
    lead_shape = hidden.shape[:-1]
    flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1]).contiguous()
    contig = lambda x: None if x is None else x.contiguous()
    ref_h = None if ref_weight is None else flat(ref_hidden).detach()
    logprobs, entropy, _, ref_logprobs = _fwd_op(
        flat(hidden), contig(weight), contig(bias), targets.reshape(-1).to(torch.int64).contiguous(),
        ref_h, None if ref_weight is None else contig(ref_weight).detach(),
        None if ref_bias is None else contig(ref_bias).detach(),
        temperature, ignore_index, bool(return_entropy), bool(check_finite), impl,
    )
    ref_logprobs = ref_logprobs.detach().view(lead_shape) if ref_weight is not None else None
    return logprobs.view(lead_shape), entropy.view(lead_shape), ref_logprobs


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
    check_finite: bool = True,
):
    """Log-probabilities of `targets` under softmax((hidden @ weight.T + bias) / temperature).

    Args:
        hidden: [..., H] float32 / bfloat16 / float16 (float64 for gradcheck).
        weight: [V, H], hidden's dtype (the LM head's `nn.Linear.weight`).
        targets: [...] (hidden's shape without H) int64 in [0, V) or == ignore_index.
        bias: [V] or None.
        temperature: > 0; logits are divided by it before the softmax (the gradient carries 1/T).
        return_entropy: also return the entropy of the tempered distribution, differentiable.
        impl: "auto" (Triton on CUDA, the C++ kernel on CPU when built, else torch), "triton", "cpp", "torch".
        check_finite: validate targets' range and that hidden is finite (one host sync); pass False
            in a hot loop whose inputs you trust. Without it, non-finite hidden rows give NaN in their own
            outputs only, and the targets' range is still checked: a ValueError on CPU, a device-side assert
            (no host sync) on GPU.

    Returns:
        logprobs float32 [...] (0.0 at ignored targets), and entropy float32 [...] when return_entropy.
        Equivalent to
        `log_softmax((hidden @ weight.T + bias).float() / temperature, -1).gather(-1, targets[..., None])[..., 0]`
        without ever building the [N, V] logits: workspace is O(N) plus a tile buffer whose size is bounded
        whatever N x V is (at most 1 GiB on GPU; it covers all of N x V only when that is below the bound).
        Gradients w.r.t. hidden, weight and bias flow through both outputs and come back in their dtypes
        (once: the op is not twice differentiable).
    """
    logprobs, entropy, _ = _run(hidden, weight, bias, targets, None, None, None, temperature, ignore_index,
                                return_entropy, impl, check_finite)
    return (logprobs, entropy) if return_entropy else logprobs


def dual_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
    check_finite: bool = True,
):
    """Policy and reference log-probs of the same targets in one pass over the vocabulary.

    hidden/ref_hidden [..., H], weight/ref_weight [V, H] (the reference may have another dtype, e.g. an
    fp32 EMA head beside a bf16 policy), targets [...]. Returns `(logprobs, ref_logprobs)` or
    `(logprobs, ref_logprobs, entropy)`, float32 [...]. `logprobs` (and entropy) are differentiable as in
    `linear_logprobs`; `ref_logprobs` never carries gradient. Equivalent to
    `(linear_logprobs(hidden, weight, targets, bias),
      linear_logprobs(ref_hidden, ref_weight, targets, ref_bias).detach())`.
    """
    if ref_weight is None or ref_hidden is None:
        raise ValueError("dual_linear_logprobs needs ref_hidden and ref_weight; use linear_logprobs for one model")
    logprobs, entropy, ref_logprobs = _run(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                                           temperature, ignore_index, return_entropy, impl, check_finite)
    return (logprobs, ref_logprobs, entropy) if return_entropy else (logprobs, ref_logprobs)
