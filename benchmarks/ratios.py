"""Ratios of every provider of one case to every other one, and to the bare-matmul lines (shared by the live
harness, conftest.py, and by report.py, which recomputes them for merged records)."""

from __future__ import annotations

BARE_LINES = (("torch_mm", "vs_bare_matmuls"), ("torch_mm_x4", "vs_fused_floor_matmuls"))


def add_ratios(group: dict[str, dict]) -> None:
    """group: provider -> record with `median_s` (and optional `peak_extra_bytes`); adds, in place,
    time_ratio_vs / memory_ratio_vs {other provider: ratio} and the ratios to the bare-matmul lines."""
    for name, rec in group.items():
        rec["time_ratio_vs"] = {o: rec["median_s"] / x["median_s"] for o, x in group.items() if o != name}
        mem = rec.get("peak_extra_bytes")
        rec["memory_ratio_vs"] = {
            o: mem / x["peak_extra_bytes"]
            for o, x in group.items()
            if o != name and mem is not None and x.get("peak_extra_bytes")
        }
        for ref, field in BARE_LINES:
            if ref in group and ref != name:
                rec[field] = rec["median_s"] / group[ref]["median_s"]
