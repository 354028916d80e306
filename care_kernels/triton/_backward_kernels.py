"""Backward Triton kernels: the gradient w.r.t. the logits of a column chunk, and an fp32-accumulating matmul.

`dlogits_kernel` recomputes a logits tile with the same `tl.dot` K-loop as the forward (one tile per
program, or persistent programs with the forward's flat loop and optional TMA loads) and turns it in
registers into

    p = exp(z - lse),  dz = g_lp * (1[j == y] - p) - g_ent * p * (z - lse + entropy),  dlogits = dz / T

for a column chunk [col_begin, col_begin + n_cols) of the vocabulary, stored into a [N, n_cols] slab that the
launcher hands to two GEMMs (see linear_logprobs.backward for why the slab exists).

`logits_slab_grad_kernel` is the same epilogue over logits that cuBLAS computed (the `cublas` strategy, see
logits_gemm).

`matmul_accumulate_kernel` is C (+)= A @ B with an fp32 C, for when cuBLAS cannot write fp32 from 16-bit
inputs (fp32_gemm): the dH accumulation across column chunks, and the fp32 logits slabs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from care_kernels.triton._forward_kernels import (
    _k_step_operands,
    _mma,
    _tma_k_step_operands,
    _tma_logits_tile,
    logits_tile,
)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Ignored rows get this lse (in base-2 units): p underflows to 0 and every product stays finite.
BIG_LSE = tl.constexpr(1.0e30)


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """1-D program id -> (tile row, tile col), in bands of GROUP_M tile rows for L2 reuse."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_in_group = pid % num_pid_in_group
    return first_pid_m + pid_in_group % group_size_m, pid_in_group // group_size_m


@triton.jit
def _store_dlogits(
    acc,
    pid_m,
    pid_n,
    b_ptr,
    tgt_ptr,
    lse_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    dz_ptr,
    N,
    V,
    col_begin,
    n_cols,
    scale2,
    inv_temp,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The epilogue of tile (pid_m, pid_n): fp32 logits (no bias yet) -> dlogits, stored into dz [N, n_cols]."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows_ld = tl.minimum(rows, N - 1).to(tl.int64)
    local_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = local_cols < n_cols
    cols = col_begin + local_cols
    if HAS_BIAS:
        acc += tl.load(b_ptr + tl.minimum(cols, V - 1).to(tl.int64)).to(tl.float32)[None, :]

    tgt = tl.load(tgt_ptr + rows_ld)
    valid = (tgt != ignore_index) & row_mask
    lse2 = tl.where(valid, tl.load(lse_ptr + rows_ld) * LOG2E, BIG_LSE)
    g_lp = tl.where(valid, tl.load(glp_ptr + rows_ld), 0.0)
    zc = acc * scale2 - lse2[:, None]  # (z - lse) in base-2 units
    p = tl.exp2(zc)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.where(valid, tl.load(gent_ptr + rows_ld), 0.0)
        ent = tl.where(valid, tl.load(ent_ptr + rows_ld), 0.0)
        dz = -p * (g_lp[:, None] + g_ent[:, None] * (zc * LN2 + ent[:, None]))
    else:
        dz = -p * g_lp[:, None]
    dz = tl.where(cols[None, :] == tgt[:, None], dz + g_lp[:, None], dz) * inv_temp

    out = dz_ptr + rows.to(tl.int64)[:, None] * n_cols + local_cols[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def dlogits_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    tgt_ptr,
    lse_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    dz_ptr,
    h_desc,
    w_desc,
    N,
    H,
    V,
    col_begin,
    n_cols,
    scale2,
    inv_temp,
    ignore_index,
    N_CLASS,  # unused in the body: an autotuning key (size class of N)
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
    USE_TMA: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # unused in the body: the launcher sizes a PERSISTENT grid with it
    WARP_SPECIALIZE: tl.constexpr,
):
    """Writes the dlogits chunk into dz [N, n_cols], tile by tile (grouped order, see _grouped_tile).

    Grid: one program per tile, or with PERSISTENT fewer programs (a few per SM), each taking every
    num_programs-th tile in one flat loop over (tile, K step) so the next tile's loads fly during an
    epilogue (as in the forward's flat loop). USE_TMA (persistent only): operands through the descriptors
    h_desc / w_desc (blocks [BLOCK_M, BLOCK_K] / [BLOCK_N, BLOCK_K]; None when the launch cannot use TMA),
    or, with WARP_SPECIALIZE, through descriptors the kernel builds itself.
    WARP_SPECIALIZE (persistent, TMA; Hopper): a loop over tiles with a K-loop inside, which Triton splits into
    a producer warp group (TMA copies, stages ahead, across tiles) and two consumer warp groups (wgmma and the
    epilogue, 64 rows each). Its descriptors are built in the kernel: Triton's warp specialization takes those
    (and 3.8 rejects the host ones); they need the global-scratch allocator, 128 bytes each per program.
    """
    tl.static_assert(PERSISTENT or not USE_TMA, "the TMA operand path exists in the persistent loop only")
    tl.static_assert(not WARP_SPECIALIZE or (PERSISTENT and USE_TMA), "warp specialization: persistent TMA only")
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(N, BLOCK_M)
    num_pid_n = tl.cdiv(n_cols, BLOCK_N)
    if WARP_SPECIALIZE:
        h_dev = tl.make_tensor_descriptor(h_ptr, shape=[N, H], strides=[H, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_dev = tl.make_tensor_descriptor(w_ptr, shape=[V, H], strides=[H, 1], block_shape=[BLOCK_N, BLOCK_K])
        for tile in tl.range(pid, num_pid_m * num_pid_n, tl.num_programs(0), warp_specialize=True):
            pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
            acc = _tma_logits_tile(h_dev, w_dev, pid_m * BLOCK_M, col_begin + pid_n * BLOCK_N, H, BLOCK_M, BLOCK_N,
                                   BLOCK_K, UPCAST, IEEE)  # fmt: skip
            _store_dlogits(
                acc, pid_m, pid_n, b_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr, N, V,
                col_begin, n_cols, scale2, inv_temp, ignore_index, HAS_BIAS, HAS_GRAD_ENTROPY, BLOCK_M, BLOCK_N,
            )  # fmt: skip
    elif PERSISTENT:
        num_programs = tl.num_programs(0)
        k_steps = tl.cdiv(H, BLOCK_K)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        tile = pid - num_programs
        pid_m, pid_n = _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)  # typed loop state; set again at ki == 0
        rows_ld = tl.zeros([BLOCK_M], dtype=tl.int64)
        cols_ld = tl.zeros([BLOCK_N], dtype=tl.int64)
        ki = -1
        for _ in range(0, k_steps * tl.cdiv(num_pid_m * num_pid_n - pid, num_programs)):
            ki = tl.where(ki == k_steps - 1, 0, ki + 1)
            if ki == 0:
                tile += num_programs
                pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
                rows_ld = tl.minimum(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), N - 1).to(tl.int64)
                cols_ld = tl.minimum(col_begin + pid_n * BLOCK_N + tl.arange(0, BLOCK_N), V - 1).to(tl.int64)
            if USE_TMA:
                a, b = _tma_k_step_operands(
                    h_desc, w_desc, pid_m * BLOCK_M, col_begin + pid_n * BLOCK_N, ki * BLOCK_K, UPCAST
                )
            else:
                a, b = _k_step_operands(h_ptr, w_ptr, rows_ld, cols_ld, ki * BLOCK_K, H, offs_k, EVEN_K, UPCAST)
            acc = _mma(a, b, acc, IEEE)
            if ki == k_steps - 1:
                _store_dlogits(
                    acc, pid_m, pid_n, b_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr, N, V,
                    col_begin, n_cols, scale2, inv_temp, ignore_index, HAS_BIAS, HAS_GRAD_ENTROPY, BLOCK_M, BLOCK_N,
                )  # fmt: skip
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        pid_m, pid_n = _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
        rows_ld = tl.minimum(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), N - 1).to(tl.int64)
        cols_ld = tl.minimum(col_begin + pid_n * BLOCK_N + tl.arange(0, BLOCK_N), V - 1).to(tl.int64)
        acc = logits_tile(h_ptr, w_ptr, rows_ld, cols_ld, H, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, IEEE)
        _store_dlogits(
            acc, pid_m, pid_n, b_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr, N, V,
            col_begin, n_cols, scale2, inv_temp, ignore_index, HAS_BIAS, HAS_GRAD_ENTROPY, BLOCK_M, BLOCK_N,
        )  # fmt: skip


