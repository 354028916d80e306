"""`grpo-care` answers a user's mistakes in one line (the argument, where its value came from, what to do), exit
status 2, no traceback; `--debug` / GRPO_CARE_DEBUG=1 bring the traceback back. Nothing is loaded, and a path
that looks local is never sent to the Hugging Face hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from grpo_care import cli
from grpo_care.config import GRPOCareConfig
from grpo_care.user_errors import UsageError, looks_local

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    """Run from an empty directory (no outputs/ there), offline, with the hub and the loaders booby-trapped."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def no_loading(*args, **kwargs):
        raise AssertionError(f"a model was loaded or the hub asked: {args}")

    import huggingface_hub
    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_loading)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_loading)
    import grpo_care.modeling

    monkeypatch.setattr(grpo_care.modeling, "load_model", no_loading)
    monkeypatch.setattr(grpo_care.modeling, "build_model", no_loading)
    return tmp_path


def one_line_error(capsys, argv, command="train"):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line:\n{err}"
    assert err.startswith(f"grpo-care {command}: error: ") and "Traceback" not in err
    return err


def saved_model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_missing_config_file(capsys, elsewhere):
    err = one_line_error(capsys, ["train", "--config", "configs/nope.yaml"])
    assert f"config file 'configs/nope.yaml' under {elsewhere} does not exist (given as --config)" in err
    assert "--config configs/tiny_cpu.yaml" in err
    (elsewhere / "broken.yaml").write_text("max_steps: [1\n")
    err = one_line_error(capsys, ["train", "--config", "broken.yaml"])
    assert "broken.yaml is not valid YAML at line 2" in err


def test_wrongly_typed_field_says_whether_the_file_or_the_command_line_set_it(capsys, elsewhere):
    err = one_line_error(capsys, ["train", "--config", str(TINY), "--num_generations", "four"])
    assert "num_generations must be int, got 'four' (given on the command line as --num_generations four)" in err
    assert "pass another value to --num_generations" in err and str(TINY) not in err

    (elsewhere / "mine.yaml").write_text("num_generations: four\nlearning_rate: 1.0e-4\n")
    err = one_line_error(capsys, ["train", "--config", "mine.yaml", "--max_steps", "3"])
    assert "num_generations must be int, got 'four' (set in mine.yaml as num_generations: four)" in err
    assert "change `num_generations:` in mine.yaml" in err

    err = one_line_error(capsys, ["train", "--config", "mine.yaml", "--num_generations", "4", "--use_care", "maybe"])
    assert "use_care must be bool, got 'maybe' (given on the command line as --use_care maybe)" in err


def test_out_of_range_value(capsys, elsewhere):
    err = one_line_error(capsys, ["train", "--config", str(TINY), "--num_generations", "1"])
    assert "num_generations must be >= 2 (group statistics), got 1 " \
           "(given on the command line as --num_generations 1)" in err
    err = one_line_error(capsys, ["train", "--config", str(TINY), "--beta", "-1"])
    assert "beta must be >= 0, got -1.0 (given on the command line as --beta -1)" in err
    (elsewhere / "mine.yaml").write_text("top_p: 1.5\n")
    err = one_line_error(capsys, ["train", "--config", "mine.yaml", "--max_steps", "3"])
    assert "top_p must be in (0, 1], got 1.5 (set in mine.yaml as top_p: 1.5); change `top_p:` in mine.yaml" in err


def test_unknown_or_incomplete_option(capsys):
    err = one_line_error(capsys, ["train", "--config", str(TINY), "--num_generatoins", "4"])
    assert "unrecognized arguments: --num_generatoins 4 (did you mean --num_generations?)" in err
    err = one_line_error(capsys, ["train", "--config", str(TINY), "--max_steps"])
    assert "argument --max_steps: expected one argument" in err
    err = one_line_error(capsys, ["eval", "--model", "m", "--data", "a.jsonl", "--max_samples", "four"], "eval")
    assert "--max_samples: invalid int value: 'four'" in err


def test_missing_local_model_directory_never_reaches_the_hub(capsys, elsewhere):
    # the tiny config, outputs/tiny not written yet: the command that writes it
    err = one_line_error(capsys, ["train", "--config", str(TINY)])
    assert f"model_name_or_path: no such directory 'outputs/tiny/model' under {elsewhere}" in err
    assert f"(set in {TINY} as model_name_or_path: outputs/tiny/model)" in err
    assert "`python -m grpo_care.synthetic outputs/tiny` writes it" in err
    # any other local-looking path
    err = one_line_error(capsys, ["train", "--config", str(TINY), "--model_name_or_path", "./models/mine"])
    assert "no such directory './models/mine'" in err and "given on the command line" in err
    assert "Repo id must be" not in err
    (elsewhere / "empty").mkdir()
    err = one_line_error(capsys, ["train", "--config", str(TINY), "--model_name_or_path", "empty"])
    assert "'empty' under" in err and "a directory without config.json, not a saved model" in err


