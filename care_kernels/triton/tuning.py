"""Autotuning that cannot break a call: a failing candidate is dropped, the results are kept across processes.

    tuned = tuning.autotune(configs, key=["H", "N_CLASS"], prune=prune_fn)(kernel)   # as triton.autotune

Triton's autotuner (3.6 to 3.8) turns only OutOfResources, CompileTimeAssertionFailure and PTXASError into an
infinite time; any other exception of one candidate config (a compiler pass that fails, a launch error, an error
the driver reports at the synchronize after a run) reaches the user's call. `SafeAutotuner` times the same
candidates the same way and turns *any* exception into an infinite time: the candidate is dropped for that key,
logged once with its config (logger "care_kernels", WARNING) and listed by `dropped()`, and the call goes on with
the fastest candidate that ran. (A fault that corrupts the CUDA context, e.g. an illegal address, fails every
later launch too: no timing loop can recover from it. Configs never run on a GPU architecture are therefore not
candidates there by default: see care_kernels.triton.verified.)

Across processes: Triton keeps tuning results on disk only with `cache_results` and only when no candidate has a
`pre_hook` (it cannot serialize one), and our TMA configs need theirs (the descriptors' block shapes). So the disk
cache here is our own, in Triton's cache directory (TRITON_CACHE_DIR, default ~/.triton/cache): one small JSON
file per kernel and key, keyed by the Triton version, the GPU (name and compute capability), the kernel's source
(with what it calls), the tuning key and the candidates, holding every candidate's timing by its description.
A cached pick maps back to the config object itself, pre_hook included. On by default; CARE_KERNELS_AUTOTUNE_CACHE=0
turns it off (the interpreter never uses it).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
from collections.abc import Callable

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.cache import get_cache_manager
from triton.runtime.driver import driver as _driver

_LOG = logging.getLogger("care_kernels")
CACHE_ENV = "CARE_KERNELS_AUTOTUNE_CACHE"
_INF_TIMING = [math.inf, math.inf, math.inf]  # Triton's (median, p20, p80) of a candidate that cannot run

# (where, candidate) -> "ExceptionType: message" of every candidate dropped in this process, in order.
_DROPPED: dict[tuple[str, str], str] = {}


def note_dropped(where: str, candidate: str, exc: BaseException) -> None:
    """Record (and log, the first time) that `candidate` of `where` raised `exc` and was dropped."""
    if (where, candidate) in _DROPPED:
        return
    message = f"{type(exc).__name__}: {exc}".strip()
    if len(message) > 600:
        message = message[:600] + " ..."
    _DROPPED[(where, candidate)] = message
    _LOG.warning("care_kernels: %s: candidate [%s] failed and is dropped; the call goes on with the others (%s)",
                 where, candidate, message)  # fmt: skip


def dropped() -> list[dict]:
    """Every candidate dropped in this process: [{"where", "candidate", "error"}] (benchmarks record them)."""
    return [{"where": w, "candidate": c, "error": e} for (w, c), e in _DROPPED.items()]


def cache_enabled() -> bool:
    return os.environ.get(CACHE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def describe(config: triton.Config) -> str:
    """A config's identity for logs and the disk cache: Triton's own description (meta-parameters, warps, stages,
    register cap), which tells apart any two configs of one list."""
    return str(config)


def _device_identity() -> str:
    if not torch.cuda.is_available():
        return "no-cuda"
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} cc{major}.{minor} torch-cuda {torch.version.cuda or torch.version.hip}"


def _source_key(fn) -> str:
    """The kernel's source with what it calls (Triton's JITFunction.cache_key), or its own source."""
    key = getattr(fn, "cache_key", None)
    if key:
        return str(key)
    base = fn
    while not inspect.isfunction(base):
        base = base.fn
    return hashlib.sha256(inspect.getsource(base).encode()).hexdigest()


class SafeAutotuner(Autotuner):
    """triton's Autotuner with two changes: a candidate that raises anything is dropped (infinite time, logged
    once), and the tuning results go to a disk cache that keeps pre_hooks (see the module docstring)."""

    def __init__(self, fn, arg_names, configs, key, prune_configs_by=None, do_bench=None, restore_value=None):
        super().__init__(fn, arg_names, configs, key, reset_to_zero=None, restore_value=restore_value,
                         prune_configs_by=prune_configs_by, do_bench=do_bench)  # fmt: skip
        self.cache_results = not _interpreting()  # whether to consult check_disk_cache; the env is read there
        self._benching: triton.Config | None = None

    def _drop(self, config: triton.Config, exc: BaseException) -> list[float]:
        note_dropped(f"Triton kernel {self.base_fn.__name__}", describe(config), exc)
        return list(_INF_TIMING)

    @property
    def do_bench(self):  # Autotuner's is a cached_property: this one wraps it
        inner = self._do_bench or _driver.active.get_benchmarker()

        def timed(kernel_call, quantiles):
            try:
                return inner(kernel_call, quantiles=quantiles)
            except Exception as exc:  # noqa: BLE001 - any failure of one candidate drops it, never the call
                return self._drop(self._benching, exc)

        return timed

    def _bench(self, *args, config, **meta):
        self._benching = config
        try:
            return super()._bench(*args, config=config, **meta)
        except Exception as exc:  # noqa: BLE001 - e.g. a pre_hook that cannot take this config
            return self._drop(config, exc)
        finally:
            self._benching = None

    def _disk_cache_key(self, tuning_key: tuple, configs: list[triton.Config]) -> str:
        parts = [triton.__version__, _device_identity(), _source_key(self.fn), repr(tuning_key),
                 *(describe(c) for c in configs)]  # fmt: skip
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def check_disk_cache(self, tuning_key, configs, bench_fn) -> bool:
        """Triton's hook for cached tuning (called instead of benchmarking when cache_results is set): the pick
        and every candidate's timing from the disk when this exact tuning was done before, else bench_fn()
        and store its results. Returns whether the cache answered."""
        if not tuning_key or not cache_enabled():
            bench_fn()
            return False
        cache = get_cache_manager(self._disk_cache_key(tuning_key, configs))
        file_name = f"{self.base_fn.__name__[:120]}.care_kernels_autotune.json"
        by_name = {describe(c): c for c in configs}
        path = cache.get_file(file_name)
        if path:
            try:
                with open(path) as fh:
                    stored = json.load(fh)
                timings = {by_name[name]: timing for name, timing in stored["timings"]}
            except (OSError, ValueError, KeyError, TypeError):
                timings = {}
            if timings and len(timings) == len(configs):
                self.configs_timings = timings
                self.cache[tuning_key] = min(timings, key=timings.get)
                return True
        bench_fn()
        record = {"key": [str(k) for k in tuning_key],
                  "timings": [[describe(c), t] for c, t in self.configs_timings.items()]}  # fmt: skip
        try:
            cache.put(json.dumps(record), file_name, binary=False)
        except OSError as exc:  # a read-only cache directory: tuned, just not kept
            _LOG.info("care_kernels: autotune results not cached (%s)", exc)
        return False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune(configs: list[triton.Config], key: list[str], prune: Callable | None = None, do_bench=None,
             restore_value: list[str] | None = None):  # fmt: skip
    """Decorator like `triton.autotune(configs=..., key=..., prune_configs_by={"early_config_prune": prune},
    restore_value=...)`, with a SafeAutotuner. do_bench: a benchmarker `(kernel_call, quantiles) -> [median, p20,
    p80]` (tests). restore_value: arguments a kernel writes in place, restored after each timed run."""

    def decorator(fn):
        by = {"early_config_prune": prune} if prune is not None else None
        return SafeAutotuner(fn, fn.arg_names, configs, key, prune_configs_by=by, do_bench=do_bench,
                             restore_value=restore_value)  # fmt: skip

    return decorator
