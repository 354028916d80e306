"""Loading the optional native extension.

`care_kernels._C` (CPU kernels) and `care_kernels._C_cuda` (CUDA twins) are compiled against one torch
version. Loading them under another torch can fail with `undefined symbol` or, worse, load and misbehave,
so the build record (`_build_info.json`, written by setup.py) is checked first. Any problem becomes one
warning and a fallback to the torch / Triton paths; `import care_kernels` never fails because of it.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_state: dict[str, object] = {}


def _torch_base_version(version: str) -> str:
    """'2.14.1+cu130' -> '2.14.1': the local tag does not change the C++ ABI of the same release."""
    return version.split("+")[0]


def _load(module: str) -> tuple[object | None, str]:
    if not (_HERE / "_build_info.json").exists() and not list(_HERE.glob(module + "*.so")):
        return None, ("not built (installed with CARE_KERNELS_SKIP_BUILD=1, or run `pip install .`)")
    try:
        info = json.loads((_HERE / "_build_info.json").read_text())
    except (OSError, ValueError) as exc:
        return None, f"build record _build_info.json unreadable ({exc}); reinstall with `pip install .`"
    built = str(info.get("torch_version", "?"))
    if _torch_base_version(built) != _torch_base_version(torch.__version__):
        return None, (
            f"built against torch {built} but torch {torch.__version__} is installed; "
            "rebuild with `pip install --force-reinstall --no-deps .`"
        )
    if not list(_HERE.glob(module + "*.so")):
        return None, f"{module} was not built" + (" (CUDA sources skipped at build time)" if "cuda" in module else "")
    try:
        return importlib.import_module(f"care_kernels.{module}"), ""
    except (ImportError, OSError) as exc:  # broken or foreign .so
        return None, f"failed to load ({exc.__class__.__name__}: {exc}); rebuild with `pip install .`"


def native(module: str = "_C"):
    """The loaded native module, or None (with one warning the first time) when it cannot be used."""
    if module not in _state:
        mod, why = _load(module)
        _state[module] = mod
        _state[module + ":why"] = why
        built_but_unusable = mod is None and "not built" not in why
        if built_but_unusable and module == "_C":
            warnings.warn(
                f"care_kernels: native extension unusable, falling back to the torch/Triton paths: {why}",
                RuntimeWarning,
                stacklevel=2,
            )
    return _state[module]


def why_not(module: str = "_C") -> str:
    """Why `native(module)` is None ('' when it loaded)."""
    native(module)
    return str(_state[module + ":why"])


def cpu_available() -> bool:
    return native("_C") is not None


def cuda_available() -> bool:
    """True when the CUDA twins of the group ops are loaded (they need _C's op schemas first)."""
    return cpu_available() and torch.cuda.is_available() and native("_C_cuda") is not None