@triton.jit
def matmul_accumulate_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bk,
    stride_cm,
    ACCUMULATE: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, N] (fp32) = (C if ACCUMULATE else 0) + A[M, K] @ B[K, N]; unit inner strides; 1-D grid."""
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ld = tl.minimum(rows, M - 1).to(tl.int64)
    cols_ld = tl.minimum(cols, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_ld[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk + cols_ld[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_mask = offs_k < K - k
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0)
    tl.store(c_ptrs, acc, mask=mask)


@triton.jit
def logits_slab_grad_kernel(
    z_ptr,
    b_ptr,
    tgt_ptr,
    lse_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    dz_ptr,
    N,
    V,
    col_begin,
    n_cols,
    scale2,
    inv_temp,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(N, BLOCK_M), cdiv(n_cols, BLOCK_N)). dlogits of columns [col_begin, col_begin + n_cols) from
    logits someone else multiplied out: z [N, n_cols] fp32 or 16-bit, contiguous, bias not added -> dz [N, n_cols],
    which may be z itself (each program reads its tile before it writes it).

    dlogits_kernel's epilogue with a load in place of its K-loop: the backward that runs the recompute GEMM in
    cuBLAS (care_kernels.triton.cublas_logits) turns its slab into dlogits here.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows_ld = tl.minimum(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), N - 1).to(tl.int64)
    local_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.load(z_ptr + rows_ld[:, None] * n_cols + local_cols[None, :], mask=(local_cols < n_cols)[None, :],
                  other=0.0).to(tl.float32)  # fmt: skip
    _store_dlogits(
        acc, pid_m, pid_n, b_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr, N, V,
        col_begin, n_cols, scale2, inv_temp, ignore_index, HAS_BIAS, HAS_GRAD_ENTROPY, BLOCK_M, BLOCK_N,
    )  # fmt: skip
