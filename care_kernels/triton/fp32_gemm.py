"""`addmm_fp32_`: a 16-bit GEMM accumulated and written in fp32, by cuBLAS where this torch can, else by Triton.

    acc = (acc if accumulate else 0) + a.float() @ b.float()     # with the products' fp32 accumulation, no copy

Used for the backward's fp32 dH accumulator, the fused GRPO head's fp32 dW, and the fp32 logits slabs of the
cuBLAS strategy (cublas_logits: forward and backward).
"""

from __future__ import annotations

import os

import torch
import triton

from care_kernels.triton._backward_kernels import matmul_accumulate_kernel

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_GROUP_M = 8
# The Triton fallback's tile on GPU (sm90_report compiles it); under the interpreter, where every program costs
# ~ms whatever its size, one big tile.
MATMUL_CONFIG_16 = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3)

_cublas_fp32_out: dict[tuple[int, torch.dtype], bool] = {}


def cublas_writes_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch's `addmm(acc, a, b, out_dtype=float32, out=acc)` accumulates 16-bit a @ b into fp32.

    Checked once per (device, dtype) on small integer-valued matrices (exact in every dtype), so an old torch
    without the overload, or one with different in-place semantics, falls back to the Triton kernel.
    """
    if device.type != "cuda":
        return False
    key = (device.index if device.index is not None else torch.cuda.current_device(), dtype)
    if key not in _cublas_fp32_out and torch.cuda.is_current_stream_capturing():
        return False  # the probe syncs, which a CUDA graph capture forbids: ask again after the capture
    if key not in _cublas_fp32_out:
        a = ((torch.arange(64 * 48, device=device) % 7) - 3).reshape(64, 48).to(dtype)
        b = ((torch.arange(48 * 32, device=device) % 5) - 2).reshape(48, 32).to(dtype)
        want = a.double() @ b.double()
        try:
            acc = torch.ones(64, 32, device=device)
            torch.addmm(acc, a, b, out_dtype=torch.float32, beta=1, out=acc)
            fresh = torch.full((64, 32), float("nan"), device=device)
            torch.addmm(fresh, a, b, out_dtype=torch.float32, beta=0, out=fresh)
            works = bool(torch.equal(acc.double(), want + 1) and torch.equal(fresh.double(), want))
        except (RuntimeError, TypeError):  # no fp32-output 16-bit GEMM in this torch
            works = False
        _cublas_fp32_out[key] = works
    return _cublas_fp32_out[key]


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """acc [M, N] fp32 (unit inner stride) = (acc if accumulate else 0) + a [M, K] @ b [K, N] for 16-bit a, b
    (any strides), with fp32 accumulation throughout; with accumulate=False whatever acc held is ignored.

    cuBLAS when this torch can write fp32 from 16-bit inputs (`addmm(..., out_dtype=float32)`), else Triton.
    """
    if a.is_cuda and cublas_writes_fp32(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=1 if accumulate else 0, out=acc)
        return
    # The Triton kernel reads rows of a and of b with unit stride: a transposed view is copied first.
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    m, k = a.shape
    n = b.shape[1]
    tile = dict(MATMUL_CONFIG_16.kwargs)
    warps, stages = MATMUL_CONFIG_16.num_warps, MATMUL_CONFIG_16.num_stages
    if _INTERPRET:
        tile, warps, stages = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=min(128, triton.next_power_of_2(max(k, 16)))), 4, 1
    grid = (triton.cdiv(m, tile["BLOCK_M"]) * triton.cdiv(n, tile["BLOCK_N"]),)
    matmul_accumulate_kernel[grid](
        a, b, acc, m, n, k, a.stride(0), b.stride(0), acc.stride(0),
        ACCUMULATE=accumulate, EVEN_K=k % tile["BLOCK_K"] == 0, UPCAST=_INTERPRET, GROUP_M=_GROUP_M, **tile,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
