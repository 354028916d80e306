"""Triton backend of `linear_logprobs` / `dual_linear_logprobs`: launchers for the forward and backward.

    z = (hidden @ weight.T + bias).float() / temperature          # never materialized as [N, V]
    logprobs = z[target] - logsumexp(z),  entropy = logsumexp(z) - sum(softmax(z) * z)

Forward: one fused kernel (_forward_kernels) streams the vocabulary; programs own (row block, vocabulary
split) pairs so that small N still fills the GPU, and write O(N * splits) fp32 partial statistics that a
few torch ops merge. The dual variant scores a reference model (own hidden/weight/bias, possibly another
dtype) in a second set of programs of the same launch. For large 16-bit calls the same statistics may come
instead from cuBLAS GEMMs into a bounded fp32 slab folded by a Triton kernel (cublas_logits), when timing
on the first call of a shape says that is faster (logits_gemm).

Backward: see `backward`. Inputs here are already validated by the dispatcher: 2-D, contiguous, one device.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton

from care_kernels.triton import _forward_kernels as fk
from care_kernels.triton import cublas_logits, logits_gemm, tma, tuning, verified
from care_kernels.triton._backward_kernels import dlogits_kernel
from care_kernels.triton._forward_kernels import linear_logprob_stats_kernel
from care_kernels.triton.fp32_gemm import addmm_fp32_

# The Triton interpreter (CPU) mis-handles bf16 arithmetic: every load is upcast to fp32 there.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_PLANE_MAX, _PLANE_SUMEXP = fk.PLANE_MAX.value, fk.PLANE_SUMEXP.value
_PLANE_TARGET, _PLANE_ENTROPY = fk.PLANE_TARGET.value, fk.PLANE_ENTROPY.value

# Vocabulary splits and backward column chunks start on multiples of this (a multiple of every BLOCK_N).
_COL_ALIGN = 256
_GROUP_M = 8

# Upper bound of the backward's dlogits slab [N, chunk] (bytes). Larger chunks mean fewer passes of the fp32
# dH accumulator over HBM; 1 GiB keeps that traffic near 1% of the backward at N=16k, H=3584, V=152k.
DLOGITS_SLAB_BYTES = 1 << 30


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, maxnreg: int | None = None, **extra) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **extra}, num_warps=warps, num_stages=stages,
                         maxnreg=maxnreg)  # fmt: skip


def _host_tma(config: triton.Config) -> bool:
    """Whether the config loads through the host's TMA descriptors (warp-specialized ones build their own)."""
    return bool(config.kwargs.get("USE_TMA")) and not config.kwargs.get("WARP_SPECIALIZE")


def _with_block_shapes(config: triton.Config) -> triton.Config:
    """Only configs that read the host's descriptors get the pre_hook that gives them the config's tile."""
    config.pre_hook = tma.set_block_shapes if _host_tma(config) else None
    return config


def _bwd(bm, bn, bk, warps, stages, *, persistent=0, tma_loads=False, maxnreg=None, ws=False) -> triton.Config:
    """A dlogits config: tile; persistent = programs per SM (0: one program per tile); TMA loads; register cap;
    warp specialization (persistent TMA only)."""
    return _with_block_shapes(_cfg(bm, bn, bk, warps, stages, maxnreg, PERSISTENT=persistent > 0, USE_TMA=tma_loads,
                                   PROGRAMS_PER_SM=max(persistent, 1), WARP_SPECIALIZE=ws))  # fmt: skip


def _fwd(bm, bn, bk, warps, stages, *, flat=False, tma_loads=False, maxnreg=None, ws=False,
         gather=False) -> triton.Config:  # fmt: skip
    """A forward config: tile, loop shape (nested or flat), operand loads (pointers or TMA), register cap,
    warp specialization (nested TMA loop only), target logits gathered (one dot per row) or selected per tile."""
    return _with_block_shapes(_cfg(bm, bn, bk, warps, stages, maxnreg, FLAT_LOOP=flat, USE_TMA=tma_loads,
                                   WARP_SPECIALIZE=ws, GATHER_TARGET=gather))  # fmt: skip


def _gathering(config: triton.Config) -> triton.Config:
    """The same forward config with the target logits from a dot product per row (GATHER_TARGET)."""
    return _with_block_shapes(triton.Config({**config.kwargs, "GATHER_TARGET": True}, num_warps=config.num_warps,
                                            num_stages=config.num_stages, maxnreg=config.maxnreg))  # fmt: skip


