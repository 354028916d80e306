"""configs/: one file per paper row the authors' code can express, each constant of grpo_care.md section 8 in
the configs it belongs to, headers that name their row and source, and the README table that maps them.

SECTION_8 below restates the spec's table as config values. When the spec is reachable (a `shared/spec` beside
the checkout, or GRPO_CARE_SPEC), the test also reads section 8 itself: every row must be covered here and
every value quoted here must appear in its row, so the two cannot drift apart silently."""

import os
import re
from pathlib import Path

import pytest
from grpo_care.batch import with_pinned_batch
from grpo_care.config import GRPOCareConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
README = REPO / "python" / "grpo_care" / "README.md"

CARE = ["seed_bench_r1_care", "seed_bench_r1_care_margin0.01", "seed_bench_r1_care_frozen_reference", "video_r1_care"]
BASELINES = ["seed_bench_r1_grpo", "seed_bench_r1_nokl", "seed_bench_r1_kl_ema"]
TRAINING = CARE + BASELINES
SEED = [name for name in TRAINING if name.startswith("seed_bench_r1")]
EVAL_ONLY = ["eval_general_video_bench"]

# (spec row label, text its value must contain, {config names: {field: value}}); None: no config field
# fmt: off
SECTION_8 = [
    ("base model", ["Qwen2.5-VL-7B-Instruct", "vision tower NOT frozen"],
     {tuple(TRAINING): {"model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "freeze_vision_tower": False}}),
    ("hardware", ["4 × 80GB", "bf16", "gradient checkpointing"],
     {tuple(TRAINING): {"bf16": True, "gradient_checkpointing": True, "prompts_per_step": 4}}),
    ("group size G", ["8"], {tuple(TRAINING): {"num_generations": 8}}),
    ("prompts per device / grad-accum", ["1 / 1", "4 prompts = 32 rollouts"],
     {tuple(TRAINING): {"per_device_train_batch_size": 1, "prompts_per_step": 4}}),
    ("learning rate / schedule", ["1e-6", "cosine", "no warmup"],
     {tuple(TRAINING): {"learning_rate": 1e-6, "lr_scheduler_type": "cosine", "warmup_ratio": 0.0}}),
    ("optimizer", ["β=(0.9, 0.999)", "eps 1e-8", "weight_decay 0.01"],
     {tuple(TRAINING): {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "weight_decay": 0.01}}),
    ("max_grad_norm", ["5"], {tuple(TRAINING): {"max_grad_norm": 5.0}}),
    ("max_prompt_length / max_completion_length", ["16384 / 768"],
     {tuple(TRAINING): {"max_prompt_length": 16384, "max_completion_length": 768}}),
    ("sampling", ["T = 1.0", "top_p = 0.95", "top_k 50", "rep-penalty 1.0"],
     {tuple(TRAINING): {"temperature": 1.0, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.0}}),
    ("β (KL)", ["0"], {tuple(CARE): {"beta": 0.0}, ("seed_bench_r1_nokl",): {"beta": 0.0}}),
    ("bonus_coefficient λ", ["0.5"], {tuple(CARE): {"use_care": True, "bonus_coefficient": 0.5}}),
    ("confidence_upper_bound γ_p", ["0.95"], {tuple(CARE): {"confidence_upper_bound": 0.95}}),
    ("accuracy floor γ_acc", ["0.1"], {tuple(CARE): {"accuracy_floor": 0.1}}),
    ("consistency_margin ε_p", ["none (=0) for the SEED-Bench-R1 model", "0.01 for the transfer models"],
     {("seed_bench_r1_care", "seed_bench_r1_care_frozen_reference"): {"consistency_margin": 0.0},
      ("seed_bench_r1_care_margin0.01", "video_r1_care"): {"consistency_margin": 0.01}}),
    ("ref_ema_decay / update_every", ["0.995 / 10"],
     {("seed_bench_r1_care", "seed_bench_r1_care_margin0.01", "video_r1_care", "seed_bench_r1_kl_ema"):
      {"ref_ema_decay": 0.995, "ref_ema_update_every": 10},
      ("seed_bench_r1_care_frozen_reference",): {"ref_ema_decay": 1.0, "ref_ema_update_every": 10}}),
    ("advantage eps", ["1e-4", "unbiased std"],  # the eps is the trainer's constant; the scale is a field
     {tuple(TRAINING): {"scale_rewards": "group", "loss_type": "grpo"}}),
    ("SEED-Bench-R1 run", ["annotations/training_6k.jsonl", "1 epoch", "1500 steps", "save every 500"],
     {tuple(SEED): {"train_file": "SEED-Bench-R1/annotations/training_6k.jsonl", "max_steps": 1500,
                    "save_steps": 500}}),
    ("Video-R1 run", ["Video-R1-260k.json", "--max_steps 1000", "16-frame training", "32-frame testing",
                      "margin 0.01"],
     {("video_r1_care",): {"train_file": "Video-R1-data/Video-R1-260k.json", "max_steps": 1000,
                           "video_max_frames": 16, "eval_video_max_frames": 32, "consistency_margin": 0.01},
      tuple(EVAL_ONLY): {"eval_video_max_frames": 32}}),
    ("video frames / res (train)", ["≤16 frames at 2 fps", "128×28×28 px per frame", "≤256×28×28 px"],
     {tuple(TRAINING): {"video_max_frames": 16, "video_fps": 2.0, "video_min_pixels": 128 * 28 * 28,
                        "video_max_pixels": 128 * 28 * 28, "image_max_pixels": 256 * 28 * 28}}),
    ("library versions", ["trl==0.16.0"], None),  # the authors' environment, not a hyperparameter
    ("SFT baseline", ["training_with_cot_6k.jsonl"], None),  # SFT is not a run this trainer makes
]
# fmt: on
SEED_42 = "The seed is left at the HF default, 42."


def _load(name: str) -> GRPOCareConfig:
    return GRPOCareConfig.from_yaml(CONFIGS / f"{name}.yaml")


def _header(name: str) -> str:
    lines = (CONFIGS / f"{name}.yaml").read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


def test_one_config_per_reproducible_row_and_nothing_else():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(TRAINING + EVAL_ONLY + ["tiny_cpu"])
    for name in TRAINING + EVAL_ONLY:
        _load(name)  # every file is a valid config


def test_every_section_8_constant_is_in_its_configs():
    for label, _, expected in SECTION_8:
        for names, fields in (expected or {}).items():
            for name in names:
                config = _load(name)
                for field, value in fields.items():
                    assert getattr(config, field) == value, f"{name}.yaml: {field} (grpo_care.md 8, {label})"
    for name in TRAINING:
        assert _load(name).seed == 42, name
        config = _load(name)
        if name in SEED:  # "1 epoch, 1500 steps" of the 6k set: 4 prompts per step
            assert config.prompts_per_step * config.max_steps == 6000


def _spec_path() -> Path | None:
    if os.environ.get("GRPO_CARE_SPEC"):
        return Path(os.environ["GRPO_CARE_SPEC"])
    for parent in REPO.parents:
        candidate = parent / "shared" / "spec" / "grpo_care.md"
        if candidate.is_file():
            return candidate
    return None


def test_section_8_of_the_spec_is_what_this_file_restates():
    spec = _spec_path()
    if spec is None:
        pytest.skip("grpo_care.md not found beside the checkout (set GRPO_CARE_SPEC to check against it)")
    text = spec.read_text(encoding="utf-8")
    section = text[text.index("## 8. Hyperparameters") : text.index("## 9.")]
    rows = dict(re.findall(r"^\| (.+?) \| (.+) \|$", section, flags=re.MULTILINE))
    rows.pop("item", None)
    covered = set()
    for label, literals, _ in SECTION_8:
        matches = [row for row in rows if row.startswith(label)]
        assert len(matches) == 1, f"grpo_care.md 8 has no single row '{label}...'"
        covered.add(matches[0])
        for literal in literals:
            assert literal in rows[matches[0]], f"grpo_care.md 8, {label}: {literal!r} not in {rows[matches[0]]!r}"
    assert set(rows) == covered, f"rows of grpo_care.md 8 this test does not map: {set(rows) - covered}"
    assert SEED_42 in section


def test_configs_differ_from_the_care_run_only_where_their_row_does():
    care = _load("seed_bench_r1_care").to_dict()

    def differing(name):
        other = _load(name).to_dict()
        return {k for k in care if care[k] != other[k]} - {"output_dir"}

    assert differing("seed_bench_r1_care_margin0.01") == {"consistency_margin"}
    assert differing("seed_bench_r1_care_frozen_reference") == {"ref_ema_decay"}
    assert differing("seed_bench_r1_grpo") == {"use_care", "beta", "ref_ema_decay"}
    assert differing("seed_bench_r1_kl_ema") == {"use_care", "beta"}
    assert differing("seed_bench_r1_nokl") == {"use_care", "ref_ema_decay"}
    assert differing("video_r1_care") == {
        "train_file", "data_root", "dataset_format", "eval_files", "max_steps", "consistency_margin",
        "eval_video_max_frames",
    }  # fmt: skip
    grpo, kl_ema = _load("seed_bench_r1_grpo"), _load("seed_bench_r1_kl_ema")
    assert (grpo.beta, grpo.ref_ema_decay, kl_ema.beta, kl_ema.ref_ema_decay) == (0.04, 1.0, 0.04, 0.995)


def test_seed_bench_r1_is_evaluated_at_16_frames_wherever_a_config_names_it():
    """The authors evaluate SEED-Bench-R1 at 16 frames and the general benchmarks at 32 (grpo_care.md 9.3):
    a config's eval_video_max_frames goes with its eval_files."""
    for name in TRAINING + EVAL_ONLY:
        config = _load(name)
        if any("SEED-Bench-R1" in f for f in config.eval_files):
            assert config.eval_video_max_frames == 16, name
        elif config.eval_files:
            assert config.eval_video_max_frames == 32, name


def test_headers_name_their_paper_row_and_source():
    for name in TRAINING + EVAL_ONLY:
        header = _header(name)
        assert re.search(r"^# Paper (row|table): Table [234]", header, flags=re.MULTILINE), name
        assert "Follows:" in header and ("scripts/" in header or "trainer" in header), name
        assert f"configs/{name}.yaml" in header or name in EVAL_ONLY, name  # its own train command
        assert "grpo-care eval" in header, name
    grpo = _header("seed_bench_r1_grpo")
    assert "ASSUMPTION: beta 0.04" in grpo and "gives no beta" in grpo and "used 0.1" in grpo
    assert "ASSUMPTION: beta 0.04" in _header("seed_bench_r1_kl_ema")


def test_the_frozen_reference_finding_is_stated_where_it_is_used():
    for text in (_header("seed_bench_r1_care_frozen_reference"), README.read_text()):
        flat = " ".join(text.replace("#", " ").split())
        assert "GatheredParameters" in flat and "modifier_rank" in flat, text[:80]
        assert "ZeRO-3" in flat and "bf16" in flat and "half" in flat and "ulp" in flat
        assert "reading the authors' code" in flat or "read from the code" in flat


def test_readme_maps_every_row_to_its_config_and_commands():
    text = README.read_text()
    table = text[text.index("## Reproducing the paper") :]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    for name in TRAINING:
        row = next((r for r in rows if f"configs/{name}.yaml" in r), None)
        assert row is not None, f"no README row for configs/{name}.yaml"
        assert "train" in row and "eval" in row, row
    assert any("eval_general_video_bench.yaml" in r for r in rows)


@pytest.mark.parametrize("name", TRAINING)
def test_the_papers_step_on_1_2_or_4_gpus(name):
    config = _load(name)
    for world_size, accumulation in ((1, 4), (2, 2), (4, 1)):
        pinned = with_pinned_batch(config, world_size)
        assert pinned.gradient_accumulation_steps == accumulation
        assert pinned.per_device_train_batch_size * pinned.gradient_accumulation_steps * world_size == 4
    with pytest.raises(ValueError, match="prompts_per_step=4 cannot be split"):
        with_pinned_batch(config, 8)
