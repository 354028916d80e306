"""Choosing the implementation of the log-prob op: `impl="auto" | "triton" | "cpp" | "torch"`.

Every backend module exposes the same two functions, `forward(...)` and `backward(...)`, with the
signatures of `care_kernels.reference.linear_logprobs` (2-D, contiguous, validated inputs).
"""

from __future__ import annotations

import importlib
import os

import torch

from care_kernels import _ext

IMPLS = ("auto", "triton", "cpp", "torch")

_MODULES = {
    "torch": "care_kernels.reference.linear_logprobs",
    "cpp": "care_kernels.cpu_backend",
    "triton": "care_kernels.triton.linear_logprobs",
}


def triton_status() -> tuple[bool, str]:
    """(is Triton usable for tensors on this machine, why not)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install triton)"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 before importing care_kernels to interpret on CPU)"


def cpp_status() -> tuple[bool, str]:
    if not _ext.cpu_available():
        return False, _ext.why_not("_C")
    if not hasattr(torch.ops.care_kernels, "linear_logprobs_fwd_cpu"):
        return False, "the extension was built without csrc/cpu/linear_logprobs.cpp; reinstall with `pip install .`"
    return True, ""


def resolve(impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete implementation for `impl` on `device` (for inputs of `dtype`), or a ValueError saying what to
    pass. Triton computes in float32 at most, so float64 inputs (gradcheck) go to torch on CUDA under "auto"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda" and triton_status()[0] and dtype != torch.float64:
            return "triton"
        if device.type == "cpu" and cpp_status()[0]:
            return "cpp"
        return "torch"
    if impl == "cpp":
        ok, why = cpp_status()
        if not ok:
            raise ValueError(f"impl='cpp' is not available: {why}; pass impl='auto' or impl='torch'")
        if device.type != "cpu":
            raise ValueError(f"impl='cpp' runs on CPU tensors, got tensors on {device}; pass impl='auto'")
    if impl == "triton":
        ok, why = triton_status()
        if not ok:
            raise ValueError(f"impl='triton' is not available: {why}; pass impl='auto' or impl='torch'")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1; pass impl='auto'")
        if dtype == torch.float64:
            raise ValueError(
                "impl='triton' computes in float32 at most: for float64 inputs pass impl='torch' (or 'cpp' on CPU), "
                "or impl='auto'"
            )
    return impl


def module(impl: str):
    """The backend module of a concrete implementation (imported on first use)."""
    return importlib.import_module(_MODULES[impl])