# GPU configurations. BLOCK_M and BLOCK_K are fixed within a forward list and BLOCK_K within a backward list
# (the launcher sizes the vocabulary split and the EVEN_K flag from them); the autotuner picks the tile width,
# loop shape, operand loads, warps and pipeline depth, once per key (_FWD_KEY / _BWD_KEY below, and dtypes).
# Below 2049 rows the first config of each list is used untuned (short, memory-bound calls; fewer compiles).
# 16-bit: tensor-core (wgmma) tiles with a K=64 step. `python -m care_kernels.triton.sm90_report` shows what the
# compiler makes of each for Hopper (tests/test_triton_sm90_compile.py: no spills, pipelined). With Triton 3.6:
# - nested 128x128, 8 warps: 165 registers, one CTA per SM. 128x256: 255, the fewest bytes from L2 per FLOP.
#   4 warps: 255 registers x 128 threads, two CTAs per SM (one's fold overlaps the other's main loop).
# - flat, pointer loads, 128x128 capped at 128 registers: no spills, two 8-warp CTAs per SM (nested capped the
#   same way spills 48 bytes with Triton 3.8, none with 3.6).
# - flat, TMA loads (Hopper+, 16-byte aligned rows; no address registers): 128x128 fits a 128-register cap
#   without spills (168 uncapped; Triton 3.8 needs 128 uncapped), two CTAs per SM; 254 at 128x256.
# - warp-specialized (Hopper only, see _prune_warp_specialized; Triton 3.6 and 3.8 both compile them): the
#   nested loop with TMA loads and 4 warps, which Triton splits into a producer warp group (TMA copies, stages
#   ahead, across tiles) and two consumer warp groups of 64 rows each (wgmma + fold; 232 registers each via
#   setmaxnreg, 168 at launch x 12 warps: one CTA per SM, no spills at 128x128 or 128x256 without a bias).
#   Descriptors are built in the kernel (one loop nest serves both models of a dual launch), from global scratch.
# With a bias the register-capped and the warp-specialized 128x256 configs spill: pruned (spills_with_bias).
# Which wins is the autotuner's call on each GPU; benchmarks record its picks and every config's time.
_FWD_POINTER_16 = [
    _fwd(128, 128, 64, 8, 3),
    _fwd(128, 256, 64, 8, 3),
    _fwd(128, 128, 64, 4, 3),
    _fwd(128, 128, 64, 8, 3, flat=True, maxnreg=128),
    _fwd(128, 256, 64, 8, 3, flat=True),
]
_FWD_TMA_16 = [
    _fwd(128, 128, 64, 8, 3, flat=True, tma_loads=True, maxnreg=128),
    _fwd(128, 256, 64, 8, 3, flat=True, tma_loads=True),
    _fwd(128, 128, 64, 4, 4, tma_loads=True, ws=True),
    _fwd(128, 256, 64, 4, 3, tma_loads=True, ws=True),
]
# Each 16-bit config also with its target logits gathered (one dot product per row after the tile loop) instead of
# selected out of every tile (a compare and a select per logit, ~3 of the fold's ~10 operations per element): the
# autotuner keeps whichever is faster, config by config.
_FWD_CONFIGS_16 = [*_FWD_POINTER_16, *map(_gathering, _FWD_POINTER_16)]
_FWD_CONFIGS_16_TMA = [*_FWD_POINTER_16, *_FWD_TMA_16, *map(_gathering, _FWD_POINTER_16 + _FWD_TMA_16)]
# dlogits: one tile per program (Triton 3.6: 122 registers at 128x128, two CTAs per SM; 254 at the larger
# tiles). Where TMA is usable, also persistent programs (a fixed number per SM, each a flat loop over its
# tiles' K steps; the epilogue's layout change takes 32 KB of shared memory more): 128x128 with 2 stages and
# at most 128 registers (96 KB: two CTAs per SM), 128x128 and 128x256 with 3 stages, one CTA per SM.
# Persistent programs with pointer loads were left out: 3 stages (128 KB) leave one CTA per SM, 2 stages
# do not pipeline, and the cap of 128 registers spills with Triton 3.8 (sm90_report). Warp-specialized
# persistent programs (Hopper only): a tile loop with a TMA K-loop inside, producer + two consumer warp groups
# as in the forward; 128x128 with 3 or 4 stages (128x256 and 256x128 spill 32-48 bytes in the epilogue).
_BWD_CONFIGS_16 = [_bwd(128, 128, 64, 8, 3), _bwd(128, 256, 64, 8, 3), _bwd(256, 128, 64, 8, 3)]
_BWD_CONFIGS_16_TMA = [
    *_BWD_CONFIGS_16,
    _bwd(128, 128, 64, 8, 2, persistent=2, tma_loads=True, maxnreg=128),
    _bwd(128, 128, 64, 8, 3, persistent=1, tma_loads=True),
    _bwd(128, 256, 64, 8, 3, persistent=1, tma_loads=True),
    _bwd(128, 128, 64, 4, 3, persistent=1, tma_loads=True, ws=True),
    _bwd(128, 128, 64, 4, 4, persistent=1, tma_loads=True, ws=True),
]
# fp32 (exact fp32 products, no TF32) and mixed fp32/16-bit pairs: smaller tiles for the 4-byte operands.
_FWD_CONFIGS_32 = [_fwd(64, 64, 32, 4, 3), _fwd(64, 128, 32, 8, 3), _fwd(64, 64, 32, 4, 3, flat=True),
                   _fwd(64, 128, 32, 8, 3, flat=True)]  # fmt: skip
_BWD_CONFIGS_32 = [_bwd(64, 64, 32, 4, 3), _bwd(64, 128, 32, 8, 3), _bwd(128, 128, 32, 8, 3)]
_TUNE_FROM_N_CLASS = 2


def _check_config_lists() -> None:
    """The launchers size splits and EVEN_K from a list's first config: what they read must be shared."""
    fwd, bwd = ("BLOCK_M", "BLOCK_K"), ("BLOCK_K",)
    for configs, shared in [(_FWD_CONFIGS_16_TMA, fwd), (_FWD_CONFIGS_32, fwd), (_BWD_CONFIGS_16_TMA, bwd),
                            (_BWD_CONFIGS_32, bwd)]:  # fmt: skip
        assert len({tuple(c.kwargs[k] for k in shared) for c in configs}) == 1, shared
    assert all(_COL_ALIGN % c.kwargs["BLOCK_N"] == 0 for c in _FWD_CONFIGS_16_TMA + _FWD_CONFIGS_32)
    # the untuned first configs launch without descriptors, and are always candidates (verified.py)
    lists = (_FWD_CONFIGS_16, _FWD_CONFIGS_16_TMA, _FWD_CONFIGS_32, _BWD_CONFIGS_16, _BWD_CONFIGS_16_TMA,
             _BWD_CONFIGS_32)  # fmt: skip
    assert not any(c[0].kwargs["USE_TMA"] or verified.needs_verification(c[0]) for c in lists)
    # verification records name configs by label, within a family
    for configs in lists:
        assert len({config_label(c) for c in configs}) == len(configs)


