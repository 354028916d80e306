"""Peak memory of one benchmark case.

CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`) during one run, minus what was
allocated before it (inputs), measured in the benchmark process.

CPU: the peak resident set of a child process (`rss_case.py`) that builds the inputs, resets the kernel's
high-water mark (`/proc/self/clear_refs`), runs only that case once and reads `VmHWM`; reported minus the
resident set right before the run, so inputs, interpreter and libraries are not counted. The children
are forked from one server process per session that has imported torch and the peers (set
CK_BENCH_FORKSERVER=0 for a fresh `python rss_case.py ...` per case instead).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import re
import select
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Set the peak RSS (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cuda_peak(built) -> dict:
    """One more run of an already warmed-up case, with the CUDA allocator's peak around it."""
    built.reset()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = built.run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return {
        "peak_extra_bytes": int(peak - base),
        "memory_method": "cuda max_memory_allocated - allocated before",
    }


class _Server:
    """One `rss_case.py --serve` process per benchmark session (torch and the peers imported once)."""

    proc: subprocess.Popen | None = None

    @classmethod
    def request(cls, req: dict, timeout_s: float) -> dict | None:
        if cls.proc is None or cls.proc.poll() is not None:
            cls.proc = subprocess.Popen(
                [sys.executable, str(HERE / "rss_case.py"), "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
                env=_env(),
            )
        try:
            cls.proc.stdin.write(json.dumps({**req, "timeout_s": int(timeout_s)}) + "\n")
            cls.proc.stdin.flush()
            # the child times itself out (SIGALRM); allow for the server's own imports on the first call
            ready, _, _ = select.select([cls.proc.stdout], [], [], timeout_s + 120)
            line = cls.proc.stdout.readline() if ready else ""
        except (OSError, ValueError):
            line = ""
        if not line.startswith("{"):
            cls.close()
            return None
        return json.loads(line)

    @classmethod
    def close(cls) -> None:
        if cls.proc is not None:
            with contextlib.suppress(OSError, ValueError):
                cls.proc.stdin.close()
            try:
                cls.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                cls.proc.kill()
            cls.proc = None


atexit.register(_Server.close)
close_server = _Server.close


def _env() -> dict:
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )


def subprocess_peak(spec, timeout_s: float) -> dict:
    """Peak RSS of `spec` run alone in a child process (forked from the session's server, else fresh)."""
    req = {"case": spec.case, "provider": spec.provider, "head": spec.head, "n": spec.n, "dtype": spec.dtype}
    if os.environ.get("CK_BENCH_FORKSERVER", "1") != "0" and hasattr(os, "fork"):
        answer = _Server.request(req, timeout_s)
        if answer is not None:
            return answer
    args = [
        sys.executable,
        str(HERE / "rss_case.py"),
        spec.case,
        spec.provider,
        spec.head,
        str(spec.n),
        spec.dtype,
    ]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s + 60, env=_env())
    except subprocess.TimeoutExpired:
        return {"memory_error": f"memory subprocess timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"memory_error": f"memory subprocess failed (rc={proc.returncode}): {' | '.join(tail)}"}
    return json.loads(lines[-1])
