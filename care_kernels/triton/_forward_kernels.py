"""Forward Triton kernels: online softmax statistics of `hidden @ weight.T`, streamed over the vocabulary.

Every program owns one block of BLOCK_M rows and one split of the vocabulary (a contiguous range of
columns). It walks its split BLOCK_N columns at a time: a `tl.dot` K-loop over H builds the logits tile
in fp32 on chip, and the tile is folded into four running row statistics, all in base-2 units of the
tempered logits `z2 = (hidden @ weight.T + bias) * log2(e) / temperature`:

    m = max z2,   s = sum 2^(z2 - m),   u = sum 2^(z2 - m) * (z2 - m),   t = z2[target]

`u` is kept relative to the running max (not as `sum p * z`) so the entropy `ln2 * (log2 s - u / s)` never
subtracts two large numbers. `t` comes either from a compare and select on every tile, or (GATHER_TARGET) from
one dot product per row outside the tile loop. The per-split statistics go to a small [planes, splits, N] fp32
buffer that the launcher merges. Nothing of size [N, V] exists. `logits_slab_stats_kernel` folds the same way
logits that cuBLAS computed into a bounded slab (the `cublas` and `cublas16` strategies, see logits_gemm).

Offsets are int64 (N*H and V*H can exceed 2^31); the big dimension is on grid axis 0 only.
"""

from __future__ import annotations

import triton
import triton.language as tl

# A finite stand-in for -inf: masked logits get it so that 0 * (z - m) stays 0 instead of NaN.
NEG_BIG = tl.constexpr(-1.0e30)

# Planes of the partial-statistics buffer [planes, splits, N] (the launcher reads them by these numbers).
PLANE_MAX = tl.constexpr(0)
PLANE_SUMEXP = tl.constexpr(1)
PLANE_TARGET = tl.constexpr(2)
PLANE_ENTROPY = tl.constexpr(3)