config_label = verified.config_label
_check_config_lists()


def config_families() -> dict[str, list[triton.Config]]:
    """Every shipped Triton config of the log-prob kernels, by verification family."""
    return {"forward 16-bit": _FWD_CONFIGS_16_TMA, "forward fp32": _FWD_CONFIGS_32,
            "dlogits 16-bit": _BWD_CONFIGS_16_TMA, "dlogits fp32": _BWD_CONFIGS_32}  # fmt: skip


# Each shipped config's family in the verification records (care_kernels.triton.verified).
_FAMILY = {id(c): family for family, configs in config_families().items() for c in configs}


def config_allowed(config: triton.Config, device: torch.device) -> bool:
    """Whether `config` may be an autotuner candidate on `device` (verified.allowed, by the config's family)."""
    return verified.allowed(_FAMILY.get(id(config), "?"), config, device)


# Constexpr flags that change the work per program are part of the key (Triton keys on the listed
# arguments and the tensors' dtypes only; EVEN_K follows from H).
_FWD_KEY = ["H", "V", "N_CLASS", "DUAL", "WITH_ENTROPY", "HAS_BIAS", "REF_HAS_BIAS"]


def warp_specialized(config: triton.Config) -> bool:
    return bool(config.kwargs.get("WARP_SPECIALIZE"))


def warp_specialization_enabled() -> bool:
    """False when CARE_KERNELS_WARP_SPECIALIZE=0: the autotuner never tries warp-specialized configs (an escape
    hatch for a Triton or driver whose warp specialization misbehaves, whatever the verification records say)."""
    return os.environ.get("CARE_KERNELS_WARP_SPECIALIZE", "1") != "0"


def spills_with_bias(config: triton.Config) -> bool:
    """Forward configs that spill registers when a model has a bias (sm90_report, Triton 3.6 and 3.8): the
    128-register caps (700-1000 bytes per thread) and the warp-specialized 128x256 tile (8-24 bytes). With
    Triton 3.6 the 128x256 pointer-load configs spill 8-24 bytes with a bias too (3.8: none); they stay, timed."""
    return config.maxnreg is not None or (warp_specialized(config) and config.kwargs["BLOCK_N"] == 256)


def _prune_configs(configs: list[triton.Config], named_args: dict, **launch) -> list[triton.Config]:
    """Autotuner early prune (forward and dlogits) of the configs that cannot run here, or run badly:
    - those never verified on this GPU architecture (config_allowed; the first of each list always stays);
    - warp-specialized ones off Hopper (sm_90: other architectures run another warp-specialization pass that
      nobody here has compiled or checked), under CARE_KERNELS_WARP_SPECIALIZE=0, and in a dual forward whose
      models differ in dtype (one loop nest serves both; linear_logprob_stats_kernel);
    - in a forward where either model has a bias, those that spill with one (spills_with_bias).
    """
    args = {**named_args, **launch}  # Triton passes keyword arguments (the constexpr flags) apart
    device = args["h_ptr"].device
    hopper = device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] == 9
    same_dtype = not args.get("DUAL") or args["ref_h_ptr"].dtype == args["h_ptr"].dtype
    keep_ws = hopper and same_dtype and warp_specialization_enabled()
    biased_forward = "DUAL" in args and bool(args.get("HAS_BIAS") or args.get("REF_HAS_BIAS"))
    return [c for c in configs if config_allowed(c, device) and (keep_ws or not warp_specialized(c))
            and not (biased_forward and spills_with_bias(c))]  # fmt: skip


# SafeAutotuner: a candidate that raises is dropped (never the call), and tuning results are kept on disk.
_fwd_tuned_16 = tuning.autotune(_FWD_CONFIGS_16, _FWD_KEY, _prune_configs)(linear_logprob_stats_kernel)
_fwd_tuned_16_tma = tuning.autotune(_FWD_CONFIGS_16_TMA, _FWD_KEY, _prune_configs)(linear_logprob_stats_kernel)
_fwd_tuned_32 = tuning.autotune(_FWD_CONFIGS_32, _FWD_KEY, _prune_configs)(linear_logprob_stats_kernel)
_BWD_KEY = ["H", "N_CLASS", "HAS_BIAS", "HAS_GRAD_ENTROPY"]
_bwd_tuned_16 = tuning.autotune(_BWD_CONFIGS_16, _BWD_KEY, _prune_configs)(dlogits_kernel)
_bwd_tuned_16_tma = tuning.autotune(_BWD_CONFIGS_16_TMA, _BWD_KEY, _prune_configs)(dlogits_kernel)
_bwd_tuned_32 = tuning.autotune(_BWD_CONFIGS_32, _BWD_KEY, _prune_configs)(dlogits_kernel)
# Which (tuner, configs) a launch uses: fp32 when any operand is fp32, the TMA lists when TMA is usable.
_FWD_LISTS = {"fp32": (_fwd_tuned_32, _FWD_CONFIGS_32), "16-bit": (_fwd_tuned_16, _FWD_CONFIGS_16),
              "16-bit TMA": (_fwd_tuned_16_tma, _FWD_CONFIGS_16_TMA)}  # fmt: skip
