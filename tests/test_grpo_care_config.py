"""grpo_care.config: one dataclass, YAML + command-line overrides, help on every field, the paper's recipe."""

import dataclasses
from pathlib import Path

import pytest
from grpo_care.config import GRPOCareConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_field_has_help_text():
    for f in dataclasses.fields(GRPOCareConfig):
        assert len(f.metadata.get("help", "")) > 10, f.name
    text = GRPOCareConfig.argument_parser().format_help()
    assert "--ref_ema_decay" in text and "phi <- alpha*phi" in text


def test_care_yaml_is_the_papers_run():
    c = GRPOCareConfig.from_yaml(CONFIGS / "seed_bench_r1_care.yaml")
    assert c.model_name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert (c.num_generations, c.per_device_train_batch_size, c.prompts_per_step) == (8, 1, 4)
    assert (c.learning_rate, c.lr_scheduler_type, c.warmup_ratio, c.weight_decay, c.max_grad_norm) == (
        1e-6,
        "cosine",
        0.0,
        0.01,
        5.0,
    )
    assert (c.temperature, c.top_p, c.top_k, c.repetition_penalty, c.max_completion_length) == (
        1.0,
        0.95,
        50,
        1.0,
        768,
    )
    assert (c.beta, c.loss_type, c.use_care, c.ref_ema_decay, c.ref_ema_update_every) == (
        0.0,
        "grpo",
        True,
        0.995,
        10,
    )
    assert (c.bonus_coefficient, c.confidence_upper_bound, c.consistency_margin, c.accuracy_floor) == (
        0.5,
        0.95,
        0.0,
        0.1,
    )
    assert (c.video_fps, c.video_max_frames, c.video_max_pixels, c.image_max_pixels) == (
        2.0,
        16,
        128 * 28 * 28,
        256 * 28 * 28,
    )
    assert c.reward_funcs == ["accuracy", "format"] and c.max_steps == 1500


def test_grpo_yaml_is_the_baseline():
    care = GRPOCareConfig.from_yaml(CONFIGS / "seed_bench_r1_care.yaml").to_dict()
    grpo = GRPOCareConfig.from_yaml(CONFIGS / "seed_bench_r1_grpo.yaml").to_dict()
    differing = {k for k in care if care[k] != grpo[k]}
    assert differing == {"use_care", "beta", "ref_ema_decay", "output_dir"}
    assert grpo["use_care"] is False and grpo["beta"] > 0 and grpo["ref_ema_decay"] == 1.0  # a frozen KL reference


def test_tiny_cpu_yaml_loads():
    c = GRPOCareConfig.from_yaml(CONFIGS / "tiny_cpu.yaml")
    assert c.device == "cpu" and c.max_steps > 0


def test_overrides_in_both_spellings_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 2.0e-6\nuse_care: true\n")
    c = GRPOCareConfig.from_yaml(
        path,
        [
            "use_care=false",
            "--max_steps",
            "7",
            "--reward_funcs=accuracy,my.mod.f",
            "epsilon_high=null",
            "reward_weights=[1, 0.5]",
        ],
    )
    assert (c.learning_rate, c.use_care, c.max_steps) == (2e-6, False, 7)
    assert (
        c.reward_funcs == ["accuracy", "my.mod.f"] and c.epsilon_high is None and c.reward_weights == [1, 0.5]
    )
    cli = GRPOCareConfig.from_cli(["--config", str(path), "--top_k", "0", "--bonus_coefficient=0.25"])
    assert (cli.top_k, cli.bonus_coefficient, cli.learning_rate) == (0, 0.25, 2e-6)


def test_bad_values_are_errors_that_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 1.0\n")
    with pytest.raises(ValueError, match="unknown config key 'learning_rat'.*did you mean 'learning_rate'"):
        GRPOCareConfig.from_yaml(path)
    with pytest.raises(ValueError, match="max_steps must be int"):
        GRPOCareConfig.from_yaml(None, ["max_steps=1.5"])
    with pytest.raises(ValueError, match="use_care must be bool"):
        GRPOCareConfig.from_yaml(None, ["use_care=maybe"])
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        GRPOCareConfig(num_generations=1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOCareConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="prompt_style must be paper or short, got 'long'"):
        GRPOCareConfig(prompt_style="long")
    with pytest.raises(ValueError, match="unrecognized arguments: --not_a_field 1"):
        GRPOCareConfig.from_cli(["--not_a_field", "1"])


