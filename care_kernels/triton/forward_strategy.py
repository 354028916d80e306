"""Which forward computes a call's statistics: the fused Triton kernel, or cuBLAS GEMMs folded by Triton.

    CARE_KERNELS_FORWARD_STRATEGY=auto (default) | fused | cublas      # for a process
    with forward_strategy.use("fused"): ...                            # for a block of code

`auto` times every strategy that can run on the first call of each shape key (on a CUDA device, large calls
only) and keeps the fastest for that key, as Triton's autotuner keeps a config. The strategies agree to fp32
rounding (both keep fp32 logits), so the choice changes speed, not precision. Calls made while a CUDA graph
is being captured are never timed: they take the first strategy until the key has been tuned outside one.
A forced strategy that cannot run on a call's operands (cublas on fp32 ones) falls back to the fused kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import statistics
from collections.abc import Callable, Iterator

import torch

ENV = "CARE_KERNELS_FORWARD_STRATEGY"
STRATEGIES = ("fused", "cublas")
KEY_ARGS = ["H", "REF_H", "V", "N_CLASS", "N_BITS", "DUAL", "WITH_ENTROPY", "HAS_BIAS", "REF_HAS_BIAS", "dtypes",
            "device"]  # fmt: skip
TIMED_RUNS = 5

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("care_kernels_forward_strategy", default=None)
_picks: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}


def _check(name: str, source: str) -> str:
    name = name.strip().lower() or "auto"
    if name not in ("auto", *STRATEGIES):
        raise ValueError(f"{source}={name!r}: pass one of 'auto', 'fused', 'cublas'")
    return name


def requested() -> str:
    """The strategy asked for: `use(...)`'s, else the environment variable's, else 'auto'."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _check(os.environ.get(ENV, "auto"), ENV)


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Run the calls in this block with strategy `name` ('auto', 'fused' or 'cublas'), whatever the environment."""
    token = _forced.set(_check(name, "forward_strategy.use"))
    try:
        yield
    finally:
        _forced.reset(token)


def _median_ms(run: Callable[[], object]) -> float:
    """Median time of `run` over TIMED_RUNS calls after one untimed call; inf if it runs out of GPU memory (the
    cuBLAS strategy's slab may not fit where the fused kernel's O(N) buffers do)."""
    try:
        run()  # the first call compiles (and, for the fused kernel, autotunes): not timed
        times = []
        for _ in range(TIMED_RUNS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    except torch.OutOfMemoryError:
        return math.inf
    return statistics.median(times)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def choose(key: tuple, candidates: dict[str, Callable[[], object]], *, tune: bool,
           device: torch.device | None = None) -> str:  # fmt: skip
    """The strategy to run for a call with this key.

    candidates: {name: a thunk running that strategy on the call's inputs}, those that can run here, the default
    first. tune: whether timing is allowed for this call (large, on CUDA); otherwise the first candidate runs
    unless the key was tuned before or a strategy is forced. device: the inputs' CUDA device (timed there).
    A candidate that runs out of memory while timed is never picked for the key; if all do, the error is raised.
    """
    first = next(iter(candidates))
    want = requested()
    if want != "auto":
        return want if want in candidates else first
    if _picks.get(key) in candidates:
        return _picks[key]
    if len(candidates) == 1 or not tune or _capturing():
        return first
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        timings = {name: _median_ms(run) for name, run in candidates.items()}
    if all(math.isinf(ms) for ms in timings.values()):
        candidates[first]()  # raises the out-of-memory error the caller would have had
    _timings[key] = timings
    _picks[key] = min(timings, key=timings.__getitem__)
    return _picks[key]


def picks() -> list[dict]:
    """The strategies `auto` picked in this process, in autotuned_configs' format (benchmarks record them)."""
    return [
        {"kernel": "forward strategy", "key_args": KEY_ARGS, "key": [str(k) for k in key], "config": {},
         "label": pick, "timings_ms": dict(_timings.get(key, {}))}
        for key, pick in _picks.items()
    ]  # fmt: skip


def reset() -> None:
    """Forget every pick (the next call of each key is timed again)."""
    _picks.clear()
    _timings.clear()
