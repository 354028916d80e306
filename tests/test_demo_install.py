"""The demo's install is honest: the `[demo]` extra holds what `grpo-care demo` imports, the README's main job
installs it, the test extra includes it; a missing module stops the demo before any work with the extra to
install; a missing (or failing) matplotlib costs only the plot, with a warning."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import grpo_care.demo as demo
import pytest
from grpo_care.demo import report

ROOT = Path(__file__).resolve().parents[1]


def extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml with tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_demo_extra_is_what_the_demo_checks_and_the_test_extra_includes_it():
    demo_extra = extras()["demo"]
    assert {name(r) for r in demo_extra} == set(demo.REQUIRED.values()) | set(demo.PLOTTING.values())
    assert set(demo_extra) <= set(extras()["test"]), "the test extra must include every [demo] requirement"


def test_readme_main_job_installs_the_demo_extra():
    block = (ROOT / "README.md").read_text().split("```")[1]
    main_job = next(line for line in block.splitlines() if "grpo-care demo" in line)
    assert 'pip install ".[demo]"' in main_job and ".[test]" not in main_job


def test_a_missing_module_stops_the_demo_before_any_work(tmp_path, monkeypatch, capsys):
    import grpo_care.demo.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run_demo", lambda *a, **k: pytest.fail("the demo started without av"))
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "av is not installed" in err and 'pip install "care-kernels[demo]"' in err
    assert not out.exists()


def test_a_broken_module_is_named_too(monkeypatch):
    real_import = __import__

    def broken_torchvision(module, *args, **kwargs):
        if module == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(module, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr("builtins.__import__", broken_torchvision)
    assert demo.unimportable({"torchvision": "torchvision"}) == [
        "torchvision fails to import (RuntimeError: operator torchvision::nms does not exist)"]


def test_without_matplotlib_the_demo_runs_and_skips_only_the_plot(tmp_path, monkeypatch, capsys):
    import grpo_care.demo.pipeline as pipeline

    def finished_run(out_dir, plan, seed=0, **_):
        plot = report.plot_curves(out_dir / "curves.png", {"GRPO": [{"step": 1, "reward": 0.5}]})
        table = report.results_table({"GRPO": {"accuracy": {}, "accuracy_overall": 0.5, "consistency": 0.5,
                                               "n": 3}})
        meta = {"noise": "", "seconds": {"wall_s": 1.0, "cpu_s": 1.0}, "machine": "m",
                "load_average_1min_at_end": 0.0, "speed_probe": {"tflops": 0.1, "gemm": "g"},
                "warm_start": {"perception_L1": 1.0, "reached_perception_target": True}}
        json_path, md_path = report.write_report(out_dir, table, meta)
        return {"table": table, "meta": meta,
                "paths": {"json": str(json_path), "markdown": str(md_path), "plot": plot}}

    monkeypatch.setattr(pipeline, "run_demo", finished_run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "demo"
    with pytest.warns(UserWarning) as warned:
        assert demo.main(["--quick", "--output_dir", str(out)]) == 0
    messages = [str(w.message) for w in warned]
    assert any("matplotlib is not installed" in m and "care-kernels[demo]" in m for m in messages)
    assert any("curves.png skipped" in m for m in messages)
    assert (out / "results.json").is_file() and (out / "results.md").is_file() and not (out / "curves.png").exists()
    assert "plot: skipped" in capsys.readouterr().out


def test_plot_curves_never_raises(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    runs = {"GRPO": [{"step": s, "reward": 0.1 * s, "accuracy": 0.5, "consistency": None} for s in (1, 2, 3)]}
    assert report.plot_curves(tmp_path / "ok.png", runs).read_bytes()[:4] == b"\x89PNG"

    def no_fonts(*args, **kwargs):
        raise OSError("cannot find a font")

    monkeypatch.setattr(plt, "subplots", no_fonts)
    with pytest.warns(UserWarning, match=r"bad.png skipped: the plot could not be drawn \(OSError: cannot find"):
        assert report.plot_curves(tmp_path / "bad.png", runs) is None
    assert not (tmp_path / "bad.png").exists()


def test_demo_clips_decode_to_the_same_frames_with_or_without_decord(tmp_path):
    """`[demo]` has PyAV, not decord: the trainer's fallback must give the demo the very frames decord gives."""
    pytest.importorskip("av", reason="the demo writes its clips with PyAV")
    pytest.importorskip("decord", reason="compares with decord")
    import numpy as np
    from grpo_care import video
    from grpo_care.demo.synthetic_data import DatasetSizes, write_dataset

    write_dataset(tmp_path, DatasetSizes(train=4, sft=4, eval_per_level=2), seed=0)
    clips = sorted(tmp_path.glob("videos/**/*.mp4"))
    assert len(clips) >= 8
    budget = video.VisualBudget(min_frames=4, max_frames=4, video_min_pixels=3136, video_max_pixels=10**7)
    for clip in clips:
        decord_frames, decord_fps = video._read_decord(str(clip), budget)
        pyav_frames, pyav_fps = video._read_pyav(str(clip), budget)
        assert np.array_equal(decord_frames, pyav_frames), clip
        assert pyav_fps == pytest.approx(decord_fps, rel=1e-6), clip
