"""The native CPU backend of the log-prob op: thin wrappers over `torch.ops.care_kernels.*_cpu`.

The kernels (csrc/cpu/linear_logprobs.cpp) are blocked over tokens and the vocabulary: one GEMM per tile
through ATen's BLAS, fused OpenMP/SIMD epilogues for the online statistics and for dlogits, fp32 gradient
accumulation, and never an `[N, V]` buffer. For 2-D, contiguous, validated inputs:

    z        = (hidden @ weight.T + bias).float() / temperature
    lse      = logsumexp(z, -1)                                 (float64: the backward splits it into two floats)
    logprobs = z.gather(-1, targets[:, None])[:, 0] - lse            (0 at ignored targets)
    entropy  = lse - (softmax(z) * z).sum(-1)                         (0 at ignored targets)

This module also registers the fake (meta) implementations of those ops for torch.compile; importing it
without the extension is harmless (`available()` is then False).
"""

from __future__ import annotations

import torch

from care_kernels import _ext

_OPS = ("linear_logprobs_fwd_cpu", "linear_logprobs_bwd_cpu", "logits_stats_cpu", "logits_grad_cpu_")


def isa() -> str | None:
    """The build of the row epilogues in use ('avx512', 'avx2', 'default'), or None without the extension.

    It follows ATen's choice (`torch.backends.cpu.get_cpu_capability()`, so `ATEN_CPU_CAPABILITY=avx2`
    emulates an AVX2 machine); every build returns the same bits, only the speed differs.
    """
    module = _ext.native("_C")
    return module.cpu_isa() if module is not None and hasattr(module, "cpu_isa") else None


def available() -> bool:
    """True when the native extension is loaded and was built with these ops."""
    return _ext.native("_C") is not None and all(hasattr(torch.ops.care_kernels, name) for name in _OPS)


def _ops():
    if not available():
        raise RuntimeError(
            "care_kernels' native CPU ops are not available: "
            + (_ext.why_not("_C") or "the extension was built without csrc/cpu/linear_logprobs.cpp")
            + "; reinstall with `pip install .` or use impl='torch'"
        )
    return torch.ops.care_kernels


def forward(
    hidden,
    weight,
    bias,
    targets,
    *,
    temperature,
    ignore_index,
    with_entropy,
    ref_hidden=None,
    ref_weight=None,
    ref_bias=None,
):
    """Per-token log-probs, entropy and logsumexp of the tempered logits, plus the reference's log-probs.

    hidden [N, H] (float32 / bfloat16 / float16, or float64 for gradcheck), weight [V, H] of hidden's dtype,
    bias [V] or None, targets [N] int64 in [0, V) or == ignore_index; ref_hidden [N, H'] and ref_weight
    [V, H'] (any one floating dtype, may differ from the policy's), ref_bias [V] or None.

    Returns (logprobs [N], entropy [N] (zeros unless with_entropy), lse [N], ref_logprobs [N] or None),
    float32 (float64 for float64 inputs), lse always float64: rounding it to float32 would scale a whole row's
    softmax in the backward by one common error, which the gradient's sums over the vocabulary do not average
    out. The matmuls run in the inputs' dtype, the statistics in fp32. Rows with an ignored target are
    skipped entirely: all four outputs are 0 there. Deterministic: the same inputs and thread count give the
    same bits (csrc/cpu/linear_logprobs.cpp).
    """
    logprobs, entropy, lse, ref_logprobs = _ops().linear_logprobs_fwd_cpu(
        hidden,
        weight,
        bias,
        targets,
        ref_hidden,
        ref_weight,
        ref_bias,
        float(temperature),
        int(ignore_index),
        bool(with_entropy),
    )
    return logprobs, entropy, lse, (ref_logprobs if ref_weight is not None else None)


