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

A pick that runs when timed can still raise when launched for a later call of its key (Triton compiles anew for
argument specializations the key does not name, e.g. a row count's divisibility by 16): it is then dropped for the
key and the call tuned again among the others (in this process only).

While a CUDA graph is being captured nothing is timed (timing synchronizes, which a capture forbids: the capture
would fail): a key not tuned yet runs the first candidate left after pruning, untimed and not kept, so the first
call outside a capture tunes it.

Across processes: Triton keeps tuning results on disk only with `cache_results` and only when no candidate has a
`pre_hook` (it cannot serialize one), and our TMA configs need theirs (the descriptors' block shapes). So the disk
cache here is our own, in Triton's cache directory (TRITON_CACHE_DIR, default ~/.triton/cache): one small JSON
file per kernel and key, keyed by the Triton version, the GPU (name and compute capability), the kernel's source
(with what it calls), the tuning key and the candidates, holding every candidate's timing by its description.
A cached pick maps back to the config object itself, pre_hook included; an entry naming a config the list no longer
has is ignored (tuned again). Tunings where a candidate ran out of memory (which another moment may not) or every
candidate failed are not written. On by default; CARE_KERNELS_AUTOTUNE_CACHE=0 turns it off (the interpreter never
uses it).
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


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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
        self._failures: list[BaseException] = []  # of the tuning in progress
        self._failed_picks: dict[tuple, list[triton.Config]] = {}  # tuning key -> picks that raised when launched

    def _drop(self, config: triton.Config, exc: BaseException) -> list[float]:
        note_dropped(f"Triton kernel {self.base_fn.__name__}", describe(config), exc)
        self._failures.append(exc)
        return list(_INF_TIMING)

    def tuning_key(self, args: tuple, kwargs: dict) -> tuple:
        """The key Autotuner.run files a launch's tuning under: the `key` arguments' values, then the dtype of every
        argument that has one (Triton 3.6 to 3.8)."""
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        named = {name: value for name, value in named.items() if name in self.arg_names}
        key = [named[name] for name in self.keys if name in named]
        return tuple(key + [str(value.dtype) for value in named.values() if hasattr(value, "dtype")])

    def run(self, *args, **kwargs):
        """Autotuner.run, with two changes (see the module docstring): while a CUDA graph is captured, a key not
        tuned yet runs the first candidate left after pruning, untimed and not kept; and a pick that raises when
        launched for a call (e.g. compiling for an argument specialization the timed call did not have) is dropped
        for its key and the call tuned again among the others; the error reaches the caller only when none is left
        (or while a capture runs)."""
        key = self.tuning_key(args, kwargs)
        if len(self.configs) > 1 and _capturing() and key not in self.cache:
            self.nargs = dict(zip(self.arg_names, args))
            first = self.prune_configs(kwargs)[0]
            every = self.configs
            self.configs = [first]  # Autotuner.run launches a single config as is
            try:
                return super().run(*args, **kwargs)
            finally:
                self.configs = every
        first_error = None
        while True:
            try:
                return super().run(*args, **kwargs)
            except Exception as exc:
                pick = self.cache.get(key) if len(self.configs) > 1 else None
                if pick is None or _capturing():
                    raise
                first_error = first_error or exc
                self._drop(pick, exc)
                self._failed_picks.setdefault(key, []).append(pick)
                del self.cache[key]
                self.nargs = dict(zip(self.arg_names, args))
                if not self.prune_configs(kwargs):
                    raise first_error from None

    def prune_configs(self, kwargs: dict) -> list[triton.Config]:
        """Autotuner.prune_configs without the picks that raised when launched for this key (run)."""
        configs = super().prune_configs(kwargs)
        failed = self._failed_picks.get(self.tuning_key(tuple(self.nargs.values()), kwargs))
        return [c for c in configs if c not in failed] if failed else configs

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
        self._failures = []
        bench_fn()
        timings = list(self.configs_timings.values())
        out_of_memory = any(isinstance(exc, torch.OutOfMemoryError) for exc in self._failures)
        if out_of_memory or all(math.isinf(_median(t)) for t in timings):
            return False  # nothing that would hold in another process: tune there again
        record = {"key": [str(k) for k in tuning_key],
                  "timings": [[describe(c), t] for c, t in self.configs_timings.items()]}  # fmt: skip
        try:
            cache.put(json.dumps(record), file_name, binary=False)
        except OSError as exc:  # a read-only cache directory: tuned, just not kept
            _LOG.info("care_kernels: autotune results not cached (%s)", exc)
        return False


def _median(timing) -> float:
    return float(timing[0] if isinstance(timing, (list, tuple)) else timing)


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
