"""`python -m care_kernels.env_report`: versions, the device, and which backends are live (and why not).

Paste its output into bug reports.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - a broken install is still something to report
        return f"not available ({exc.__class__.__name__})"


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"cuda: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from care_kernels import cpu_backend

    isa = torch.backends.cpu.get_cpu_capability()
    kernels = cpu_backend.isa()
    line = f"cpu: {cpu}, {torch.get_num_threads()} threads, ATen {isa}"
    return line + (f", cpp epilogues {kernels}" if kernels else "")


def backend_status() -> dict[str, tuple[bool, str]]:
    """{backend: (live, why not)} for triton, cpp, cuda and torch."""
    import torch

    from care_kernels import _ext, backends

    status = {"triton": backends.triton_status(), "cpp": backends.cpp_status()}
    if not torch.cuda.is_available():
        status["cuda"] = (False, "no CUDA device")
    elif not _ext.cpu_available():
        status["cuda"] = (False, "needs the native extension: " + _ext.why_not("_C"))
    elif _ext.native("_C_cuda") is None:
        status["cuda"] = (False, _ext.why_not("_C_cuda"))
    else:
        status["cuda"] = (True, "")
    status["torch"] = (True, "")
    return status


def report() -> str:
    import care_kernels

    lines = [
        f"python        {sys.version.split()[0]} ({platform.platform()})",
        f"torch         {_version('torch')}",
        f"triton        {_version('triton')}",
        f"transformers  {_version('transformers')}",
        f"care_kernels  {care_kernels.__version__}",
        f"device        {_device()}",
        "backends:",
    ]
    for name, (live, why) in backend_status().items():
        lines.append(f"  {name:<7} {'live' if live else 'off'}" + ("" if live else f"  ({why})"))
    lines.append("knobs:")
    for env, default in (("CARE_KERNELS_LOGITS_GEMM", "auto"), ("CARE_KERNELS_WARP_SPECIALIZE", "1")):
        lines.append(f"  {env}={os.environ.get(env, default)}" + ("" if env in os.environ else " (default)"))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
