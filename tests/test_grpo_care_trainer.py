"""grpo_care.trainer end to end on CPU: tiny Qwen2.5-VL (synthetic video) and tiny Qwen2, GRPO-CARE and GRPO,
no [B, T, V] logits in a step, bad media skipped and counted, exact resume, logs and checkpoints."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from grpo_care import checkpoint as ckpt
from grpo_care.config import GRPOCareConfig
from grpo_care.trainer import train
from safetensors.torch import load_file

pytest.importorskip("av", reason="the synthetic clips are written with PyAV (pip install av)")

TRL_METRICS = (
    "reward",
    "reward_std",
    "rewards/parity_reward/mean",
    "rewards/format/mean",
    "clip_ratio",
    "entropy",
    "completions/mean_length",
    "frac_reward_zero_std",
    "loss",
    "grad_norm",
    "learning_rate",
)


def parity_reward(completions, **columns):
    """A stand-in accuracy (0 or 1, varied within a group) so random tiny models get non-zero advantages."""
    assert all(len(columns[k]) == len(completions) for k in ("solution", "prompts", "completion_ids"))
    return [float(sum(c.encode()) % 2) for c in completions]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from grpo_care.synthetic import write_seed_bench_r1
    from grpo_care.tiny import byte_tokenizer, qwen2_5_vl_processor

    tok = byte_tokenizer()
    return {
        "paths": write_seed_bench_r1(tmp_path_factory.mktemp("data"), n_train=6, n_val=2),
        "tok": tok,
        "processor": qwen2_5_vl_processor(tok),
    }


def _config(assets, out: Path, **overrides) -> GRPOCareConfig:
    values = dict(
        train_file=assets["paths"]["training"],
        output_dir=str(out),
        device="cpu",
        num_generations=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=3,
        max_completion_length=8,
        learning_rate=1e-3,
        ref_ema_update_every=1,
        reward_funcs=[f"{__name__}.parity_reward", "format"],
        video_max_frames=4,
        video_min_pixels=3136,
        video_max_pixels=3136,
        image_max_pixels=3136,
        report_to=["tensorboard"],
        log_completions_steps=2,
        save_steps=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return GRPOCareConfig(**values)


def _tiny_vl(assets, seed=0):
    from grpo_care.tiny import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(assets["tok"], seed=seed)


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_care_on_tiny_qwen2_5_vl_with_video_never_builds_full_logits(assets, tmp_path):
    model = _tiny_vl(assets)
    before = [p.detach().clone() for p in model.parameters()]
    head_calls = []
    model.lm_head.register_forward_hook(lambda m, args, out: head_calls.append(tuple(out.shape)))
    summary = train(_config(assets, tmp_path), model=model, processor=assets["processor"])

    assert summary["global_step"] == 3 and len(summary["losses"]) == 3
    # the LM head ran only inside generate, one position per row: no [B, T, V] logits in any training step
    assert head_calls and all(shape[1] == 1 for shape in head_calls)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    metrics = _read_jsonl(summary["metrics_file"])
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for name in (*TRL_METRICS, "kl", "rewards/bonus_rewards", "care/bonus_rate", "care/answer_span_rate"):
        assert name in metrics[-1], name
    assert any(
        m["rewards/bonus_rewards"] > 0 for m in metrics
    )  # parity accuracy: high-accuracy rollouts exist
    assert metrics[-1]["kl"] > 0  # the EMA reference (updated every step here) has left the policy's start
    completions = _read_jsonl(summary["completions_file"])
    assert {c["step"] for c in completions} == {1, 2} and {"bonus", "ref_likelihood", "advantage"} <= set(
        completions[0]
    )
    assert any((tmp_path / "tensorboard").iterdir())

    final = Path(summary["checkpoint"])
    assert final.name == "checkpoint-3" and (final / "model.safetensors").is_file()
    state = ckpt.load_trainer_state(final)
    assert {"optimizer", "scheduler", "rng", "data", "ema", "global_step"} <= set(state)
    assert state["ema"]["num_updates"] == 3 and state["data"]["cursor"] == 6
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_grpo_baseline_on_tiny_qwen2_with_frozen_kl_reference(assets, tmp_path):
    from grpo_care.tiny import tiny_qwen2

    model = tiny_qwen2(assets["tok"])
    config = _config(
        assets,
        tmp_path,
        use_care=False,
        beta=0.04,
        report_to=["none"],
        gradient_accumulation_steps=2,
        per_device_train_batch_size=1,
        max_completion_length=12,
    )
    with pytest.warns(UserWarning, match="text-only: the media of the samples are dropped"):
        summary = train(config, model=model, tokenizer=assets["tok"])
    metrics = _read_jsonl(summary["metrics_file"])
    assert len(metrics) == 3 and "kl" in metrics[-1] and "rewards/bonus_rewards" not in metrics[-1]
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6) and metrics[-1]["kl"] > 0  # frozen reference
    assert ckpt.load_trainer_state(summary["checkpoint"])["ema"]["num_updates"] == 0


def test_missing_and_corrupt_videos_are_skipped_and_counted(assets, tmp_path):
    from grpo_care.synthetic import write_seed_bench_r1

    paths = write_seed_bench_r1(tmp_path / "data", n_train=4, n_val=0)
    records = _read_jsonl(paths["training"])
    videos = tmp_path / "data" / "videos" / records[0]["video_source"]
    (videos / records[0]["video_basename"]).unlink()
    (videos / records[1]["video_basename"]).write_bytes(b"not an mp4")
    # 3 steps of 1 prompt need 3 readable samples, more than the first epoch has: both bad ones are met
    config = _config(
        assets,
        tmp_path / "out",
        train_file=paths["training"],
        max_steps=3,
        report_to=["none"],
        per_device_train_batch_size=1,
        log_completions=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(config, model=_tiny_vl(assets), processor=assets["processor"])
    skipped = [str(w.message) for w in caught if "skipping sample" in str(w.message)]
    assert any("video not found" in m for m in skipped) and any("cannot decode video" in m for m in skipped)
    assert summary["skipped_samples"] >= 2 and summary["metrics"]["data/skipped_samples"] >= 2


def test_resume_continues_exactly(assets, tmp_path):
    """4 steps straight == 2 steps, checkpoint, a fresh process state resumed from it, 2 more steps."""
    overrides = dict(
        max_steps=4,
        save_steps=2,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=1,
        report_to=["none"],
        log_completions=False,
    )
    straight = train(
        _config(assets, tmp_path / "a", **overrides), model=_tiny_vl(assets), processor=assets["processor"]
    )
    assert len(straight["losses"]) == 4
    checkpoint_2 = tmp_path / "a" / "checkpoint-2"
    shutil.copytree(checkpoint_2, tmp_path / "b" / "checkpoint-2")
    torch.manual_seed(1234)  # whatever state the new process has: the checkpoint's RNG state wins
    resumed_model = _tiny_vl(assets)
    resumed = train(
        _config(assets, tmp_path / "b", resume_from_checkpoint="latest", **overrides),
        model=resumed_model,
        processor=assets["processor"],
    )
    # GRPO's loss value is ~0 by construction (advantages are centred per group): the gradients, rewards and
    # weights carry the comparison, bit for bit
    assert resumed["losses"] == straight["losses"]
    a, b = _read_jsonl(straight["metrics_file"]), _read_jsonl(resumed["metrics_file"])
    assert [m["step"] for m in b] == [3, 4]
    assert any(m["grad_norm"] > 0 for m in a[2:])  # the resumed steps do move the weights
    for key in ("loss", "reward", "kl", "grad_norm", "entropy", "rewards/bonus_rewards", "learning_rate"):
        assert [m[key] for m in a[2:]] == [m[key] for m in b], key
    weights_a = load_file(str(tmp_path / "a" / "checkpoint-4" / "model.safetensors"))
    weights_b = load_file(str(tmp_path / "b" / "checkpoint-4" / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys() and all(
        torch.equal(weights_a[k], weights_b[k]) for k in weights_a
    )
    final_a = ckpt.load_trainer_state(tmp_path / "a" / "checkpoint-4")
    final_b = ckpt.load_trainer_state(tmp_path / "b" / "checkpoint-4")
    assert all(torch.equal(x, y) for x, y in zip(final_a["ema"]["shadow"], final_b["ema"]["shadow"]))


def test_checkpoint_is_atomic(assets, tmp_path, monkeypatch):
    from grpo_care.tiny import tiny_qwen2

    model = tiny_qwen2(assets["tok"])
    ckpt.save_checkpoint(tmp_path, 1, model, {"global_step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, model, {"global_step": 2})
    assert not (tmp_path / "checkpoint-2").exists()  # only a temporary directory was left behind
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert ckpt.resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-1"
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    leftovers = list(tmp_path.glob("checkpoint-2.tmp-*"))
    assert len(leftovers) == 1
    # what the trainer does at start (with a warning): this process still runs, so its own directory stays
    assert ckpt.remove_unfinished(tmp_path) == [] and leftovers[0].exists()
    crashed = leftovers[0].rename(tmp_path / "checkpoint-2.tmp-999999999")  # no such process
    assert ckpt.remove_unfinished(tmp_path) == [crashed]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


@pytest.mark.gpu
@pytest.mark.parametrize("use_liger_kernel", [False, True], ids=["eager_layers", "liger_layers"])
def test_care_trains_on_cuda_with_bf16_autocast(assets, tmp_path, use_liger_kernel):
    """The GPU path of the trainer: fp32 master weights, bf16 autocast, a bf16 EMA module over an fp32 shadow,
    Triton log-prob kernels, the CUDA group ops; with and without Liger's layer kernels."""
    import math

    from grpo_care.trainer import Trainer

    if use_liger_kernel:
        pytest.importorskip("liger_kernel", reason="the Liger flag needs liger-kernel installed")
    config = _config(
        assets, tmp_path, device="cuda", bf16=True, use_liger_kernel=use_liger_kernel, max_steps=2,
        report_to=["none"],
    )
    model = _tiny_vl(assets)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(config, model=model, processor=assets["processor"])
    summary = trainer.train()

    assert summary["global_step"] == 2 and all(math.isfinite(x) for x in summary["losses"])
    assert summary["metrics"]["grad_norm"] > 0 and math.isfinite(summary["metrics"]["grad_norm"])
    assert next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == torch.float32
    assert any(not torch.equal(a.cuda(), b) for a, b in zip(before, model.parameters()))
    reference = trainer.reference
    assert next(reference.module.parameters()).dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 for s in reference.shadow) and reference.num_updates == 2
    metrics = _read_jsonl(summary["metrics_file"])
    assert all(math.isfinite(metrics[-1][k]) for k in ("loss", "entropy", "reward", "kl"))