def test_yaml_round_trip(tmp_path):
    c = GRPOCareConfig(max_steps=3, reward_funcs=["format"], epsilon_high=0.28)
    c.save_yaml(tmp_path / "c.yaml")
    assert GRPOCareConfig.from_yaml(tmp_path / "c.yaml") == c


def test_resume_changes_names_every_change_and_refuses_another_seed():
    saved = GRPOCareConfig(learning_rate=1e-6, max_steps=10).to_dict()
    now = GRPOCareConfig(learning_rate=2e-6, max_steps=10, output_dir="elsewhere", save_steps=7)
    assert now.resume_changes(saved, "ckpt") == ["learning_rate: 1e-06 -> 2e-06"]  # bookkeeping fields not named
    older = {k: v for k, v in saved.items() if k != "kl_clamp"}  # a checkpoint written before kl_clamp existed
    assert GRPOCareConfig(max_steps=10).resume_changes(older, "ckpt") == [
        "kl_clamp: (not in the checkpoint's config) -> 10.0"
    ]
    with pytest.raises(ValueError, match="ckpt was written with seed: 42 -> 1: .*model_name_or_path=ckpt"):
        GRPOCareConfig(seed=1, max_steps=10).resume_changes(saved, "ckpt")
    assert GRPOCareConfig().resume_changes({}, "ckpt") == []  # a checkpoint without a config: nothing to compare


def test_new_fields_are_checked():
    assert GRPOCareConfig().ref_ema_decay is None  # unset: the method's own (ema.ema_decay)
    assert GRPOCareConfig.from_yaml(None, ["ref_ema_decay=null"]).ref_ema_decay is None
    for bad, match in (
        (dict(ref_ema_decay=1.5), "ref_ema_decay must be in"),
        (dict(answer_span="tags"), "answer_span must be one of"),
        (dict(prompts_per_step=-1), "prompts_per_step must be >= 0"),
    ):
        with pytest.raises(ValueError, match=match):
            GRPOCareConfig(**bad)
    config = GRPOCareConfig()
    assert (config.answer_span, config.prompts_per_step, config.eval_real_video_timing) == ("content", 0, True)


@pytest.mark.parametrize("field, bad, match", [
    ("learning_rate", -1.0, "learning_rate must be >= 0"),
    ("learning_rate", float("nan"), "learning_rate must be a finite number"),
    ("max_grad_norm", -5.0, "max_grad_norm must be >= 0"),
    ("max_grad_norm", float("inf"), "max_grad_norm must be a finite number"),
    ("temperature", float("inf"), "temperature must be a finite number"),
    ("consistency_margin", float("nan"), "consistency_margin must be a finite number"),
    ("accuracy_floor", float("nan"), "accuracy_floor must be a finite number"),
    ("bonus_coefficient", -0.5, "bonus_coefficient must be >= 0"),
    ("kl_clamp", float("inf"), r"kl_clamp must be a finite number \(null: unclamped\)"),
    ("warmup_ratio", 1.5, "warmup_ratio must be in"),
    ("eval_temperature", 0.0, "eval_temperature must be > 0"),
])
def test_numbers_out_of_range_are_refused_one_field_at_a_time(field, bad, match):
    """Each check names its own field (a combined check blamed `--max_grad_norm inf` on learning_rate); NaN and
    inf are refused everywhere (a NaN margin reached care_bonus only at the first step)."""
    with pytest.raises(ValueError, match=match):
        GRPOCareConfig(**{field: bad})
    with pytest.raises(ValueError, match=f"given on the command line as --{field} "):
        GRPOCareConfig.from_cli([f"--{field}", str(bad)])


def test_lr_scheduler_type_is_one_the_trainer_can_run():
    from grpo_care.config import lr_scheduler_names
    from transformers.trainer_utils import SchedulerType

    assert {"cosine", "linear", "constant"} <= set(lr_scheduler_names()) <= {s.value for s in SchedulerType}
    assert "reduce_lr_on_plateau" not in lr_scheduler_names()  # needs a metric at every step
    for name in ("cosin", "reduce_lr_on_plateau", "warmup_stable_decay"):
        with pytest.raises(ValueError, match=f"lr_scheduler_type must be one of .* got '{name}'"):
            GRPOCareConfig(lr_scheduler_type=name)