def test_hub_id_while_offline_and_not_cached(capsys):
    err = one_line_error(capsys, ["train", "--config", str(TINY), "--model_name_or_path", "someone/no-such-model"])
    assert "'someone/no-such-model' is not a local directory, and the hub is off (HF_HUB_OFFLINE)" in err


def test_missing_annotation_file(capsys, elsewhere):
    model = saved_model(elsewhere / "outputs" / "tiny" / "model")
    err = one_line_error(capsys, ["train", "--config", str(TINY), "--model_name_or_path", str(model)])
    assert "train_file: the annotation file 'outputs/tiny/data/annotations/training.jsonl' under" in err
    assert "does not exist (set in" in err and "`python -m grpo_care.synthetic outputs/tiny` writes it" in err
    err = one_line_error(capsys, ["train", "--model_name_or_path", str(model)])
    assert "train_file is empty (the default)" in err and "--train_file FILE" in err
    (elsewhere / "train.jsonl").write_text("")
    err = one_line_error(capsys, ["train", "--model_name_or_path", str(model), "--train_file", "train.jsonl",
                                  "--data_root", "nowhere"])
    assert "data_root: the data root 'nowhere' under" in err
    assert "given on the command line as --data_root nowhere" in err


def test_eval_missing_model_and_data(capsys, elsewhere):
    err = one_line_error(capsys, ["eval", "--model", "outputs/run/checkpoint-4", "--data", "v.jsonl"], "eval")
    assert "--model: no such directory 'outputs/run/checkpoint-4'" in err
    assert "`grpo-care train` writes checkpoint-N into its output_dir" in err
    err = one_line_error(capsys, ["eval", "--model", "outputs/nope", "--data", "v.jsonl"], "eval")
    assert "'outputs/nope' is not a local directory, and the hub is off" in err  # could be a hub id: namespace/name
    model = saved_model(elsewhere / "ckpt")
    err = one_line_error(capsys, ["eval", "--model", str(model), "--data", "v.jsonl"], "eval")
    assert "--data: the annotation file 'v.jsonl' under" in err and "does not exist" in err


def test_eval_hub_failure_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import grpo_care.modeling

    def unreachable(config, device=None):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(grpo_care.modeling, "load_model", unreachable)
    Path("v.jsonl").write_text("")
    err = one_line_error(capsys, ["eval", "--model", "someone/model", "--data", "v.jsonl", "--judge", "none"], "eval")
    assert "--model: 'someone/model' could not be loaded from the Hugging Face hub: We couldn't connect" in err


