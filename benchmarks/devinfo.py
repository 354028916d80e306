"""The machine and software a benchmark ran on: what goes beside every published number."""

from __future__ import annotations

import datetime
import os
import platform
import re
from importlib import metadata
from pathlib import Path

import torch


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def info() -> dict:
    """Versions, device name and the results-folder slug of this machine."""
    try:
        import care_kernels

        ck_version = care_kernels.__version__
    except Exception:  # noqa: BLE001 - report what we can
        ck_version = None
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    cuda = torch.cuda.is_available()
    threads = torch.get_num_threads()
    if cuda:
        device_name = torch.cuda.get_device_name()
        device_slug = slug(device_name)
    else:
        device_name = f"{cpu_model()} ({threads} threads, {os.cpu_count()} CPUs)"
        device_slug = f"cpu-{slug(cpu_model())}-{threads}t"
    try:
        from care_kernels import cpu_backend

        cpp_isa = cpu_backend.isa()
    except Exception:  # noqa: BLE001
        cpp_isa = None
    return {
        "device": "cuda" if cuda else "cpu",
        "device_name": device_name,
        "device_slug": device_slug,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        # Ratios can differ between instruction sets: ATen's kernels and the C++ epilogues follow this choice.
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "cpp_isa": cpp_isa,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "triton": triton_version,
        "care_kernels": ck_version,
        "trl": _version("trl"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy") or _version("cut_cross_entropy"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": loadavg(),
    }


def loadavg() -> float | None:
    """1-minute load average: on a CPU run, anything near the core count means disturbed timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