@triton.jit
def _k_step_operands(h_ptr, w_ptr, rows, cols, k, H, offs_k, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """hidden[rows, k:k+BLOCK_K] and weight[cols, k:k+BLOCK_K] (zeros past H); rows/cols int64, in range."""
    a_ptrs = h_ptr + rows[:, None] * H + (k + offs_k)[None, :]
    b_ptrs = w_ptr + cols[:, None] * H + (k + offs_k)[None, :]
    if EVEN_K:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        k_mask = offs_k < H - k
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[None, :], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def _tma_k_step_operands(h_desc, w_desc, row0, col0, k, UPCAST: tl.constexpr):
    """The same two tiles through Hopper's tensor memory accelerator: one bulk copy each, zeros out of bounds."""
    a = h_desc.load([row0, k])
    b = w_desc.load([col0, k])
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b.T in fp32; IEEE: true fp32 products for fp32 operands (tl.dot would otherwise use TF32)."""
    if IEEE:
        return tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    return tl.dot(a, tl.trans(b), acc)


@triton.jit
def logits_tile(
    h_ptr,
    w_ptr,
    rows,
    cols,
    H,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] tile of hidden[rows] @ weight[cols].T; rows/cols are int64, in range.

    UPCAST: cast loads to fp32 first (the interpreter's bf16 is broken; also mixed-dtype pairs).
    IEEE: true fp32 products for fp32 operands (see _mma).
    """
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        a, b = _k_step_operands(h_ptr, w_ptr, rows, cols, k, H, offs_k, EVEN_K, UPCAST)
        acc = _mma(a, b, acc, IEEE)
    return acc


@triton.jit
def _tma_logits_tile(h_desc, w_desc, row0, col0, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """logits_tile with TMA loads: rows [row0, row0 + BLOCK_M) x columns [col0, col0 + BLOCK_N), zeros outside."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        a, b = _tma_k_step_operands(h_desc, w_desc, row0, col0, k, UPCAST)
        acc = _mma(a, b, acc, IEEE)
    return acc


@triton.jit
def _add_bias(acc, b_ptr, cols_ld, bias_on):
    """acc + bias[cols_ld] along rows; bias_on: False adds nothing (a run-time flag in the warp-specialized dual
    kernel, where one loop serves both models; elsewhere the constant True)."""
    return acc + tl.load(b_ptr + cols_ld, mask=bias_on, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _fold_tile(acc, cols, col_end, target_local, m_i, s_i, u_i, t_i, scale2, WITH_ENTROPY: tl.constexpr,
               SELECT_TARGET: tl.constexpr = True):  # fmt: skip
    """Fold one fp32 logits tile (bias included) into the running (m, s, u, t); columns >= col_end drop out.
    SELECT_TARGET: pick each row's target logit out of the tile (a compare and select on every logit); without
    it t_i is left alone (_gathered_target computes it apart)."""
    z = tl.where((cols < col_end)[None, :], acc * scale2, NEG_BIG)
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    alpha = tl.exp2(m_i - m_new)
    zc = z - m_new[:, None]
    p = tl.exp2(zc)
    if WITH_ENTROPY:
        u_i = alpha * (u_i + (m_i - m_new) * s_i) + tl.sum(p * zc, axis=1)
    s_i = alpha * s_i + tl.sum(p, axis=1)
    if SELECT_TARGET:
        t_i += tl.sum(tl.where(cols[None, :] == target_local[:, None], z, 0.0), axis=1)
    return m_new, s_i, u_i, t_i


@triton.jit
def _gathered_target(h_ptr, w_ptr, b_ptr, bias_on, rows, target_local, H, scale2, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):  # fmt: skip
    """z2 at each row's target where this program's split holds it (target_local >= 0), else 0: one dot product
    hidden[row] . weight[target] (+ bias[target]) per row, in fp32, outside the tile loop. N * H multiply-adds in
    all, where selecting the target out of every tile costs a compare and a select per logit (N * V)."""
    here = target_local >= 0
    cols = tl.where(here, target_local, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        mask = here[:, None]
        if not EVEN_K:
            mask = mask & ((k + offs_k) < H)[None, :]
        a = tl.load(h_ptr + rows[:, None] * H + (k + offs_k)[None, :], mask=mask, other=0.0)
        b = tl.load(w_ptr + cols[:, None] * H + (k + offs_k)[None, :], mask=mask, other=0.0)
        acc += a.to(tl.float32) * b.to(tl.float32)
    t = tl.sum(acc, axis=1)
    if HAS_BIAS:
        t += tl.load(b_ptr + cols, mask=here & bias_on, other=0.0).to(tl.float32)
    return tl.where(here, t * scale2, 0.0)


@triton.jit
def _split_stats(
    h_ptr,
    w_ptr,
    b_ptr,
    bias_on,
    h_desc,
    w_desc,
    row0,
    rows,
    target_local,
    col_begin,
    col_end,
    H,
    V,
    scale2,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    FLAT_LOOP: tl.constexpr,
    USE_TMA: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    SELECT_TARGET: tl.constexpr,
):
    """Online (m, s, u, t) of z2 over columns [col_begin, col_end); target_local is -1 outside them (t stays 0
    without SELECT_TARGET).
    HAS_BIAS: add b_ptr[cols] where bias_on (see _add_bias).

    Two loop shapes with the same arithmetic, chosen by the autotuner:
    - nested (FLAT_LOOP=False): for each BLOCK_N tile, a K-loop, then the fold. The compiler pipelines
      the K-loop only, so every tile starts with an empty pipeline (its first loads' full latency exposed),
      unless warp-specialized (below: the producer runs ahead across tiles).
    - flat (FLAT_LOOP=True): one loop over (tile, K step) pairs with the fold under `if` on each tile's
      last step, so the pipeliner keeps the next tile's first loads in flight during the fold.
    USE_TMA: operand tiles through the descriptors h_desc / w_desc (block [BLOCK_M or BLOCK_N, BLOCK_K];
    row0 = first row of the block) instead of per-thread pointer loads: no address registers, and
    out-of-range rows and columns arrive as zeros.
    WARP_SPECIALIZE (nested loop with TMA loads; Hopper): the compiler splits the program into a producer
    warp group issuing the TMA copies stages ahead and two consumer warp groups, each multiplying and folding
    half of the BLOCK_M rows with a raised register budget (Triton's automatic warp specialization; 4 warps
    in the config become 12).
    """
    tl.static_assert(not WARP_SPECIALIZE or (USE_TMA and not FLAT_LOOP),
                     "warp specialization is for the nested loop with TMA loads (pointer loads do not compile)")
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    u_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    if FLAT_LOOP:
        k_steps = tl.cdiv(H, BLOCK_K)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        n = col_begin - BLOCK_N
        cols_ld = offs_n.to(tl.int64)
        ki = -1
        for _ in range(0, k_steps * tl.cdiv(col_end - col_begin, BLOCK_N)):
            ki = tl.where(ki == k_steps - 1, 0, ki + 1)
            if ki == 0:
                n += BLOCK_N
                cols_ld = tl.minimum(n + offs_n, V - 1).to(tl.int64)
            if USE_TMA:
                a, b = _tma_k_step_operands(h_desc, w_desc, row0, n, ki * BLOCK_K, UPCAST)
            else:
                a, b = _k_step_operands(h_ptr, w_ptr, rows, cols_ld, ki * BLOCK_K, H, offs_k, EVEN_K, UPCAST)
            acc = _mma(a, b, acc, IEEE)
            if ki == k_steps - 1:
                if HAS_BIAS:
                    acc = _add_bias(acc, b_ptr, cols_ld, bias_on)
                m_i, s_i, u_i, t_i = _fold_tile(
                    acc, n + offs_n, col_end, target_local, m_i, s_i, u_i, t_i, scale2, WITH_ENTROPY, SELECT_TARGET
                )
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        for n in tl.range(col_begin, col_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            cols = n + offs_n
            # Columns past V load row V - 1 instead of masking every K step; their logits are masked below.
            cols_ld = tl.minimum(cols, V - 1).to(tl.int64)
            if USE_TMA:
                acc = _tma_logits_tile(h_desc, w_desc, row0, n, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
            else:
                acc = logits_tile(h_ptr, w_ptr, rows, cols_ld, H, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, IEEE)
            if HAS_BIAS:
                acc = _add_bias(acc, b_ptr, cols_ld, bias_on)
            m_i, s_i, u_i, t_i = _fold_tile(acc, cols, col_end, target_local, m_i, s_i, u_i, t_i, scale2, WITH_ENTROPY,
                                            SELECT_TARGET)  # fmt: skip
    return m_i, s_i, u_i, t_i


@triton.jit
def _score_split(
    h_ptr,
    w_ptr,
    b_ptr,
    bias_on,
    part_ptr,
    h_desc,
    w_desc,
    row0,
    rows,
    row_mask,
    out,
    plane,
    target_local,
    col_begin,
    col_end,
    H,
    V,
    scale2,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    FLAT_LOOP: tl.constexpr,
    USE_TMA: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    GATHER_TARGET: tl.constexpr,
):
    """_split_stats of one model on one (row block, split), stored to its planes of part at `out`; the target
    logits selected out of the tiles, or with GATHER_TARGET one dot product per row after the tile loop."""
    m, s, u, t = _split_stats(
        h_ptr, w_ptr, b_ptr, bias_on, h_desc, w_desc, row0, rows, target_local, col_begin, col_end, H, V, scale2,
        HAS_BIAS, WITH_ENTROPY, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, IEEE, FLAT_LOOP, USE_TMA, WARP_SPECIALIZE,
        not GATHER_TARGET,
    )  # fmt: skip
    if GATHER_TARGET:
        t = _gathered_target(h_ptr, w_ptr, b_ptr, bias_on, rows, target_local, H, scale2, HAS_BIAS, BLOCK_M, BLOCK_K,
                             EVEN_K)  # fmt: skip
    tl.store(part_ptr + PLANE_MAX * plane + out, m, mask=row_mask)
    tl.store(part_ptr + PLANE_SUMEXP * plane + out, s, mask=row_mask)
    tl.store(part_ptr + PLANE_TARGET * plane + out, t, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(part_ptr + PLANE_ENTROPY * plane + out, u, mask=row_mask)


@triton.jit
def linear_logprob_stats_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    part_ptr,
    ref_h_ptr,
    ref_w_ptr,
    ref_b_ptr,
    ref_part_ptr,
    tgt_ptr,
    h_desc,
    w_desc,
    ref_h_desc,
    ref_w_desc,
    N,
    H,
    V,
    num_splits,
    split_cols,
    scale2,
    N_CLASS,  # unused in the body: an autotuning key (size class of N)
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    DUAL: tl.constexpr,
    REF_HAS_BIAS: tl.constexpr,
    REF_EVEN_K: tl.constexpr,
    REF_UPCAST: tl.constexpr,
    REF_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLAT_LOOP: tl.constexpr,
    USE_TMA: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    GATHER_TARGET: tl.constexpr = False,
):
    """Grid: (cdiv(N, BLOCK_M) * num_splits * (2 if DUAL else 1),). Writes per-split statistics.

    part and ref_part [4 or 3, num_splits, N] (planes max, sumexp, target, [entropy]; the reference's entropy
    plane is unused).
    With DUAL the second half of the programs scores the reference (own hidden/weight/bias/dtype): one launch,
    and each program holds one model's tile, so the dual kernel needs no more registers than the single one.
    The *_desc arguments are TMA descriptors of hidden / weight (and the reference's; the policy's again
    without one) whenever the launch may use TMA, and None when it cannot; only USE_TMA configs without
    WARP_SPECIALIZE read them (warp-specialized programs build their own, see below: that needs Triton's global
    scratch allocator, 128 bytes per descriptor).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(N, BLOCK_M)
    programs_per_model = num_pid_m * num_splits
    model_pid = pid % programs_per_model if DUAL else pid
    # Grouped order: GROUP_M row blocks x all splits run together, so each weight tile is read from HBM once
    # and reused from L2 by GROUP_M programs, and each hidden block by the programs of the other splits.
    num_pid_in_group = GROUP_M * num_splits
    group_id = model_pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_in_group = model_pid % num_pid_in_group
    pid_m = first_pid_m + pid_in_group % group_size_m
    pid_s = pid_in_group // group_size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows_ld = tl.minimum(rows, N - 1).to(tl.int64)
    col_begin = pid_s * split_cols
    col_end = tl.minimum(col_begin + split_cols, V)
    tgt = tl.load(tgt_ptr + rows_ld)
    target_local = tl.where((tgt >= col_begin) & (tgt < col_end), tgt, -1).to(tl.int32)

    plane = tl.cast(num_splits, tl.int64) * N  # tl.cast: an int arg equal to 1 arrives as a constexpr
    out = pid_s.to(tl.int64) * N + rows.to(tl.int64)

    row0 = pid_m * BLOCK_M
    if WARP_SPECIALIZE:
        # Triton warp-specializes one loop nest per kernel, so one nest serves both models: the program picks
        # its model's tensors at run time and builds TMA descriptors for them here (the host descriptors name
        # one tensor each). Both models share the dtype, EVEN_K and flags (the autotuner prunes the rest); the
        # reference's entropy plane (ref_part has one) is computed and ignored; bias is on where its model has one.
        tl.static_assert(not DUAL or (UPCAST == REF_UPCAST and IEEE == REF_IEEE and EVEN_K == REF_EVEN_K),
                         "a warp-specialized dual launch needs both models in one dtype")
        is_ref = DUAL and pid >= programs_per_model
        hp, wp, bp, pp, bias_on = h_ptr, w_ptr, b_ptr, part_ptr, HAS_BIAS
        if is_ref:
            hp, wp, bp, pp, bias_on = ref_h_ptr, ref_w_ptr, ref_b_ptr, ref_part_ptr, REF_HAS_BIAS
        h_dev = tl.make_tensor_descriptor(hp, shape=[N, H], strides=[H, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_dev = tl.make_tensor_descriptor(wp, shape=[V, H], strides=[H, 1], block_shape=[BLOCK_N, BLOCK_K])
        _score_split(
            hp, wp, bp, bias_on, pp, h_dev, w_dev, row0, rows_ld, row_mask, out, plane, target_local, col_begin,
            col_end, H, V, scale2,
            HAS_BIAS or REF_HAS_BIAS, WITH_ENTROPY, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, IEEE, FLAT_LOOP,
            USE_TMA, WARP_SPECIALIZE, GATHER_TARGET,
        )  # fmt: skip
    elif DUAL and pid >= programs_per_model:
        _score_split(
            ref_h_ptr, ref_w_ptr, ref_b_ptr, True, ref_part_ptr, ref_h_desc, ref_w_desc, row0, rows_ld, row_mask,
            out, plane, target_local, col_begin, col_end, H, V, scale2,
            REF_HAS_BIAS, False, BLOCK_M, BLOCK_N, BLOCK_K, REF_EVEN_K, REF_UPCAST, REF_IEEE, FLAT_LOOP, USE_TMA,
            False, GATHER_TARGET,
        )  # fmt: skip
    else:
        _score_split(
            h_ptr, w_ptr, b_ptr, True, part_ptr, h_desc, w_desc, row0, rows_ld, row_mask, out, plane, target_local,
            col_begin, col_end, H, V, scale2,
            HAS_BIAS, WITH_ENTROPY, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, IEEE, FLAT_LOOP, USE_TMA, False,
            GATHER_TARGET,
        )  # fmt: skip


@triton.jit
def logits_slab_stats_kernel(
    z_ptr,
    b_ptr,
    part_ptr,
    tgt_ptr,
    N,
    n_cols,
    col_begin,
    split,
    num_splits,
    scale2,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(N, BLOCK_M),). The statistics of split `split`, vocabulary columns [col_begin, col_begin +
    n_cols), from logits someone else multiplied out: z [N, n_cols] fp32 or 16-bit, contiguous, bias not added.

    The same fold (and the same `part` layout) as linear_logprob_stats_kernel, with loads in place of the
    K-loop: the forward that runs the GEMM in cuBLAS (care_kernels.triton.cublas_logits) folds its slab here.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows_ld = tl.minimum(rows, N - 1).to(tl.int64)
    col_end = col_begin + n_cols
    tgt = tl.load(tgt_ptr + rows_ld)
    target_local = tl.where((tgt >= col_begin) & (tgt < col_end), tgt, -1).to(tl.int32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    u_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    row_base = z_ptr + rows_ld[:, None] * n_cols
    for n in range(0, n_cols, BLOCK_N):
        local = n + offs_n
        acc = tl.load(row_base + local[None, :], mask=(local < n_cols)[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc = _add_bias(acc, b_ptr, (col_begin + tl.minimum(local, n_cols - 1)).to(tl.int64), True)
        m_i, s_i, u_i, t_i = _fold_tile(acc, col_begin + local, col_end, target_local, m_i, s_i, u_i, t_i, scale2,
                                        WITH_ENTROPY)  # fmt: skip
    plane = tl.cast(num_splits, tl.int64) * N
    out = tl.cast(split, tl.int64) * N + rows.to(tl.int64)
    tl.store(part_ptr + PLANE_MAX * plane + out, m_i, mask=row_mask)
    tl.store(part_ptr + PLANE_SUMEXP * plane + out, s_i, mask=row_mask)
    tl.store(part_ptr + PLANE_TARGET * plane + out, t_i, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(part_ptr + PLANE_ENTROPY * plane + out, u_i, mask=row_mask)
