"""Build script: setuptools drives CMake to compile the native extension `care_kernels._C`.

torch is imported only inside the build step, after pip has installed the build requirements
declared in pyproject.toml. Environment knobs:

  CARE_KERNELS_SKIP_BUILD=1      install the pure-Python packages only (torch / Triton paths)
  CARE_KERNELS_CUDA=auto|0|1     also build the CUDA twins `care_kernels._C_cuda` (auto: when nvcc and a
                                 CUDA build of torch are both present)
  MAX_JOBS=N                     parallel compile jobs (default: all cores)
  CARE_KERNELS_DEBUG=1           build with -O0 -g
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _cmake() -> str:
    """The cmake of the build environment (pip's `cmake` package) when present, else the one on PATH."""
    try:
        import cmake  # noqa: PLC0415

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except (ImportError, AttributeError):
        return shutil.which("cmake") or "cmake"


def _find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return str(Path(candidate) / "bin" / "nvcc")
    return shutil.which("nvcc")


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Runs one CMake build for care_kernels._C (and _C_cuda) and records the torch it was built against."""

    def initialize_options(self):
        super().initialize_options()
        self._extra_outputs: list[Path] = []  # _C_cuda and the build record, besides _C itself

    def get_outputs(self):
        return super().get_outputs() + [str(p) for p in self._extra_outputs]

    def copy_extensions_to_source(self):
        # Editable installs (pip install -e .) copy _C into the source tree; bring its companions along.
        super().copy_extensions_to_source()
        package_dir = Path(self.get_finalized_command("build_py").get_package_dir("care_kernels"))
        for path in self._extra_outputs:
            shutil.copyfile(path, package_dir / path.name)

    def run(self):
        if _env_flag("CARE_KERNELS_SKIP_BUILD", "0") in ("1", "true", "yes"):
            print("care_kernels: CARE_KERNELS_SKIP_BUILD=1, skipping the native extension")
            return
        super().run()

    def build_extension(self, ext: Extension):
        if ext.name != "care_kernels._C":
            return  # both targets come out of one CMake build
        import torch  # noqa: PLC0415 - present by now (a build requirement)
        from torch.utils import cpp_extension  # noqa: PLC0415

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)

        cuda_mode = _env_flag("CARE_KERNELS_CUDA", "auto")
        nvcc = _find_nvcc()
        want_cuda = False
        if cuda_mode in ("1", "true", "yes", "on"):
            if torch.version.cuda is None or nvcc is None:
                raise RuntimeError(
                    "CARE_KERNELS_CUDA=1 but "
                    + ("torch is a CPU build" if torch.version.cuda is None else "nvcc was not found")
                    + "; install a CUDA build of torch and set CUDA_HOME, or use CARE_KERNELS_CUDA=auto"
                )
            want_cuda = True
        elif cuda_mode == "auto":
            want_cuda = torch.version.cuda is not None and nvcc is not None
        if not want_cuda:
            reason = "CARE_KERNELS_CUDA=0" if cuda_mode in ("0", "false", "no", "off") else (
                "torch is a CPU build" if torch.version.cuda is None else "no nvcc found (set CUDA_HOME)")
            print(f"care_kernels: skipping the CUDA sources in csrc/cuda ({reason})")

        torch_dir = Path(torch.__file__).resolve().parent
        site_packages = torch_dir.parent
        cuda_includes = [str(p) for p in sorted(site_packages.glob("nvidia/*/include"))]
        # Our sources are C++17; newer torch headers refuse anything below C++20 (ATen.h #errors).
        aten_h = torch_dir / "include" / "ATen" / "ATen.h"
        cxx_std = 20 if aten_h.exists() and "C++20 or later" in aten_h.read_text() else 17
        cfg = "Debug" if _env_flag("CARE_KERNELS_DEBUG", "0") == "1" else "Release"
        import pybind11  # noqa: PLC0415

        cmake_args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
            f"-DTORCH_LIBRARY_DIR={torch_dir / 'lib'}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DTORCH_VERSION_STRING={torch.__version__}",
            f"-DCARE_KERNELS_CXX_STANDARD={cxx_std}",
            f"-DCARE_KERNELS_WITH_CUDA={'ON' if want_cuda else 'OFF'}",
        ]
        if want_cuda:
            cmake_args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCARE_KERNELS_CUDA_EXTRA_INCLUDES={';'.join(cuda_includes)}",
            ]
        if shutil.which("ninja"):
            cmake_args.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)

        subprocess.check_call([_cmake(), str(ROOT), *cmake_args], cwd=build_temp)
        subprocess.check_call([_cmake(), "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp)

        # The build record: which torch the binaries were compiled against (checked at import time).
        info = {"torch_version": torch.__version__, "cuda": want_cuda, "torch_cuda": torch.version.cuda}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "_build_info.json").write_text(json.dumps(info, indent=1) + "\n")
        self._extra_outputs = [out_dir / "_build_info.json", *sorted(out_dir.glob("_C_cuda*.so"))]


setup(
    packages=find_packages(include=["care_kernels", "care_kernels.*"])
    + find_packages("python", include=["grpo_care", "grpo_care.*"]),
    package_dir={"grpo_care": "python/grpo_care"},
    package_data={"care_kernels": ["_build_info.json"], "care_kernels.triton": ["verified_configs.json"],
                  "grpo_care": ["configs/*.yaml"]},
    ext_modules=[CMakeExtension("care_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
