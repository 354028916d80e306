"""Test setup: seeded tests, the Triton interpreter on machines without CUDA, GPU tests skipped with a reason.

TRITON_INTERPRET must be set before any @triton.jit function is created, i.e. before care_kernels'
Triton modules are imported, so it is set here at collection time.
"""

import os
import random

import pytest

# Interpreted tl.dot runs numpy matmuls, whose BLAS threads fight torch's: one BLAS thread doubles the
# interpreter's speed. It must precede the first `import numpy` / `import torch`.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_report_header(config):
    import care_kernels
    from care_kernels.env_report import backend_status

    live = ", ".join(f"{k}={'live' if ok else 'off'}" for k, (ok, _) in backend_status().items())
    return [f"care_kernels {care_kernels.__version__} from {os.path.dirname(care_kernels.__file__)}: {live}"]


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none present); run benchmarks/gpu_check.sh on one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    try:
        import numpy as np

        np.random.seed(0)  # noqa: NPY002 - seeds code under test that uses the legacy global generator
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return torch.device("cuda" if _HAS_CUDA else "cpu")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (use with pytestmark = pytest.mark.usefixtures("one_thread")): tiny models
    on a shared 2-core machine only contend with a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_setup(tmp_path_factory):
    """make(name, sizes, seed, design) -> (files, model, processor, config): a demo data set of `sizes` written with
    `design`'s teacher and world, the quick plan's tiny model and processor, and the GRPO arm's trainer config."""

    def make(name: str, sizes, seed: int, design):
        from grpo_care.demo.pipeline import ARMS, QUICK, rl_config
        from grpo_care.demo.synthetic_data import write_dataset
        from grpo_care.demo.tiny_model import build_model_and_processor

        root = tmp_path_factory.mktemp(name)
        files = write_dataset(root / "data", sizes, seed=seed, teacher=design.teacher, world=design.world)
        model, processor = build_model_and_processor(QUICK.model, seed=0)
        return files, model, processor, rl_config(QUICK, files, root / "cfg", 0, ARMS["grpo"])

    return make


@pytest.fixture
def package_env():
    """env(**extra) -> os.environ for a child Python that imports the very care_kernels and grpo_care this test
    process imported (the installed ones in CI, with their built extension; a checkout on PYTHONPATH in
    development), whatever the child's working directory. Run children with cwd=tmp_path as well: a child's
    cwd comes first on its sys.path, and a checkout's care_kernels has no extension unless built in place."""
    from pathlib import Path

    import grpo_care

    import care_kernels

    roots = [str(Path(m.__file__).resolve().parent.parent) for m in (care_kernels, grpo_care)]
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]

    def env(**extra) -> dict:
        return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(roots + rest)), **extra}

    return env


@pytest.fixture
def run_gloo_script(tmp_path):
    """run(script): `script` (Python source that calls init_process_group("gloo", rank=0, world_size=1))
    run in a fresh interpreter in tmp_path with MASTER_ADDR / MASTER_PORT set; asserts it printed "ok" last."""
    import socket
    import subprocess
    import sys

    def run(script: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]

    return run
