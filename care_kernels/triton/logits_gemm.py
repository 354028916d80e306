"""Where the logits GEMM of a large 16-bit call runs: fused with its epilogue in Triton, or in cuBLAS.

    CARE_KERNELS_LOGITS_GEMM=auto (default) | fused | cublas | cublas16     # for a process
    with logits_gemm.use("fused"): ...                          # for a block of code (this thread / task)

- fused: the Triton kernels multiply hidden by weight tiles and consume each logits tile on chip (the forward
  folds it into softmax statistics, the backward turns it into dlogits).
- cublas: cuBLAS multiplies into a bounded fp32 slab, a vocabulary chunk at a time, and a Triton pass reads
  it back (cublas_logits): cuBLAS runs nearer the tensor cores' peak, at 8 bytes of HBM traffic per logit.
- cublas16: the same into a slab of the operands' 16-bit dtype: each logit rounded to 16 bits, as `hidden @ W.T`
  in bf16 rounds it (and TRL's and Liger's heads), at 4 bytes per logit; the backward's dlogits overwrite the
  logits in place.

`auto` times every strategy it may choose that can run, on the first call of each shape key of each pass
(forward, backward; CUDA, more than 2048 rows), and keeps the fastest for that key, as Triton's autotuner keeps a
config. It may choose `fused` always, and `cublas` and `cublas16` only where a committed gpu_check record verified
them for the GPU's architecture, Triton and sources (care_kernels.triton.verified: neither has run on a GPU yet,
and timing cannot tell a wrong result); CARE_KERNELS_TRITON_CONFIGS=all offers every one, and a forced strategy
runs whatever the records say.
fused and cublas keep fp32 logits (results agree to fp32 rounding); cublas16 rounds them to the input dtype first,
as the same computation in torch does, so its results stay within that computation's error of the exact ones
(every strategy is held to that bound) but are not bitwise those of the others: force `fused` (or `cublas`) where
results must not depend on timing.
Calls made while a CUDA graph is captured are never timed: they take the fused kernels until the key has
been tuned outside a capture. A forced strategy that cannot run on a call (cublas on fp32 operands, or a
torch without cuBLAS's fp32-output GEMM) falls back to the fused kernels.

A backward must read the logits at the precision its forward's statistics (lse, entropy) came from: 16-bit
logits against an fp32 lse (or the reverse) leave each row's probabilities summing to 1 + O(rounding), and the
gradients several times further from the exact ones than either precision alone (measured: 3-4x the
bf16 torch error). So each shape (PRECISION_KEY_ARGS) has one logits precision per process, `pinned` by its first
forward: the strategy it runs (timed, forced, or the fused kernels when it cannot be timed) fixes fp32 (fused,
cublas) or 16-bit (cublas16) logits, and later forwards and every backward of that shape choose within that
precision (a backward with no pinned forward: fp32). A forced strategy runs as asked; a forced forward re-pins.

A strategy that raises anything while timed is never picked for the key (logged once, see tuning.dropped());
one that raises when it runs for a call hands the call to the next strategy `auto` may choose, of the same
precision first, then of the other (fall_back; a forward re-pins its shape's precision to the one that ran). The
caller sees an error only when every such strategy fails.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import statistics
from collections.abc import Callable, Iterator

import torch

from care_kernels.triton import tuning, verified

ENV = "CARE_KERNELS_LOGITS_GEMM"
STRATEGIES = ("fused", "cublas", "cublas16")
# Shape keys, per pass (the first element of a key names its pass).
KEY_ARGS = {
    "forward": ["H", "REF_H", "V", "N_CLASS", "N_BITS", "DUAL", "WITH_ENTROPY", "HAS_BIAS", "REF_HAS_BIAS",
                "dtypes", "device"],
    "backward": ["H", "V", "N_CLASS", "N_BITS", "HAS_BIAS", "HAS_GRAD_ENTROPY", "dtype", "device"],
}  # fmt: skip
# What fixes a shape's logits precision: what the forward and the backward of one call share.
PRECISION_KEY_ARGS = ["H", "V", "N_CLASS", "N_BITS", "HAS_BIAS", "dtype", "device"]
PRECISION = {"fused": "fp32", "cublas": "fp32", "cublas16": "16-bit"}
# Timed calls per candidate after an untimed first one (fewer for slow calls: noise matters less there).
TIMED_RUNS, TIMED_RUNS_SLOW, SLOW_MS = 5, 3, 50.0

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("care_kernels_logits_gemm", default=None)
_picks: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}
_pinned: dict[tuple, str] = {}  # precision key -> "fp32" | "16-bit"


def _check(name: str, source: str) -> str:
    name = name.strip().lower() or "auto"
    if name not in ("auto", *STRATEGIES):
        raise ValueError(f"{source}={name!r}: pass one of 'auto', 'fused', 'cublas', 'cublas16'")
    return name


def requested() -> str:
    """The strategy asked for: `use(...)`'s, else the environment variable's, else 'auto'."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _check(os.environ.get(ENV, "auto"), ENV)


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Run the calls in this block with strategy `name` ('auto', 'fused', 'cublas' or 'cublas16'), whatever the
    environment."""
    token = _forced.set(_check(name, "logits_gemm.use"))
    try:
        yield
    finally:
        _forced.reset(token)


def _elapsed_ms(run: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _median_ms(run: Callable[[], object]) -> float:
    """Median time of `run` after one untimed call."""
    run()  # the first call compiles (and, for the fused kernels, autotunes): not timed
    times = [_elapsed_ms(run)]
    while len(times) < (TIMED_RUNS_SLOW if times[0] > SLOW_MS else TIMED_RUNS):
        times.append(_elapsed_ms(run))
    return statistics.median(times)


def _where(key: tuple) -> str:
    args = dict(zip(KEY_ARGS.get(key[0], []), key[1:]))
    return f"logits GEMM strategy of the {key[0]} {args}"


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def offered(candidates: dict[str, Callable[[], object]], device: torch.device | None) -> dict:
    """The candidates `auto` may choose on `device`: the always-on strategy and those verified there
    (verified.path_allowed); the first candidate (the fused kernels) whatever the records say."""
    first = next(iter(candidates))
    return {name: run for name, run in candidates.items()
            if name == first or verified.path_allowed(verified.STRATEGY_FAMILY, name, device)}  # fmt: skip


def choose(key: tuple, candidates: dict[str, Callable[[], object]], *, tune: bool,
           device: torch.device | None = None, precision_key: tuple | None = None) -> str:  # fmt: skip
    """The strategy to run for a call with this key (key[0]: "forward" or "backward", then KEY_ARGS[key[0]]).

    candidates: {name: a thunk running that strategy on the call's inputs}, those that can run here, the fused
    one first. tune: whether timing is allowed for this call (large, on CUDA); otherwise the first candidate
    runs unless the key was tuned before or a strategy is forced. device: the inputs' device (timed there; what
    the verification records are read for: `auto` chooses among offered(candidates, device)).
    precision_key: the call's shape (PRECISION_KEY_ARGS; None: no pinning): its backward chooses among the
    strategies of the precision its forward pinned (see the module docstring), verified or not (a forward forced
    to 16-bit logits opted its backward in).
    A candidate that raises while timed (out of memory: the cuBLAS strategy's slab may not fit where the fused
    kernels' buffers do; or anything else) is never picked for the key, and logged once; if all do, the first
    one's error is raised.
    """
    forward = key[0] == "forward"
    want = requested()
    if want != "auto":
        name = want if want in candidates else next(iter(candidates))
        if forward and precision_key is not None:
            _pinned[precision_key] = PRECISION.get(name, "fp32")
        return name
    pinned = _pinned.get(precision_key) if precision_key is not None else None
    if precision_key is not None and pinned is None and not forward:
        pinned = "fp32"  # no forward of this shape pinned 16-bit logits: the backward cannot read them
    pool = offered(candidates, device)
    if pinned is not None:
        same = {n: run for n, run in candidates.items() if PRECISION.get(n, "fp32") == pinned}
        pool = {n: run for n, run in same.items() if n in pool} or same or pool
    name = _choose_timed(key, pool, tune=tune, device=device)
    if forward and precision_key is not None:
        _pinned.setdefault(precision_key, PRECISION.get(name, "fp32"))
    return name


def _choose_timed(key: tuple, candidates: dict[str, Callable[[], object]], *, tune: bool,
                  device: torch.device | None) -> str:  # fmt: skip
    """choose() among these candidates: the key's pick, else the fastest when timing is allowed, else the first."""
    first = next(iter(candidates))
    if _picks.get(key) in candidates:
        return _picks[key]
    if len(candidates) == 1 or not tune or _capturing():
        return first
    timings: dict[str, float] = {}
    errors: dict[str, Exception] = {}
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        for name, run in candidates.items():
            try:
                timings[name] = _median_ms(run)
            except Exception as exc:  # noqa: BLE001 - a failing strategy is dropped, never the call
                tuning.note_dropped(_where(key), name, exc)
                timings[name], errors[name] = math.inf, exc
    if all(math.isinf(ms) for ms in timings.values()):
        raise errors[first]
    _timings[key] = timings
    _picks[key] = min(timings, key=timings.__getitem__)
    return _picks[key]


def fall_back(key: tuple, candidates: dict[str, Callable[[], object]], tried: list[str], exc: BaseException,
              device: torch.device | None = None, precision_key: tuple | None = None) -> str | None:  # fmt: skip
    """The strategy to run a call with after `tried[-1]` raised `exc` on it (those in `tried` already failed for
    this call), or None when none is left or a CUDA graph is being captured (the caller then re-raises): one that
    `auto` may choose on `device` (offered), of the failed strategy's logits precision first, else of the other
    (the gradients then further from exact, but the call done; logged). The failure is logged once; unless it ran
    out of memory (which another call's shape may not), the key keeps the next strategy from now on. A forward's
    fallback pins its shape (precision_key) to the precision it runs at, so the backward reads logits of that
    precision."""
    left = [name for name in offered(candidates, device) if name not in tried]
    if not left or _capturing():
        return None
    same = [name for name in left if PRECISION.get(name, "fp32") == PRECISION.get(tried[-1], "fp32")]
    tuning.note_dropped(_where(key), tried[-1], exc)
    chosen = (same or left)[0]
    if not isinstance(exc, torch.OutOfMemoryError):
        _picks[key] = chosen
    if key[0] == "forward" and precision_key is not None:
        _pinned[precision_key] = PRECISION.get(chosen, "fp32")
    return chosen


def picks() -> list[dict]:
    """The strategies `auto` picked in this process, in autotuned_configs' format (benchmarks record them):
    kernel "forward strategy" / "backward strategy", label the pick, timings_ms every candidate's median."""
    return [
        {"kernel": f"{key[0]} strategy", "key_args": KEY_ARGS.get(key[0], []), "key": [str(k) for k in key[1:]],
         "config": {}, "label": pick, "timings_ms": dict(_timings.get(key, {}))}
        for key, pick in _picks.items()
    ]  # fmt: skip


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Run a block whose picks, timings and pinned precisions do not outlive it (benchmarks forcing a strategy on
    whole forward+backward steps, so that `auto` runs after them as if they had not)."""
    saved = (dict(_picks), dict(_timings), dict(_pinned))
    try:
        yield
    finally:
        for live, kept in zip((_picks, _timings, _pinned), saved):
            live.clear()
            live.update(kept)


def reset() -> None:
    """Forget every pick and pinned precision (the next call of each key is timed again)."""
    _picks.clear()
    _timings.clear()
    _pinned.clear()
