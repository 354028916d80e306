"""pytest parameters of the benchmark tests: one per (spec), headline specs marked."""

from __future__ import annotations

import providers
import pytest
from shapes import specs


def params(*case_names: str) -> list:
    out = []
    for case in case_names:
        for spec in specs(case, providers.for_case(case)):
            marks = [pytest.mark.headline] if spec.headline else []
            out.append(pytest.param(spec, marks=marks, id=f"{case}-{spec}"))
    return out