_BWD_LISTS = {"fp32": (_bwd_tuned_32, _BWD_CONFIGS_32), "16-bit": (_bwd_tuned_16, _BWD_CONFIGS_16),
              "16-bit TMA": (_bwd_tuned_16_tma, _BWD_CONFIGS_16_TMA)}  # fmt: skip


def _tuners() -> dict:
    return {"forward 16-bit": _fwd_tuned_16, "forward 16-bit TMA-capable": _fwd_tuned_16_tma,
            "forward fp32": _fwd_tuned_32, "dlogits 16-bit": _bwd_tuned_16,
            "dlogits 16-bit TMA-capable": _bwd_tuned_16_tma, "dlogits fp32": _bwd_tuned_32,
            **cublas_logits.tuners()}  # fmt: skip


# Every config's time when the autotuner tuned a key in this process: {id(tuner): {key: {config: ms}}}.
_TUNING_MS: dict[int, dict[tuple, dict[str, float]]] = {}


def _note_tuning(tuner) -> None:
    """After a launch through `tuner`: keep the timings of a key it has just tuned (Triton keeps the last only)."""
    seen = _TUNING_MS.setdefault(id(tuner), {})
    for key in getattr(tuner, "cache", {}):
        if key not in seen:
            timings = getattr(tuner, "configs_timings", None) or {}
            median = lambda t: float(t[0] if isinstance(t, (list, tuple)) else t)  # noqa: E731
            seen[key] = {config_label(c): median(t) for c, t in timings.items()}


def autotuned_configs() -> list[dict]:
    """What the autotuner picked in this process, one entry per kernel and key (benchmarks record it).

    key: the values of the kernel's key arguments, then the tensor dtypes; config: tile sizes, loop shape,
    operand loads, warps, pipeline stages, register cap; timings_ms: every candidate config's median time.
    Then the strategies logits_gemm `auto` picked (kernel "forward strategy" / "backward strategy", label
    "fused" or "cublas").
    """
    return [
        {"kernel": name, "key_args": list(tuner.keys), "key": [str(k) for k in key],
         "config": {k: v for k, v in config.all_kwargs().items() if k != "num_ctas"}, "label": config_label(config),
         "timings_ms": _TUNING_MS.get(id(tuner), {}).get(key, {})}
        for name, tuner in _tuners().items()
        for key, config in getattr(tuner, "cache", {}).items()
    ] + logits_gemm.picks()  # fmt: skip


# The kernels' variants under the interpreter (tests run each): loop shape, and TMA loads where usable.
INTERPRETER_FORWARD = {"FLAT_LOOP": False, "USE_TMA": False, "WARP_SPECIALIZE": False, "GATHER_TARGET": False}
INTERPRETER_BACKWARD = {"PERSISTENT": False, "USE_TMA": False, "PROGRAMS_PER_SM": 1, "WARP_SPECIALIZE": False}


def _interpreter_config(hidden_size: int) -> triton.Config:
    """One config with big tiles: the interpreter costs ~ms per program x loop iteration, any tile size."""
    bk = min(128, triton.next_power_of_2(max(hidden_size, 16)))
    return _cfg(128, _COL_ALIGN, bk, 4, 1)


def _pick_kernel(plain, tuned, configs: list[triton.Config], hidden_size: int, n_class: int):
    """(kernel, config, launch meta-parameters): the interpreter's config, a fixed one, or the autotuner's."""
    if _INTERPRET:
        config = _interpreter_config(hidden_size)
    elif n_class < _TUNE_FROM_N_CLASS:
        config = configs[0]
    else:
        return tuned, configs[0], {}
    return plain, config, config.all_kwargs()


def _plan_launch(plain, lists: dict, interpreter_variant: dict, n_class: int, *tensors: torch.Tensor | None):
    """(kernel, tuner, config, meta, with_descriptors) for a launch over `tensors` (hidden, weight, ...).

    lists: {"fp32" | "16-bit" | "16-bit TMA": (tuner, configs)}: fp32 when any operand is fp32, the TMA list
    when every operand can back a descriptor. with_descriptors: pass TMA descriptors (a TMA config launched
    as is, or a tuner with host-TMA candidates on this device: their pre_hook sets the block shapes).
    """
    wide = not _is_16bit(*tensors)
    tma_usable = not wide and tma.usable(*tensors, interpret=_INTERPRET)
    tuned, configs = lists["fp32" if wide else ("16-bit TMA" if tma_usable else "16-bit")]
    kernel, config, meta = _pick_kernel(plain, tuned, configs, tensors[0].shape[1], n_class)
    if _INTERPRET:  # the variant's TMA loads (and warp specialization, which needs them) where TMA is usable
        meta.update({k: v and tma_usable if k in ("USE_TMA", "WARP_SPECIALIZE") else v
                     for k, v in interpreter_variant.items()})  # fmt: skip
    device = tensors[0].device
    # a pick the tuner kept from when more configs were allowed (the records or the mode changed since) still runs
    kept = getattr(tuned, "cache", {}).values()
    with_descriptors = meta.get("USE_TMA", False) or (
        kernel is tuned and tma_usable
        and any(_host_tma(c) and (config_allowed(c, device) or c in kept) for c in configs)
    )  # fmt: skip
    if tma_usable and not _INTERPRET:
        tma.ensure_scratch_allocator()  # warp-specialized configs build their descriptors in the kernel
    return kernel, tuned, config, meta, with_descriptors


