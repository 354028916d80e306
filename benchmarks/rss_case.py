"""Peak resident memory of ONE benchmark case, in a process that runs only that case (CPU benchmarks).

    python benchmarks/rss_case.py CASE PROVIDER HEAD N DTYPE
    -> one JSON line: {"peak_extra_bytes", "peak_rss_bytes", "baseline_rss_bytes", "run_s", "memory_method"}

peak_extra_bytes = VmHWM during the run - VmRSS right before it (after the inputs exist), so it counts
everything the case allocates (logits, workspaces, gradients), not the inputs or the libraries.

    python benchmarks/rss_case.py --serve

is the same as a fork server, so that torch and the peers are imported once per benchmark session rather
than once per case: it reads one JSON spec per line on stdin ({"case", "provider", "head", "n", "dtype",
"timeout_s"}), forks a child that measures only that case, and writes the child's JSON line to stdout.
The server itself only imports (never runs a torch op or starts OpenMP), so forking it is safe.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


import cases  # noqa: E402
import providers  # noqa: E402
from memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss  # noqa: E402
from shapes import Spec, device  # noqa: E402

# imported by the server before it forks, so that no child pays for them
PRELOAD = (
    "care_kernels",
    "care_kernels.losses.fused_linear_grpo",
    "care_kernels.reference.naive",
    "trl.kernels.chunked_logprob",
    "trl.trainer.utils",
    "liger_kernel.chunked_loss",
    "cut_cross_entropy",
)


def measure(case: str, provider: str, head: str, n: int, dtype: str) -> dict:
    spec = Spec(case, provider, head, int(n), dtype)
    dev = device()
    ok, why = providers.PROVIDERS[provider].available(case, dev)
    if not ok:
        return {"memory_error": f"provider unavailable: {why}"}
    inputs = cases.make_inputs(spec, dev)
    built = providers.build(provider, case, inputs, dev)
    if providers.PROVIDERS[provider].compiles:
        built.run()  # compile outside the measurement
    built.reset()
    gc.collect()
    baseline = current_rss_bytes()
    exact = reset_peak_rss()
    t0 = time.perf_counter()
    out = built.run()
    run_s = time.perf_counter() - t0
    peak = peak_rss_bytes()
    del out
    method = "subprocess VmHWM - VmRSS before the run" + (
        "" if exact else " (HWM not resettable: upper bound)"
    )
    return {
        "peak_extra_bytes": max(0, peak - baseline) if peak and baseline else None,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "memory_run_s": run_s,
        "memory_method": method,
    }


def _child(req: dict, out_fd: int) -> None:
    signal.alarm(int(req.get("timeout_s", 600)))
    try:
        result = measure(req["case"], req["provider"], req["head"], req["n"], req["dtype"])
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, never raised
        result, code = {"memory_error": f"{type(exc).__name__}: {exc}"}, 1
    os.write(out_fd, (json.dumps(result) + "\n").encode())
    os._exit(code)


def serve() -> int:
    for name in PRELOAD:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(req, write_fd)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            answer = pipe.read().strip()
        _, status = os.waitpid(pid, 0)
        if not answer:
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            why = "timed out" if sig == signal.SIGALRM else f"died (status {status})"
            answer = json.dumps({"memory_error": f"memory child {why}"})
        print(answer.splitlines()[-1], flush=True)
    return 0


def main(argv: list[str]) -> int:
    if argv == ["--serve"]:
        return serve()
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    result = measure(*argv)
    print(json.dumps(result))
    return 0 if "memory_error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