def backward(
    grad_logprobs,
    grad_entropy,
    hidden,
    weight,
    bias,
    targets,
    lse,
    entropy,
    *,
    temperature,
    ignore_index,
    bias_requires_grad=None,
):
    """Gradients of sum(grad_logprobs * logprobs + grad_entropy * entropy) w.r.t. hidden, weight and bias.

    grad_logprobs [N], grad_entropy [N] or None, lse (float64, or float32 at a small cost in accuracy) and
    entropy [N] as returned by `forward`.
    With p = softmax(z):  dz_j = g_lp (1[j == y] - p_j) - g_ent p_j (z_j - lse + entropy),
    dlogits = dz / temperature, grad_hidden = dlogits @ weight, grad_weight = dlogits.T @ hidden,
    grad_bias = dlogits.sum(0); ignored rows contribute nothing. Accumulated in fp32, returned in the
    inputs' dtypes: (grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or None).
    `bias_requires_grad` (default: bias is not None) skips the bias gradient when False.
    """
    want_bias = (
        bias is not None if bias_requires_grad is None else bool(bias_requires_grad and bias is not None)
    )
    grad_hidden, grad_weight, grad_bias = _ops().linear_logprobs_bwd_cpu(
        grad_logprobs,
        grad_entropy,
        hidden,
        weight,
        bias,
        targets,
        lse,
        entropy,
        float(temperature),
        int(ignore_index),
        want_bias,
    )
    return grad_hidden, grad_weight, (grad_bias if want_bias else None)


def logits_stats(logits, targets, *, temperature, ignore_index, with_entropy):
    """logits [n, V] float32 (raw: bias added, not divided by T), targets [n] -> (logprobs, entropy, lse) [n].

    lse is float64 (see `forward`), the others have the logits' dtype.

    Equivalent to `z = logits / T; lse = logsumexp(z); logprobs = z.gather(targets) - lse;
    entropy = lse - (softmax(z) * z).sum(-1)`, logprobs and entropy 0 at ignored targets (lse is kept).
    """
    return _ops().logits_stats_cpu(logits, targets, float(temperature), int(ignore_index), bool(with_entropy))


def logits_grad_(logits, targets, lse, entropy, grad_logprobs, grad_entropy, *, temperature, ignore_index):
    """Overwrite logits [n, V] float32 (raw) in place with dlogits = dz / T (`backward`'s dz), return it.

    lse, entropy, grad_logprobs [n] and grad_entropy [n] or None; rows with an ignored target become 0.
    """
    _ops().logits_grad_cpu_(
        logits, targets, lse, entropy, grad_logprobs, grad_entropy, float(temperature), int(ignore_index)
    )
    return logits


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _register_fakes() -> None:
    """Shapes and dtypes of the ops' outputs, exactly as the C++ kernels produce them (for torch.compile)."""

    @torch.library.register_fake("care_kernels::linear_logprobs_fwd_cpu")
    def _fwd_fake(
        hidden,
        weight,
        bias,
        targets,
        ref_hidden,
        ref_weight,
        ref_bias,
        temperature,
        ignore_index,
        with_entropy,
    ):
        n = hidden.shape[0]
        out = hidden.new_empty(n, dtype=_stat_dtype(hidden))
        ref = hidden.new_empty(n if ref_weight is not None else 0, dtype=_stat_dtype(hidden))
        return out, out.new_empty(n), out.new_empty(n, dtype=torch.float64), ref

    @torch.library.register_fake("care_kernels::linear_logprobs_bwd_cpu")
    def _bwd_fake(
        grad_logprobs,
        grad_entropy,
        hidden,
        weight,
        bias,
        targets,
        lse,
        entropy,
        temperature,
        ignore_index,
        bias_requires_grad,
    ):
        grad_bias = torch.empty_like(bias) if bias_requires_grad else weight.new_empty(0)
        return torch.empty_like(hidden), torch.empty_like(weight), grad_bias

    @torch.library.register_fake("care_kernels::logits_stats_cpu")
    def _stats_fake(logits, targets, temperature, ignore_index, with_entropy):
        n = logits.shape[0]
        return logits.new_empty(n), logits.new_empty(n), logits.new_empty(n, dtype=torch.float64)

    @torch.library.register_fake("care_kernels::logits_grad_cpu_")
    def _grad_fake(logits, targets, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index):
        return None


if available():
    _register_fakes()
