"""`grpo-care` train / eval / demo on a tiny model written to disk, and the evaluation helper."""

import json
import sys
import types
from pathlib import Path

import pytest
from grpo_care import cli
from grpo_care.evaluate import prediction

pytest.importorskip("av", reason="the synthetic clips are written with PyAV (pip install av)")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_prediction_protocol():
    assert prediction("<think>x</think><answer> C </answer>") == "C"
    assert prediction("  B  ") == "B"  # no answer tag: the whole output


def test_train_then_eval_from_the_command_line(tmp_path, capsys):
    from grpo_care.synthetic import main as write_synthetic

    write_synthetic([str(tmp_path / "tiny"), "--n_train", "4", "--n_val", "3"])
    capsys.readouterr()
    data = tmp_path / "tiny" / "data"
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--config",
            str(CONFIGS / "tiny_cpu.yaml"),
            "--model_name_or_path",
            str(tmp_path / "tiny" / "model"),
            "--train_file",
            str(data / "annotations" / "training.jsonl"),
            "--data_root",
            str(data),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--max_completion_length",
            "8",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["global_step"] == 2 and Path(summary["checkpoint"]).name == "checkpoint-2"
    assert (out / "config.yaml").is_file()

    result_file = tmp_path / "eval.json"
    code = cli.main(
        [
            "eval",
            "--model",
            summary["checkpoint"],
            "--data",
            str(data / "annotations" / "validation_L1.jsonl"),
            "--config",
            str(CONFIGS / "tiny_cpu.yaml"),
            "--data_root",
            str(data),
            "--output",
            str(result_file),
            "--eval_max_new_tokens",
            "6",
        ]
    )
    assert code == 0
    (result,) = json.loads(result_file.read_text()).values()
    assert result["num_samples"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    assert set(result["per_level"]) == {"validation_L1"}
    record = result["records"][0]
    assert {"completion", "think", "answer", "gold", "correct", "format_ok"} <= set(record)
    assert record["gold"] in "ABCD" and record["correct"] == (record["answer"] == record["gold"])


def test_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert cli.main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_demo_without_the_demo_module_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "grpo_care.demo", types.ModuleType("grpo_care.demo"))
    monkeypatch.setitem(sys.modules, "grpo_care.demo.main", None)
    assert cli.main(["demo"]) == 2
    assert "grpo_care.demo.main) is not available" in capsys.readouterr().err
