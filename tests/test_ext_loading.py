"""The native extension is optional: a missing, foreign or broken binary means one warning and a fallback."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from care_kernels import _ext


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    monkeypatch.setattr(_ext, "_HERE", tmp_path)
    monkeypatch.setattr(_ext, "_state", {})
    return tmp_path


def test_missing_extension_is_reported_not_raised(fake_package):
    assert _ext.native("_C") is None
    assert "not built" in _ext.why_not("_C")


def test_binary_built_against_another_torch_is_refused_with_one_warning(fake_package):
    (fake_package / "_build_info.json").write_text(json.dumps({"torch_version": "1.0.0"}))
    (fake_package / "_C.cpython-x.so").write_bytes(b"\x7fELF not really")
    with pytest.warns(RuntimeWarning, match="built against torch 1.0.0"):
        assert _ext.native("_C") is None
    assert "rebuild" in _ext.why_not("_C")
    assert _ext.native("_C") is None  # cached: no second warning


def test_broken_binary_falls_back(fake_package, monkeypatch):
    (fake_package / "_build_info.json").write_text(json.dumps({"torch_version": torch.__version__}))
    (fake_package / "_C.cpython-x.so").write_bytes(b"garbage")

    def undefined_symbol(name):
        raise ImportError(f"{name}: undefined symbol: _ZN3c104impl")

    monkeypatch.setattr(_ext.importlib, "import_module", undefined_symbol)
    with pytest.warns(RuntimeWarning, match="undefined symbol"):
        assert _ext.native("_C") is None
    assert not _ext.cpu_available()


def test_import_with_a_foreign_build_record_still_works_through_torch(tmp_path):
    """A whole process: the build record says another torch, so care_kernels runs on the torch backend."""
    code = textwrap.dedent(
        """
        import json, warnings, torch
        from care_kernels import _ext
        info = _ext._HERE / "_build_info.json"
        original = info.read_text() if info.exists() else None
        _ext._state.clear()
        import care_kernels._ext as e
        e._HERE = __import__("pathlib").Path(r"{tmp}")
        (e._HERE / "_build_info.json").write_text(json.dumps({{"torch_version": "0.0.1"}}))
        (e._HERE / "_C.so").write_bytes(b"x")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import care_kernels as ck
            from care_kernels import backends
            impl = backends.resolve("auto", torch.device("cpu"))
        lp = ck.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4]))
        print(impl, lp.shape[0], sum("0.0.1" in str(x.message) for x in w))
        """
    ).format(tmp=tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    impl, n, warnings_seen = out.stdout.split()
    assert impl == "torch" and n == "3" and int(warnings_seen) <= 1
