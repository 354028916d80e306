"""benchmarks/compare_checkouts.py runs its cases in child processes of each checkout and reports the ratio."""

import sys
from pathlib import Path

import pytest

import care_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import compare_checkouts  # noqa: E402


def test_two_checkouts_compared_side_by_side():
    # the package the tests import (an in-place build, or the installed one in CI) stands for both checkouts
    root = Path(care_kernels.__file__).resolve().parents[1]
    lines = []
    results = compare_checkouts.compare(root, root, ["fused"], rounds=2, small=True, log=lines.append)
    assert [line.split(":")[0] for line in lines] == [
        "round 1 fused before", "round 1 fused after", "round 2 fused after", "round 2 fused before"]
    for res in results.values():
        assert len(res["before"]) == len(res["after"]) == 2
        assert res["after_over_before"] > 0


def test_a_checkout_that_imports_another_package_is_refused(tmp_path):
    (tmp_path / "python").mkdir()  # no care_kernels here: the child imports the installed / tested one
    with pytest.raises(RuntimeError, match="build it in place"):
        compare_checkouts.run_one(tmp_path, "head", small=True)