def test_debug_brings_the_traceback_back(capsys, monkeypatch):
    with pytest.raises(UsageError, match="num_generations must be int"):
        cli.main(["train", "--config", str(TINY), "--num_generations", "four", "--debug"])
    with pytest.raises(UsageError, match="config file"):
        cli.main(["--debug", "train", "--config", "nope.yaml"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(UsageError):
        cli.main(["train", "--config", "nope.yaml"])
    monkeypatch.setenv(cli.DEBUG_ENV, "0")
    assert cli.main(["train", "--config", "nope.yaml"]) == 2


def test_the_process_exits_2_without_a_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]), HF_HUB_OFFLINE="1")
    env.pop(cli.DEBUG_ENV, None)
    run = subprocess.run([sys.executable, "-m", "grpo_care.cli", "train", "--config", str(TINY)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "python -m grpo_care.synthetic outputs/tiny" in run.stderr
    debug = subprocess.run([sys.executable, "-m", "grpo_care.cli", "train", "--config", str(TINY), "--debug"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_config_records_where_each_value_came_from(tmp_path):
    (tmp_path / "c.yaml").write_text("max_steps: 3\n")
    config = GRPOCareConfig.from_cli(["--config", str(tmp_path / "c.yaml"), "--seed", "7"])
    assert config.describe_source("max_steps") == f"set in {tmp_path / 'c.yaml'} as max_steps: 3"
    assert config.describe_source("seed") == "given on the command line as --seed 7"
    assert config.describe_source("top_p") == "the default"
    assert json.loads(json.dumps(config.to_dict()))["seed"] == 7  # nothing extra in the saved fields
    assert GRPOCareConfig.from_yaml(str(tmp_path / "c.yaml")) == GRPOCareConfig(max_steps=3)


@pytest.mark.parametrize("name, local", [
    ("Qwen/Qwen2.5-VL-7B-Instruct", False), ("gpt2", False), ("outputs/tiny/model", True), ("./m", True),
    ("/abs/m", True), ("~/m", True), ("a/b/", True), ("bad name/x", True), ("C:\\models\\m", True),
])
def test_looks_local(name, local):
    assert looks_local(name) is local


# ------------------------------------------------------------------------------------------------------------
# everything else a user can get wrong, said in one line before the model loads

RECORD = {"sample_id": 0, "question": "what next?", "answer": "pick up spoon", "video_source": "EpicKitchens",
          "video_basename": "clip_0.mp4", "current_observation_basename": "obs_0.png",
          "negative_answers": ["open fridge", "close tap", "turn off light"]}


def tiny_inputs(root: Path) -> list[str]:
    """A saved-looking model directory and a one-record annotation file: what `train` checks before loading."""
    model = saved_model(root / "m")
    (root / "train.jsonl").write_text(json.dumps(RECORD) + "\n")
    return ["--model_name_or_path", str(model), "--train_file", "train.jsonl", "--data_root", str(root)]


def test_options_are_never_abbreviated(capsys, elsewhere):
    """argparse's prefix matching took `--lr 1e-5` as --lr_scheduler_type and `--num_gen` as --num_generations."""
    err = one_line_error(capsys, ["train", "--config", str(TINY), "--lr", "1e-5"])
    assert "unrecognized arguments: --lr 1e-5" in err
    err = one_line_error(capsys, ["train", "--config", str(TINY), "--num_gen", "4"])
    assert "unrecognized arguments: --num_gen 4 (did you mean --num_generations?)" in err
    with pytest.raises(UsageError, match="unrecognized arguments: --lr cosine"):
        GRPOCareConfig.from_cli(["--lr", "cosine"])
    # eval: its own options and the config fields; the hint is eval's, not train's
    err = one_line_error(capsys, ["eval", "--mod", "m", "--data", "v.jsonl"], "eval")
    assert "the following arguments are required: --model" in err
    err = one_line_error(capsys, ["eval", "--model", "m", "--data", "v.jsonl", "--mdoel", "x"], "eval")
    assert "unrecognized arguments: --mdoel x (did you mean --model?)" in err and "`grpo-care eval --help`" in err
    err = one_line_error(capsys, ["eval", "--model", "m", "--data", "v.jsonl", "--eval_video_max_frame", "32"],
                         "eval")
    assert "(did you mean --eval_video_max_frames?)" in err and "grpo-care train --help" not in err


def test_each_bad_number_is_blamed_on_its_own_field(capsys, elsewhere):
    err = one_line_error(capsys, ["train", "--config", str(TINY), "--max_grad_norm", "inf"])
    assert "max_grad_norm must be a finite number, got inf (given on the command line as --max_grad_norm inf)" in err
    assert "learning_rate" not in err
    (elsewhere / "mine.yaml").write_text("learning_rate: -1\n")
    err = one_line_error(capsys, ["train", "--config", "mine.yaml"])
    assert "learning_rate must be >= 0, got -1.0 (set in mine.yaml as learning_rate: -1)" in err
    err = one_line_error(capsys, ["train", "--config", str(TINY), "--lr_scheduler_type", "cosine_with_min_lr"])
    assert "lr_scheduler_type must be one of linear, cosine," in err and "got 'cosine_with_min_lr'" in err


def test_reward_functions_are_resolved_before_loading(capsys, elsewhere):
    inputs = tiny_inputs(elsewhere)
    err = one_line_error(capsys, ["train", *inputs, "--reward_funcs", "acuracy,format"])
    assert "unknown reward function 'acuracy'" in err and "given on the command line as --reward_funcs" in err
    err = one_line_error(capsys, ["train", *inputs, "--reward_funcs", "no_such_pkg.rewards.f"])
    assert "cannot import module 'no_such_pkg.rewards'" in err


def test_the_batch_is_checked_against_torchrun_world_size(capsys, elsewhere, monkeypatch):
    inputs = tiny_inputs(elsewhere)
    paper = str(ROOT / "configs" / "seed_bench_r1_care.yaml")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    err = one_line_error(capsys, ["train", "--config", paper, *inputs])
    assert "prompts_per_step=4 cannot be split into micro-batches of per_device_train_batch_size=1 on 3 rank(s)" in err
    assert f"(set in {paper} as prompts_per_step: 4)" in err
    err = one_line_error(capsys, ["train", "--config", paper, *inputs, "--distributed", "none"])
    assert "distributed=none, but torchrun launched 3 ranks" in err
    monkeypatch.setenv("WORLD_SIZE", "4")  # 4 ranks: 1 micro-batch each; asking for 4 disagrees
    err = one_line_error(capsys, ["train", "--config", paper, *inputs, "--gradient_accumulation_steps", "4"])
    assert "gradient_accumulation_steps=4 disagrees with prompts_per_step=4" in err
    assert "pass --gradient_accumulation_steps 1" in err and "--prompts_per_step 16" in err


def test_malformed_annotation_file_is_one_line(capsys, elsewhere):
    inputs = tiny_inputs(elsewhere)
    (elsewhere / "bad.jsonl").write_text(json.dumps(RECORD) + '\n{"a": 1\n')
    err = one_line_error(capsys, ["train", *inputs, "--train_file", "bad.jsonl"])
    assert "bad.jsonl:2: malformed JSON line" in err
    (elsewhere / "partial.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    err = one_line_error(capsys, ["train", *inputs, "--train_file", "partial.jsonl"])
    assert "partial.jsonl:1: bad seed_bench_r1 record: missing field 'answer'" in err
    err = one_line_error(capsys, ["eval", "--model", str(elsewhere / "m"), "--data", "bad.jsonl"], "eval")
    assert "bad.jsonl:2: malformed JSON line" in err
    with pytest.raises(UsageError, match="malformed JSON line"):
        cli.main(["eval", "--model", str(elsewhere / "m"), "--data", "bad.jsonl", "--debug"])


def test_output_dir_of_another_run_is_one_line(capsys, elsewhere):
    inputs = tiny_inputs(elsewhere)
    (elsewhere / "run" / "checkpoint-2").mkdir(parents=True)
    (elsewhere / "run" / "checkpoint-2" / "trainer_state.pt").write_bytes(b"")
    err = one_line_error(capsys, ["train", "--config", str(TINY), *inputs, "--output_dir", "run"])
    assert "output_dir run holds checkpoints of an earlier run (checkpoint-2)" in err
    assert "--overwrite_output_dir true" in err and "given on the command line as --output_dir run" in err
    err = one_line_error(capsys, ["train", "--config", str(TINY), *inputs, "--resume_from_checkpoint", "m"])
    assert "resume_from_checkpoint: 'm' is not a checkpoint (no trainer_state.pt)" in err
    # eval: samples.jsonl written for another model
    (elsewhere / "ev").mkdir()
    (elsewhere / "ev" / "samples.jsonl").write_text(json.dumps({"meta": {"model": "another"}}) + "\n")
    err = one_line_error(capsys, ["eval", "--model", str(elsewhere / "m"), "--data", "train.jsonl",
                                  "--output_dir", "ev"], "eval")
    assert "ev/samples.jsonl was written under other evaluation settings" in err and "--overwrite" in err


def test_judge_spec_is_checked_before_loading(capsys, elsewhere):
    tiny_inputs(elsewhere)
    model = str(elsewhere / "m")
    err = one_line_error(capsys, ["eval", "--model", model, "--data", "train.jsonl", "--judge", "bogus"], "eval")
    assert "judge must be none, offline, http or a dotted path" in err and "as --judge bogus" in err
    err = one_line_error(capsys, ["eval", "--model", model, "--data", "train.jsonl", "--judge", "no_pkg.j:make"],
                         "eval")
    assert "cannot import module 'no_pkg.j'" in err
    (elsewhere / "judging.yaml").write_text("eval_judge: json:no_such_factory\n")
    err = one_line_error(capsys, ["eval", "--model", model, "--data", "train.jsonl", "--config", "judging.yaml"],
                         "eval")
    assert "json has no callable 'no_such_factory' (set in judging.yaml as eval_judge:" in err


def test_train_hub_failure_is_one_line(capsys, elsewhere, monkeypatch):
    inputs = tiny_inputs(elsewhere)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import transformers

    def unreachable(name, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    err = one_line_error(capsys, ["train", *inputs, "--model_name_or_path", "someone/model"])
    assert "model_name_or_path: 'someone/model' could not be loaded from the Hugging Face hub: We couldn't" in err
    assert "given on the command line as --model_name_or_path someone/model" in err
