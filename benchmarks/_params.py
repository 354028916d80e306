"""pytest parameters of the benchmark tests: one per (spec), headline specs marked.

CK_BENCH_CASES=grpo_head,dual and CK_BENCH_PROVIDERS=torch_mm,trl_chunked keep only those cases and providers
(exact names; gpu_check.sh runs its phases this way).
"""

from __future__ import annotations

import os

import providers
import pytest
from shapes import specs


def _only(name: str) -> set[str] | None:
    raw = os.environ.get(name, "").strip()
    return {x.strip() for x in raw.split(",") if x.strip()} or None


def params(*case_names: str) -> list:
    out = []
    cases, wanted = _only("CK_BENCH_CASES"), _only("CK_BENCH_PROVIDERS")
    unknown = (wanted or set()) - set(providers.PROVIDERS)
    if unknown:
        known = sorted(providers.PROVIDERS)
        raise ValueError(f"CK_BENCH_PROVIDERS: unknown providers {sorted(unknown)}; choose from {known}")
    for case in case_names:
        if cases is not None and case not in cases:
            continue
        names = [p for p in providers.for_case(case) if wanted is None or p in wanted]
        for spec in specs(case, names):
            marks = [pytest.mark.headline] if spec.headline else []
            out.append(pytest.param(spec, marks=marks, id=f"{case}-{spec}"))
    return out