def _n_class(n: int) -> int:
    return 0 if n <= 128 else (1 if n <= 2048 else 2)


def _is_16bit(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.dtype in (torch.float16, torch.bfloat16) for t in tensors)


def _pair_flags(h: torch.Tensor, w: torch.Tensor) -> tuple[bool, bool]:
    """(UPCAST, IEEE) for one hidden/weight pair: fp32 operands get true fp32 products, never TF32."""
    upcast = _INTERPRET or h.dtype != w.dtype
    ieee = upcast or h.dtype == torch.float32
    return upcast, ieee


_sm_count: dict[int, int] = {}


def _num_programs_per_wave(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_count[index]


@functools.lru_cache(maxsize=256)
def _num_splits(num_row_blocks: int, vocab: int, programs_per_wave: int) -> int:
    """Vocabulary splits minimizing the makespan (waves x tiles per program), ties to fewer splits.

    At least programs_per_wave / GROUP_M splits (when the vocabulary has them): the programs running at once
    then cover few row blocks and several splits, so both operands are shared through L2 instead of every
    program streaming a private hidden block.
    """
    units = triton.cdiv(vocab, _COL_ALIGN)
    lowest = min(units, max(1, triton.cdiv(programs_per_wave, _GROUP_M)))
    best, best_cost = units, math.inf
    for splits in range(lowest, min(units, 4096) + 1):
        per_split = triton.cdiv(units, splits)
        used = triton.cdiv(units, per_split)
        waves = triton.cdiv(num_row_blocks * used, programs_per_wave)
        cost = waves * (per_split + 0.5)  # + 0.5: per-program start-up, so ties favour fewer programs
        if cost < best_cost:
            best, best_cost = used, cost
    return best


def _merge_splits(part: torch.Tensor, with_entropy: bool):
    """Per-split base-2 statistics [planes, S, N] -> per row (lse2, target2, entropy in natural units)."""
    m = part[_PLANE_MAX]
    m_all = m.amax(dim=0)
    scale = torch.exp2(m - m_all)
    sumexp = (part[_PLANE_SUMEXP] * scale).sum(dim=0)
    log2_sumexp = torch.log2(sumexp)
    lse2 = m_all + log2_sumexp
    target2 = part[_PLANE_TARGET].sum(dim=0)
    entropy = None
    if with_entropy:
        # sum_j 2^(z_j - M) (z_j - M), rebased from each split's own max m to the global max M.
        u = (scale * (part[_PLANE_ENTROPY] + (m - m_all) * part[_PLANE_SUMEXP])).sum(dim=0)
        entropy = (_LN2 * (log2_sumexp - u / sumexp)).clamp_min_(0.0)
    return lse2, target2, entropy


def _run_chosen(key: tuple, candidates: dict, n_rows: int, device: torch.device, precision_key: tuple | None = None):
    """Run the candidate logits_gemm picks for `key` (timed on first sight only for large calls on CUDA, the
    calls the Triton autotuner tunes too). If it raises, the other candidates are tried in turn
    (logits_gemm.fall_back): an error reaches the caller only when every candidate fails (the first one's)."""
    tune = not _INTERPRET and device.type == "cuda" and _n_class(n_rows) >= _TUNE_FROM_N_CLASS
    name = logits_gemm.choose(key, candidates, tune=tune, device=device, precision_key=precision_key)
    tried: list[str] = []
    errors: list[Exception] = []
    while True:
        try:
            return candidates[name]()
        except Exception as exc:
            tried.append(name)
            errors.append(exc)
            name = logits_gemm.fall_back(key, candidates, tried, exc, device, precision_key)
            if name is None:
                if len(errors) == 1:
                    raise
                raise errors[0]  # noqa: B904 - its context is the last candidate's error


def _fused_partial_stats(hidden, weight, bias, targets, ref_models, scale2: float, planes: int):
    """(part, ref_part or None): the per-split statistics [planes, splits, N] from linear_logprob_stats_kernel,
    the reference (ref_models: [(hidden, weight, bias)] or []) scored in the same launch."""
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    dual = bool(ref_models)
    ref_hidden, ref_weight, ref_bias = ref_models[0] if dual else (None, None, None)
    n_class = _n_class(n_rows)
    kernel, tuned, config, meta, with_descriptors = _plan_launch(
        linear_logprob_stats_kernel, _FWD_LISTS, INTERPRETER_FORWARD, n_class, hidden, weight, ref_hidden, ref_weight
    )
    block_m, block_n, block_k = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    num_row_blocks = triton.cdiv(n_rows, block_m)
    models = 2 if dual else 1
    splits = _num_splits(num_row_blocks * models, vocab, _num_programs_per_wave(hidden.device))
    split_cols = triton.cdiv(triton.cdiv(vocab, splits), _COL_ALIGN) * _COL_ALIGN
    splits = triton.cdiv(vocab, split_cols)

    part = torch.empty((planes, splits, n_rows), dtype=torch.float32, device=hidden.device)
    ref_part = torch.empty_like(part) if dual else part  # same planes: see linear_logprob_stats_kernel
    upcast, ieee = _pair_flags(hidden, weight)
    ref_upcast, ref_ieee = _pair_flags(ref_hidden, ref_weight) if dual else (upcast, ieee)
    even_k = hidden_size % block_k == 0
    descriptors = [None] * 4
    if with_descriptors:  # without a reference, the policy's stand in for the unused reference arguments
        descriptors = [tma.descriptor(t, rows, block_k)
                       for t, rows in ((hidden, block_m), (weight, block_n), (ref_hidden if dual else hidden, block_m),
                                       (ref_weight if dual else weight, block_n))]  # fmt: skip
    args = (
        hidden, weight, bias if bias is not None else weight, part,
        ref_hidden if dual else hidden, ref_weight if dual else weight,
        ref_bias if ref_bias is not None else weight, ref_part, targets, *descriptors,
        n_rows, hidden_size, vocab, splits, split_cols, scale2, n_class,
    )  # fmt: skip
    flags = dict(
        HAS_BIAS=bias is not None, WITH_ENTROPY=planes == 4, EVEN_K=even_k, UPCAST=upcast, IEEE=ieee,
        DUAL=dual, REF_HAS_BIAS=dual and ref_bias is not None, REF_EVEN_K=even_k, REF_UPCAST=ref_upcast,
        REF_IEEE=ref_ieee, GROUP_M=_GROUP_M,
    )  # fmt: skip
    kernel[(num_row_blocks * splits * models,)](*args, **flags, **meta)
    if kernel is tuned:
        _note_tuning(tuned)
    return part, (ref_part if dual else None)


def _cublas_partial_stats(models, targets, scale2: float, planes: int, logits_dtype: torch.dtype = torch.float32):
    """(part, ref_part or None) from cublas_logits, one chunk per split; the models [(hidden, weight, bias), ...]
    one after the other through one slab of logits_dtype (fp32: `cublas`; the operands' 16-bit dtype: `cublas16`;
    the reference's entropy is not needed: 3 planes)."""
    n_rows, vocab = models[0][0].shape[0], models[0][1].shape[0]
    size = torch.finfo(logits_dtype).bits // 8
    slab = torch.empty(cublas_logits.slab_elements(n_rows, vocab, size), dtype=logits_dtype, device=targets.device)
    parts = [cublas_logits.partial_stats(h, w, b, targets, scale2=scale2, planes=planes if i == 0 else 3, slab=slab)
             for i, (h, w, b) in enumerate(models)]  # fmt: skip
    return parts[0], (parts[1] if len(parts) > 1 else None)


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
):
    """Per-token log-probs (and entropy) of `hidden @ weight.T + bias` at `temperature`, streamed over V.

    hidden [N, H] (fp32/bf16/fp16), weight [V, H] (same dtype), bias [V] or None, targets [N] int64 in [0, V)
    or == ignore_index. ref_hidden [N, H] / ref_weight [V, H] / ref_bias [V]: optional reference model (its
    dtype may differ), scored in the same launch. Returns float32 (logprobs [N], entropy [N] (zeros unless
    with_entropy), lse [N], ref_logprobs [N] or None); ignored rows have logprobs = entropy = 0.
    The partial statistics come from the fused kernel or from cuBLAS GEMMs folded by Triton (cublas_logits),
    whichever logits_gemm picks for the call; one merge finishes both.
    Equivalent torch (materializing):
        z = (hidden @ weight.T + bias).float() / temperature
        logprobs = z.log_softmax(-1).gather(-1, targets[:, None])[:, 0];  lse = z.logsumexp(-1)
        entropy = lse - (z.softmax(-1) * z).sum(-1)
    """
    n_rows = hidden.shape[0]
    dual = ref_weight is not None
    device = hidden.device
    zeros = lambda: torch.zeros(n_rows, dtype=torch.float32, device=device)
    if n_rows == 0:
        return zeros(), zeros(), zeros(), (zeros() if dual else None)

    planes = 4 if with_entropy else 3
    scale2 = _LOG2E / temperature
    models = [(hidden, weight, bias)] + ([(ref_hidden, ref_weight, ref_bias)] if dual else [])
    candidates = {"fused": lambda: _fused_partial_stats(*models[0], targets, models[1:], scale2, planes)}
    if cublas_logits.usable(hidden, weight, ref_hidden, ref_weight):
        candidates["cublas"] = lambda: _cublas_partial_stats(models, targets, scale2, planes)
    if cublas_logits.usable16(hidden, weight, ref_hidden, ref_weight):
        candidates["cublas16"] = lambda: _cublas_partial_stats(models, targets, scale2, planes, hidden.dtype)
    dtypes = "/".join(str(t.dtype) for t in (hidden, ref_hidden) if t is not None)
    key = ("forward", hidden.shape[1], ref_hidden.shape[1] if dual else None, weight.shape[0], _n_class(n_rows),
           n_rows.bit_length(), dual, with_entropy, bias is not None, ref_bias is not None, dtypes,
           str(device))  # fmt: skip
    precision_key = _precision_key(hidden, weight, bias)
    part, ref_part = _run_chosen(key, candidates, n_rows, device, precision_key)

    valid = targets != ignore_index
    lse2, target2, entropy = _merge_splits(part, with_entropy)
    # target <= max <= lse holds exactly in the merge; the clamp only guards the approximate GPU exp2 of 0.
    logprobs = torch.where(valid, ((target2 - lse2) * _LN2).clamp_max_(0.0), 0.0)
    entropy = torch.where(valid, entropy, 0.0) if with_entropy else zeros()
    ref_logprobs = None
    if dual:
        ref_lse2, ref_target2, _ = _merge_splits(ref_part, False)
        ref_logprobs = torch.where(valid, ((ref_target2 - ref_lse2) * _LN2).clamp_max_(0.0), 0.0)
    return logprobs, entropy, lse2 * _LN2, ref_logprobs


# The backward's dlogits slab is [N, <= 32768] and within DLOGITS_SLAB_BYTES: bounded whatever N x V is. It holds
# a whole vocabulary only when that vocabulary (a small one, at few rows) fits the bound anyway.
MAX_SLAB_COLUMNS = 32768


def _slab_columns(n_rows: int, vocab: int, element_size: int) -> int:
    """Columns of one backward chunk: equal chunks (a short last one would run its GEMMs below the peak), each
    a multiple of _COL_ALIGN, of at most MAX_SLAB_COLUMNS and of what DLOGITS_SLAB_BYTES allows at
    element_size bytes per (row, column) (at least _COL_ALIGN columns)."""
    most = DLOGITS_SLAB_BYTES // max(1, n_rows * element_size)
    return cublas_logits.equal_chunks(vocab, min(MAX_SLAB_COLUMNS, max(_COL_ALIGN, most // _COL_ALIGN * _COL_ALIGN)))


def backward(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int,
):
    """Gradients of sum(grad_logprobs * logprobs + grad_entropy * entropy) w.r.t. hidden, weight and bias.

    grad_logprobs [N] f32, grad_entropy [N] f32 or None, lse / entropy [N] f32 from `forward`. Returns
    (grad_hidden [N, H] in hidden.dtype, grad_weight [V, H] in weight.dtype, grad_bias [V] or None).
    Per element (z tempered logits, p = exp(z - lse)):
        dlogits = (g_lp * (1[j == y] - p) - g_ent * p * (z - lse + entropy)) / temperature
        grad_hidden = dlogits @ weight;  grad_weight = dlogits.T @ hidden;  grad_bias = dlogits.sum(0)

    Design. A fully fused backward (dlogits tile in registers, then dH[rows] += dlogits @ W[cols] and
    dW[cols] += dlogits.T @ H[rows] with fp32 atomics) issues (BLOCK_M + BLOCK_N) * H fp32 atomic adds per
    6 * BLOCK_M * BLOCK_N * H FLOPs (recompute + both products): 128 FLOP per atomic byte at 128 x 256
    tiles, under half of the ~300 FLOP/B an H100 needs to stay compute-bound (and L2 atomics are slower
    than plain L2 traffic), so it cannot approach cuBLAS. A split/reduce in place would need [BLOCK_M, H]
    and [BLOCK_N, H] fp32 accumulators (megabytes at H = 3584), which fit neither registers nor shared memory.
    Like the fastest published kernels (Liger's SM90 kernel recomputes dZ in token waves, QuACK in chunks),
    we recompute dlogits for one vocabulary chunk at a time in a Triton kernel (the recompute GEMM with the
    gradient formula as its epilogue) into a slab of at most DLOGITS_SLAB_BYTES, then run two cuBLAS GEMMs:
      - grad_weight[chunk] = slab.T @ hidden: complete for the chunk (reduction over all N in one GEMM),
      - grad_hidden += slab @ weight[chunk]: fp32 accumulator across chunks (none when one chunk covers V).
    The slab is rounded to the input dtype before the GEMMs, exactly as autograd rounds the logits' gradient.
    Workspace: the slab, the fp32 dH accumulator [N, H] when V needs several chunks, O(N) otherwise.
    For large 16-bit calls the recompute GEMM may instead run in cuBLAS, when timing on the first call of a shape
    says that is faster (logits_gemm): into an fp32 slab that a Triton pass turns into the dlogits slab
    (`cublas`; the two slabs share DLOGITS_SLAB_BYTES), or into the 16-bit dlogits slab itself, the logits rounded
    to the input dtype, then overwritten by their dlogits in place (`cublas16`, the whole budget for one slab).
    """
    n_rows = hidden.shape[0]
    if n_rows == 0:
        grad_bias = torch.zeros_like(bias) if bias is not None else None
        return torch.empty_like(hidden), torch.zeros_like(weight), grad_bias
    inputs = (grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index)
    candidates = {"fused": lambda: _backward(*inputs, strategy="fused")}
    if cublas_logits.usable(hidden, weight):
        candidates["cublas"] = lambda: _backward(*inputs, strategy="cublas")
    if cublas_logits.usable16(hidden, weight):
        candidates["cublas16"] = lambda: _backward(*inputs, strategy="cublas16")
    key = ("backward", hidden.shape[1], weight.shape[0], _n_class(n_rows), n_rows.bit_length(), bias is not None,
           grad_entropy is not None, str(hidden.dtype), str(hidden.device))  # fmt: skip
    return _run_chosen(key, candidates, n_rows, hidden.device, _precision_key(hidden, weight, bias))


def _precision_key(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """What one call's forward and backward share (logits_gemm.PRECISION_KEY_ARGS): their logits must have one
    precision (the forward pins it)."""
    n_rows = hidden.shape[0]
    return (hidden.shape[1], weight.shape[0], _n_class(n_rows), n_rows.bit_length(), bias is not None,
            str(hidden.dtype), str(hidden.device))  # fmt: skip


def _fused_dlogits_filler(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature,
                          ignore_index):  # fmt: skip
    """fill(dlogits [N, n_cols], col_begin): dlogits_kernel (recompute GEMM + gradient, autotuned) into the slab."""
    n_rows, hidden_size = hidden.shape
    n_class = _n_class(n_rows)
    kernel, tuned, config, meta, with_descriptors = _plan_launch(
        dlogits_kernel, _BWD_LISTS, INTERPRETER_BACKWARD, n_class, hidden, weight
    )
    descriptors = [None, None]
    if with_descriptors:
        k = config.kwargs["BLOCK_K"]
        descriptors = [tma.descriptor(hidden, config.kwargs["BLOCK_M"], k),
                       tma.descriptor(weight, config.kwargs["BLOCK_N"], k)]  # fmt: skip
    programs_per_wave = _num_programs_per_wave(hidden.device)
    upcast, ieee = _pair_flags(hidden, weight)
    has_grad_entropy = grad_entropy is not None
    flags = dict(
        HAS_BIAS=bias is not None, HAS_GRAD_ENTROPY=has_grad_entropy,
        EVEN_K=hidden_size % config.kwargs["BLOCK_K"] == 0, UPCAST=upcast, IEEE=ieee, GROUP_M=_GROUP_M,
        **meta,
    )  # fmt: skip

    def fill(dlogits: torch.Tensor, col_begin: int) -> None:
        n_cols = dlogits.shape[1]

        def grid(launch):
            tiles = triton.cdiv(n_rows, launch["BLOCK_M"]) * triton.cdiv(n_cols, launch["BLOCK_N"])
            if launch["PERSISTENT"]:
                return (min(tiles, programs_per_wave * launch["PROGRAMS_PER_SM"]),)
            return (tiles,)

        kernel[grid](
            hidden, weight, bias if bias is not None else weight, targets, lse, entropy, grad_logprobs,
            grad_entropy if has_grad_entropy else grad_logprobs, dlogits, *descriptors,
            n_rows, hidden_size, weight.shape[0], col_begin, n_cols, _LOG2E / temperature, 1.0 / temperature,
            ignore_index, n_class, **flags,
        )  # fmt: skip
        if kernel is tuned:
            _note_tuning(tuned)

    return fill


def _cublas_dlogits_filler(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature,
                           ignore_index, *, logits_slab: torch.Tensor | None):  # fmt: skip
    """fill(dlogits [N, n_cols], col_begin): the chunk's logits by cuBLAS into logits_slab (fp32, as many elements
    as the dlogits slab), or with logits_slab None into the dlogits slab itself (16-bit: `cublas16`), then the
    gradient by a Triton pass (cublas_logits.dlogits_), in place over 16-bit logits."""

    def fill(dlogits: torch.Tensor, col_begin: int) -> None:
        z = dlogits if logits_slab is None else logits_slab[: dlogits.numel()].view(dlogits.shape)
        cublas_logits.dlogits_(
            dlogits, z, hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
            col_begin=col_begin, scale2=_LOG2E / temperature, inv_temp=1.0 / temperature, ignore_index=ignore_index,
        )  # fmt: skip

    return fill


def _backward(grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature: float,
              ignore_index: int, *, strategy: str):  # fmt: skip
    """`backward` for N > 0, its recompute GEMM fused with the gradient in Triton ("fused"), or in cuBLAS: into an
    fp32 logits slab beside the dlogits slab ("cublas"), or into the 16-bit dlogits slab itself ("cublas16")."""
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    dtype = hidden.dtype
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.empty_like(weight)
    grad_bias = torch.empty_like(bias) if bias is not None else None

    # Under the interpreter a bf16 store truncates; the slab is kept in fp32 there and rounded by torch (not for
    # cublas16, whose slab holds its 16-bit logits first: its dlogits truncate there).
    slab_dtype = torch.float32 if (_INTERPRET and dtype == torch.bfloat16 and strategy != "cublas16") else dtype
    element_bytes = torch.finfo(slab_dtype).bits // 8 + (4 if strategy == "cublas" else 0)  # + the fp32 logits
    chunk_cols = _slab_columns(n_rows, vocab, element_bytes)
    slab = torch.empty(n_rows * chunk_cols, dtype=slab_dtype, device=hidden.device)
    single_chunk = chunk_cols >= vocab
    fp32_acc = None
    if not single_chunk and dtype != torch.float32:
        fp32_acc = torch.empty((n_rows, hidden_size), dtype=torch.float32, device=hidden.device)

    inputs = (grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index)
    if strategy == "cublas":
        fill_dlogits = _cublas_dlogits_filler(*inputs, logits_slab=torch.empty_like(slab, dtype=torch.float32))
    elif strategy == "cublas16":
        fill_dlogits = _cublas_dlogits_filler(*inputs, logits_slab=None)
    else:
        fill_dlogits = _fused_dlogits_filler(*inputs)

    for index, col_begin in enumerate(range(0, vocab, chunk_cols)):
        n_cols = min(chunk_cols, vocab - col_begin)
        dlogits = slab[: n_rows * n_cols].view(n_rows, n_cols)
        fill_dlogits(dlogits, col_begin)
        if dlogits.dtype != dtype:
            dlogits = dlogits.to(dtype)
        cols = slice(col_begin, col_begin + n_cols)
        torch.mm(dlogits.t(), hidden, out=grad_weight[cols])
        if grad_bias is not None:
            grad_bias[cols] = dlogits.sum(dim=0, dtype=torch.float32)
        if single_chunk:
            torch.mm(dlogits, weight, out=grad_hidden)
        elif fp32_acc is None:  # fp32 inputs: grad_hidden itself is the fp32 accumulator
            if index == 0:
                torch.mm(dlogits, weight[cols], out=grad_hidden)
            else:
                grad_hidden.addmm_(dlogits, weight[cols])
        else:
            addmm_fp32_(fp32_acc, dlogits, weight[cols], accumulate=index > 0)
    if fp32_acc is not None:
        grad_hidden.copy_(fp32_acc)
    return grad_hidden, grad_weight, grad_bias
