"""grpo_care.trainer end to end on CPU: tiny Qwen2.5-VL (synthetic video) and tiny Qwen2, GRPO-CARE and GRPO,
no [B, T, V] logits in a step, bad media skipped and counted, exact resume, logs and checkpoints."""

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from grpo_care import checkpoint as ckpt
from grpo_care.config import GRPOCareConfig
from grpo_care.trainer import train
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

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


class FullLogitsWatcher(TorchDispatchMode):
    """Records every tensor an op returns that holds logits for `rows` or more positions: last dimension V and
    at least `rows` rows. The [H, V] transpose of the head weight is no such tensor. Whatever computes them (the
    LM head, `hidden @ weight.T`, an einsum), the op's output passes through here."""

    def __init__(self, vocab: int, rows: int, hidden: int):
        super().__init__()
        self.vocab, self.rows, self.hidden, self.seen = vocab, rows, hidden, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if (
                isinstance(t, torch.Tensor)
                and t.dim() >= 2
                and t.shape[-1] == self.vocab
                and t.numel() // self.vocab >= self.rows
                and tuple(t.shape) != (self.hidden, self.vocab)
            ):
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_care_on_tiny_qwen2_5_vl_with_video_never_builds_full_logits(assets, tmp_path, monkeypatch):
    from care_kernels.losses import fused_linear_grpo

    model = _tiny_vl(assets)
    before = [p.detach().clone() for p in model.parameters()]
    head_calls = []
    model.lm_head.register_forward_hook(lambda m, args, out: head_calls.append(tuple(out.shape)))
    vocab, hidden = model.lm_head.weight.shape
    config = _config(assets, tmp_path)
    rows = config.per_device_train_batch_size * config.num_generations * config.max_completion_length
    # the fused head's logits chunk holds 16 rows here (at these sizes its default budget would fit them all)
    monkeypatch.setattr(fused_linear_grpo, "_default_buffer_bytes", lambda device: 16 * vocab * 4)
    watcher = FullLogitsWatcher(vocab, rows, hidden)
    assert rows > 16 and hidden < rows
    with watcher:
        summary = train(config, model=model, processor=assets["processor"])

    assert summary["global_step"] == 3 and len(summary["losses"]) == 3
    # no op of a step returned logits for all N x L scored positions (or more): no [B, T, V] tensor ever
    assert watcher.seen == []
    # and the LM head module ran only inside generate, one position per row
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


class HeadFlopCounter(TorchDispatchMode):
    """Counts the LM-head GEMM FLOPs of the training step (generation excluded): care_kernels' log-prob ops by
    the rows they score (forward 2NHV per head, backward 6NHV), and every matmul with the vocabulary as one of
    its dimensions (the fused loss head's logits, dH and dW GEMMs) by its shape."""

    MATMULS = ("aten.mm", "aten.addmm", "aten.addmm_", "aten.bmm", "aten.baddbmm", "aten.baddbmm_")

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.paused, self.flops, self.ref_rows, self.logits_rows = vocab, False, [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if self.paused:
            return out
        if name in ("care_kernels.linear_logprobs_fwd", "care_kernels.linear_logprobs_bwd"):
            hidden, weight, targets = args[2:5] if name.endswith("bwd") else (args[0], args[1], args[3])
            rows = int((targets != -100).sum())
            heads = 1 if name.endswith("bwd") or args[5] is None else 2
            self.flops.append(2 * rows * hidden.shape[1] * weight.shape[0] * (3 if name.endswith("bwd") else heads))
            if name.endswith("fwd"):
                self.ref_rows.append(rows)
        elif name in self.MATMULS:
            a, b = args[-2], args[-1]
            if self.vocab in (*a.shape[-2:], *b.shape[-1:]):
                self.flops.append(2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1))
                if b.shape[-1] == self.vocab:  # a logits GEMM: [rows, H] @ [H, V]
                    self.logits_rows.append(a.shape[-2])
        return out


@pytest.mark.parametrize("arm", ["care", "grpo", "no_reference"])
def test_step_runs_8nhv_of_head_gemms_with_a_reference_and_6nhv_without(assets, tmp_path, monkeypatch, arm):
    """The reference head is scored once (2NHV: on its own for CARE, whose bonus needs it before the loss; inside
    the loss head for plain GRPO's KL) and the loss head forms the policy's gradient (6NHV) and hands back its
    log-probs and entropy: no second policy pass over the vocabulary for the metrics."""
    from grpo_care import trainer as trainer_module

    model = _tiny_vl(assets)
    vocab, hidden = model.lm_head.weight.shape
    counter = HeadFlopCounter(vocab)
    generate = trainer_module.generate_rollouts

    def generate_uncounted(*args, **kwargs):
        counter.paused = True
        try:
            return generate(*args, **kwargs)
        finally:
            counter.paused = False

    monkeypatch.setattr(trainer_module, "generate_rollouts", generate_uncounted)
    extra = {"care": dict(use_care=True), "grpo": dict(use_care=False, beta=0.04),
             "no_reference": dict(use_care=False, beta=0.0)}[arm]
    config = _config(assets, tmp_path, max_steps=1, **extra)
    with counter:
        summary = train(config, model=model, processor=assets["processor"])
    assert summary["global_step"] == 1
    metrics = _read_jsonl(summary["metrics_file"])[-1]
    assert math.isfinite(metrics["entropy"]) and metrics["entropy"] > 0
    scored = sum(counter.logits_rows)  # the rows of the loss head's logits GEMMs (policy, and reference if any)
    rows = config.per_device_train_batch_size * config.num_generations * config.max_completion_length
    assert 0 < scored <= (2 if arm == "grpo" else 1) * rows
    if arm == "care":
        assert counter.ref_rows == [scored]  # one reference pass over the same tokens
        assert sum(counter.flops) == 8 * scored * hidden * vocab, counter.flops
    elif arm == "grpo":  # the loss head's logits GEMMs: the policy's and the reference's, over the same tokens
        assert counter.ref_rows == [] and scored % 2 == 0
        assert sum(counter.flops) == 8 * (scored // 2) * hidden * vocab, counter.flops
    else:
        assert counter.ref_rows == []
        assert sum(counter.flops) == 6 * scored * hidden * vocab, counter.flops


def constant_reward(completions, **columns):
    return [1.0] * len(completions)


def test_grpo_with_zero_advantages_leaves_the_policy_unchanged(assets, tmp_path):
    """Every group's rewards are equal, so every advantage is 0 and the KL to a reference equal to the policy is 0
    with a gradient of exactly 0: the policy must not move (the KL's reference is scored by the loss head's own
    code; log-probs from two kernels would differ by rounding, and AdamW turns such gradients into full steps)."""
    model = _tiny_vl(assets)
    model.resize_token_embeddings(3000)  # several vocabulary tiles (the tokenizer's own ids are all it samples)
    before = [p.detach().clone() for p in model.parameters()]
    config = _config(assets, tmp_path, max_steps=2, use_care=False, beta=0.04, weight_decay=0.0,
                     reward_funcs=[f"{__name__}.constant_reward"])
    summary = train(config, model=model, processor=assets["processor"])
    assert summary["global_step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("poisoned", ["policy", "reference"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_non_finite_policy_or_reference_stops_the_run_with_a_clear_error(assets, tmp_path, monkeypatch, poisoned, beta):
    """The step checks its loss and the reference's log-probs within its one host sync. A NaN reference at
    beta = 0 touches no loss (care_bonus gives a NaN likelihood no bonus): it must still stop the run."""
    from grpo_care import trainer as trainer_module

    model = _tiny_vl(assets)
    real = trainer_module.backbone_hidden

    def poison(m, inputs):
        hidden = real(m, inputs)
        return hidden * math.nan if (m is model) == (poisoned == "policy") else hidden

    monkeypatch.setattr(trainer_module, "backbone_hidden", poison)
    config = _config(assets, tmp_path, max_steps=1, use_care=True, beta=beta)
    with pytest.raises(FloatingPointError, match=f"step 1: the {'loss' if poisoned == 'policy' else 'reference'}"):
        train(config, model=model, processor=assets["processor"])


def gold_is_a(completions, **columns):
    """The accuracy reward against gold A, whatever the sample's own answer."""
    from grpo_care.rewards import accuracy_reward

    return accuracy_reward(completions, ["<answer>A</answer>"] * len(completions), columns["problem_type"])


HAND_WRITTEN = (
    "<think>it is a</think><answer>A</answer>",  # correct
    "<think>surely the first</think><answer> A</answer>",  # correct, another answer span
    "<think>b</think><answer>B</answer>",  # wrong
    "<think>no answer tag</think>",  # no span: likelihood 1, accuracy 0
)


def test_care_bonus_on_hand_written_completions_through_the_trainer(assets, tmp_path, monkeypatch):
    """The CARE path of a real step on completions with answer spans: the reference likelihood of each span
    (against the reference's full logits), the bonus to the correct rollout whose span the reference finds more
    likely than its high-accuracy peer's, and the metrics that report them."""
    import copy

    from grpo_care import trainer as trainer_module
    from grpo_care.rollout import completion_mask
    from grpo_care.trainer import Trainer

    import care_kernels as ck
    from care_kernels.answer_spans import answer_token_mask

    tok, seen = assets["tok"], {}
    real_generate = trainer_module.generate_rollouts

    def hand_written(model, prompts, generation_config, group_size, eos_token_id=None):
        rollout = real_generate(model, prompts, generation_config, group_size)  # the real prompts and media
        rows = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in HAND_WRITTEN]
        ids = torch.full((len(rows), max(map(len, rows)) + 2), generation_config.pad_token_id)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        rollout.completion_ids, rollout.completion_mask = ids, completion_mask(ids, tok.eos_token_id)
        rollout.finished = torch.ones(len(rows), dtype=torch.bool)
        seen["rollout"] = rollout
        return rollout

    monkeypatch.setattr(trainer_module, "generate_rollouts", hand_written)
    config = _config(assets, tmp_path, max_steps=1, num_generations=4, per_device_train_batch_size=1,
                     ref_ema_update_every=100, max_completion_length=64, report_to=["none"],
                     reward_funcs=[f"{__name__}.gold_is_a", "format"])
    trainer = Trainer(config, model=_tiny_vl(assets), processor=assets["processor"])
    reference = copy.deepcopy(trainer.reference.module)  # what scores the step (the EMA moves after it)
    real_micro_step = trainer._micro_step
    monkeypatch.setattr(trainer, "_micro_step", lambda: seen.setdefault("result", real_micro_step()))
    summary = trainer.train()
    result, rollout = seen["result"], seen["rollout"]

    prompt_len, length = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    with torch.no_grad():
        logits = reference(**rollout.model_inputs(), use_cache=False).logits
    logits = logits[:, prompt_len - 1 : prompt_len - 1 + length]
    logp = logits.double().log_softmax(-1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    span = answer_token_mask(rollout.completion_ids, rollout.completion_mask, tok)
    assert span.any(1).tolist() == [True, True, True, False] == result.span_found.tolist()
    want = torch.exp((logp * span).sum(1) / span.sum(1).clamp(min=1)).where(span.any(1), torch.ones(()))
    torch.testing.assert_close(result.likelihood.double(), want, rtol=1e-4, atol=1e-6)
    assert result.rewards_per_func[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]

    likelier = int(want[1] > want[0])  # of the two correct rollouts, the one above the pair's mean gets it
    bonus = [0.0] * 4
    bonus[likelier] = 0.5
    assert result.bonus.tolist() == bonus
    torch.testing.assert_close(result.bonus, ck.care_bonus(result.rewards_per_func[:, 0], result.likelihood, 4))
    metrics = summary["metrics"]
    assert metrics["care/answer_span_rate"] == pytest.approx(0.75)
    assert metrics["care/ref_likelihood"] == pytest.approx(float(want[:3].mean()), rel=1e-4)
    assert metrics["rewards/bonus_rewards"] == pytest.approx(0.5 / 4)


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


@pytest.mark.parametrize("enabled", [False, True])
def test_gradient_checkpointing_recomputes_the_decoder_layers_in_backward(assets, enabled):
    from grpo_care.modeling import backbone_hidden, prepare_for_training
    from grpo_care.tiny import tiny_qwen2

    config = GRPOCareConfig(gradient_checkpointing=enabled, device="cpu")
    model = prepare_for_training(tiny_qwen2(assets["tok"]), config, torch.device("cpu"))
    mlp, calls = model.model.layers[0].mlp, []
    forward = mlp.forward
    mlp.forward = lambda x: calls.append(1) or forward(x)  # (module hooks do not fire in the recomputation)
    ids = torch.randint(0, 256, (2, 7))
    backbone_hidden(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).square().sum().backward()
    assert len(calls) == (2 if enabled else 1)  # forward, and with checkpointing once more inside backward


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
    # what the trainer does at start (with a warning): another live process's directory stays (it may be
    # writing it); a dead process's, and this process's own (an earlier run in it raised), go
    alive = leftovers[0].rename(tmp_path / "checkpoint-2.tmp-1")  # pid 1: always running
    crashed = shutil.copytree(alive, tmp_path / "checkpoint-3.tmp-999999999")  # no such process
    own = shutil.copytree(alive, tmp_path / f"checkpoint-4.tmp-{os.getpid()}")
    assert ckpt.remove_unfinished(tmp_path) == [crashed, own] and alive.exists()
    shutil.rmtree(alive)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_replacing_a_checkpoint_never_loses_it(assets, tmp_path, monkeypatch):
    """Saving a step that is already on disk renames the old one aside first; a crash before the new one is in
    place leaves `.old-<pid>`, which restore_replaced puts back."""
    from grpo_care.tiny import tiny_qwen2

    model = tiny_qwen2(assets["tok"])
    ckpt.save_checkpoint(tmp_path, 2, model, {"global_step": 2, "tag": "first"})
    ckpt.save_checkpoint(tmp_path, 2, model, {"global_step": 2, "tag": "second"})
    assert ckpt.load_trainer_state(tmp_path / "checkpoint-2")["tag"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]

    real_replace, calls = os.replace, []

    def crash_on_second_rename(src, dst):
        calls.append(Path(src).name)
        if len(calls) == 2:  # the old one is aside, the new one not yet in place
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, {"global_step": 2, "tag": "third"})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert ckpt.latest_checkpoint(tmp_path) is None  # nothing named checkpoint-2 right now ...
    assert ckpt.restore_replaced(tmp_path) == [tmp_path / "checkpoint-2"]  # ... until start-up puts it back
    assert ckpt.load_trainer_state(tmp_path / "checkpoint-2")["tag"] == "second"
    ckpt.remove_unfinished(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_output_dir_of_an_earlier_run(assets, tmp_path):
    """A fresh run into an earlier run's checkpoints is refused (or deletes them with overwrite_output_dir); a
    resumed run at its last step trains and saves nothing, its checkpoint untouched."""
    base = dict(max_steps=2, save_steps=2, report_to=["none"], log_completions=False, per_device_train_batch_size=1)
    first = train(_config(assets, tmp_path, **base), model=_tiny_vl(assets), processor=assets["processor"])
    saved = Path(first["checkpoint"])
    stamp = (saved / "trainer_state.pt").stat().st_mtime_ns

    again = train(_config(assets, tmp_path, resume_from_checkpoint="latest", **base), model=_tiny_vl(assets),
                  processor=assets["processor"])
    assert again["global_step"] == 2 and again["checkpoint"] == str(saved)
    assert (saved / "trainer_state.pt").stat().st_mtime_ns == stamp

    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .checkpoint-2.*resume_from_checkpoint"):
        train(_config(assets, tmp_path, **base), model=_tiny_vl(assets), processor=assets["processor"])
    assert ckpt.latest_checkpoint(tmp_path) == saved
    with pytest.warns(UserWarning, match="overwrite_output_dir: deleted checkpoint-2"):
        fresh = train(_config(assets, tmp_path, overwrite_output_dir=True, **{**base, "max_steps": 1}),
                      model=_tiny_vl(assets), processor=assets["processor"])
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1"] == [Path(fresh["checkpoint"]).name]
    assert not (tmp_path / "tensorboard").exists() or not any((tmp_path / "tensorboard").iterdir())


def test_resuming_an_older_step_never_mixes_with_the_later_checkpoints(assets, tmp_path):
    """Resuming step 2 beside checkpoint-4 is refused (the rotation and `latest` would mix the two futures);
    overwrite_output_dir deletes the later one."""
    base = dict(max_steps=4, save_steps=2, report_to=["none"], log_completions=False, per_device_train_batch_size=1,
                save_total_limit=2)
    train(_config(assets, tmp_path, **base), model=_tiny_vl(assets), processor=assets["processor"])
    older = str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match=r"holds checkpoints past checkpoint-2 \(checkpoint-4\)"):
        train(_config(assets, tmp_path, resume_from_checkpoint=older, **{**base, "max_steps": 3}),
              model=_tiny_vl(assets), processor=assets["processor"])
    with pytest.warns(UserWarning, match="deleted checkpoint-4"):
        again = train(_config(assets, tmp_path, resume_from_checkpoint=older, overwrite_output_dir=True,
                              **{**base, "max_steps": 3}), model=_tiny_vl(assets), processor=assets["processor"])
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert again["checkpoint"] == str(tmp_path / "checkpoint-3")


def test_every_rank_fingerprints_the_whole_data_set(assets):
    """Each rank streams its own share, but the fingerprint covers all samples: ranks agree on a resume's verdict."""
    from grpo_care.data import load_samples
    from grpo_care.prompts import PromptStream, fingerprint
    from grpo_care.video import VisualBudget

    samples = load_samples(assets["paths"]["training"], seed=42, template="train")
    shares = [PromptStream(samples[r::2], 1, 42, VisualBudget(), False, all_samples=samples) for r in range(2)]
    assert shares[0].fingerprint == shares[1].fingerprint == fingerprint(samples)
    assert shares[0].state_dict()["num_samples"] == len(samples)
    changed = PromptStream(samples[1::2], 1, 42, VisualBudget(), False, all_samples=samples[:-1])
    with pytest.raises(ValueError, match=f"{len(samples)} samples then, {len(samples) - 1} now"):
        changed.load_state_dict(shares[1].state_dict())


def test_resume_under_a_changed_config(assets, tmp_path):
    """The resumed run trains under its own hyperparameters (named in a warning); another seed or other data
    is refused before any weight is loaded."""
    base = dict(max_steps=4, save_steps=2, report_to=["none"], log_completions=False, per_device_train_batch_size=1,
                lr_scheduler_type="constant")
    train(_config(assets, tmp_path / "a", **{**base, "max_steps": 2}), model=_tiny_vl(assets),
          processor=assets["processor"])
    with pytest.warns(UserWarning, match=r"changed config \(learning_rate: 0.001 -> 0.0005; max_steps: 2 -> 4\)"):
        resumed = train(_config(assets, tmp_path / "a", resume_from_checkpoint="latest", **{**base,
                                "learning_rate": 5e-4}), model=_tiny_vl(assets), processor=assets["processor"])
    logged = [(m["step"], m["learning_rate"]) for m in _read_jsonl(resumed["metrics_file"])]
    assert logged == [(1, 1e-3), (2, 1e-3), (3, 5e-4), (4, 5e-4)]

    with pytest.raises(ValueError, match=r"written with seed: 42 -> 7.*model_name_or_path="):
        train(_config(assets, tmp_path / "a", resume_from_checkpoint="latest", seed=7, **base),
              model=_tiny_vl(assets), processor=assets["processor"])
    fewer = _config(assets, tmp_path / "a", resume_from_checkpoint="latest", max_train_samples=4, **base)
    with pytest.raises(ValueError, match="training data differs from the checkpoint's .6 samples then, 4 now"):
        train(fewer, model=_tiny_vl(assets), processor=assets["processor"])
    reworded = _config(assets, tmp_path / "a", resume_from_checkpoint="latest", prompt_style="short", **base)
    with pytest.raises(ValueError, match="training data differs .* resume with the checkpoint's train_file, "
                                         "max_train_samples, seed and prompt_style"):
        train(reworded, model=_tiny_vl(assets), processor=assets["processor"])


def test_the_trainer_asks_in_its_configs_prompt_style(assets, tmp_path):
    from grpo_care.data import QUESTION_TEMPLATE, SHORT_QUESTION_TEMPLATE
    from grpo_care.trainer import Trainer

    for style, template in (("paper", QUESTION_TEMPLATE), ("short", SHORT_QUESTION_TEMPLATE)):
        config = _config(assets, tmp_path / style, max_steps=1, report_to=["none"], prompt_style=style)
        trainer = Trainer(config, model=_tiny_vl(assets), processor=assets["processor"])
        instruction = template.split("\n", 1)[1]
        assert trainer.stream.samples and all(instruction in s.text for s in trainer.stream.samples)


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


# ------------------------------------------------------------------------------------------------------------
# the reference: EMA whenever ref_ema_decay is set (KL-EMA), frozen without an fp32 shadow otherwise


def _reference_drift(trainer, initial) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(trainer.reference.module.parameters(), initial))


def _run_tiny_qwen2(assets, tmp_path, **overrides):
    """3 steps of tiny Qwen2 (text only); returns (trainer, the initial weights, summary)."""
    from grpo_care.tiny import tiny_qwen2
    from grpo_care.trainer import Trainer

    model = tiny_qwen2(assets["tok"])
    initial = [p.detach().clone() for p in model.parameters()]
    values = dict(report_to=["none"], per_device_train_batch_size=1, max_completion_length=12, log_completions=False)
    values.update(overrides)
    trainer = Trainer(_config(assets, tmp_path, **values), model=model, tokenizer=assets["tok"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # text-only model: media dropped
        summary = trainer.train()
    return trainer, initial, summary


def test_kl_ema_updates_the_kl_reference_without_care(assets, tmp_path):
    """Table 3's KL-EMA: use_care false, beta > 0 and a decay: the reference moves every ref_ema_update_every
    steps, as the authors' trainer does whenever ref_ema_decay is set."""
    trainer, initial, summary = _run_tiny_qwen2(
        assets, tmp_path, use_care=False, beta=0.04, ref_ema_decay=0.5, ref_ema_update_every=1
    )
    assert trainer.reference.num_updates == 3 and not trainer.reference.frozen
    assert ckpt.load_trainer_state(summary["checkpoint"])["ema"]["num_updates"] == 3
    assert _reference_drift(trainer, initial) > 0
    # phi_3 = 0.5 phi_2 + 0.5 theta_3 ...: the reference sits between the start and the policy, off both
    assert any(not torch.equal(r, p) for r, p in zip(trainer.reference.module.parameters(), trainer.model.parameters()))


@pytest.mark.parametrize("decay", [None, 1.0])
def test_a_reference_without_decay_stays_the_initial_model(assets, tmp_path, decay):
    """CARE with ref_ema_decay 1.0 (seed_bench_r1_care_frozen_reference.yaml), or plain GRPO with the decay
    unset (its KL reference, as the authors' trainer without --ref_ema_decay): never updated."""
    method = dict(use_care=True) if decay == 1.0 else dict(use_care=False, beta=0.04)
    trainer, initial, summary = _run_tiny_qwen2(assets, tmp_path, ref_ema_decay=decay, ref_ema_update_every=1,
                                                **method)
    assert trainer.reference.frozen and trainer.reference.num_updates == 0
    assert _reference_drift(trainer, initial) == 0
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), initial))  # the policy moved
    assert summary["metrics"]["kl"] > 0


@pytest.mark.parametrize(
    "overrides, fp32_shadow",
    [
        (dict(use_care=False, beta=0.04), False),  # plain GRPO, decay unset: a frozen KL reference
        (dict(use_care=True, ref_ema_decay=1.0), False),  # CARE against the initial model
        (dict(use_care=True), True),  # the paper's EMA (unset: 0.995)
        (dict(use_care=False, beta=0.04, ref_ema_decay=0.995), True),  # KL-EMA
    ],
)
def test_an_fp32_shadow_only_when_the_reference_moves(assets, tmp_path, monkeypatch, overrides, fp32_shadow):
    """With a bf16 reference (as on GPU), an fp32 EMA shadow exists only where an EMA update reads it."""
    from grpo_care.tiny import tiny_qwen2
    from grpo_care.trainer import Trainer

    monkeypatch.setattr(Trainer, "_reference_dtype", lambda self: torch.bfloat16)
    trainer = Trainer(_config(assets, tmp_path, **overrides), model=tiny_qwen2(assets["tok"]), tokenizer=assets["tok"])
    ref = trainer.reference
    assert all(p.dtype == torch.bfloat16 for p in ref.module.parameters())
    own = [s.data_ptr() != p.data_ptr() for s, p in zip(ref.shadow, ref.module.parameters())]
    if fp32_shadow:
        assert all(own) and all(s.dtype == torch.float32 for s in ref.shadow)
    else:
        assert not any(own) and not any(s.dtype == torch.float32 for s in ref.shadow)


def test_no_kl_and_no_care_builds_no_reference(assets, tmp_path):
    """...and says that a ref_ema_decay it was given has nothing to act on (it was silently ignored)."""
    with pytest.warns(UserWarning, match=r"ref_ema_decay=0.995 is ignored: with use_care false and beta 0 no "
                      r"reference is built .* For Table 3's KL-EMA set beta > 0"):
        trainer, _, summary = _run_tiny_qwen2(assets, tmp_path, use_care=False, beta=0.0, ref_ema_decay=0.995)
    assert trainer.reference is None and ckpt.load_trainer_state(summary["checkpoint"])["ema"] is None


def test_unused_decay_is_named_only_when_nothing_reads_it():
    from grpo_care.config import GRPOCareConfig
    from grpo_care.ema import unused_decay

    assert unused_decay(GRPOCareConfig(use_care=False, beta=0.0, ref_ema_decay=0.9))
    for values in (dict(use_care=False, beta=0.0), dict(use_care=False, beta=0.04, ref_ema_decay=0.9),
                   dict(use_care=True, beta=0.0, ref_ema_decay=0.9)):
        assert unused_decay(GRPOCareConfig(**values)) is None, values


# ------------------------------------------------------------------------------------------------------------
# a missing (None) or infinite accuracy reaches ck.care_bonus as it is


NAN_OR_INF_TEXTS = (
    "<think>a</think><answer>A</answer>",
    "<think>b</think><answer>B</answer>",
    "<think>c</think><answer>C</answer>",
    "<think>d</think><answer>D</answer>",
)
ACCURACY_OF = {}  # completion text -> accuracy, set by each case


def table_accuracy(completions, **columns):
    return [ACCURACY_OF.get(c) for c in completions]


@pytest.mark.parametrize(
    "accuracy, bonus",
    [
        # None is left out of the group's mean accuracy (0.75: only the first is high-accuracy); as 0 it would
        # make the mean 0.375 and pay the 0.5-accuracy rollout 0.25 too (likelihoods tie at the tiny cap)
        ([1.0, 0.5, None, None], [0.5, 0.0, 0.0, 0.0]),
        # an infinite accuracy is out of its group (mean 1/3 over the rest): no bonus of ~1.7e38 for it
        ([float("inf"), 1.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]),
    ],
)
def test_none_and_infinite_accuracy_reach_the_bonus_unchanged(assets, tmp_path, monkeypatch, accuracy, bonus):
    from grpo_care import trainer as trainer_module
    from grpo_care.rollout import completion_mask
    from grpo_care.tiny import tiny_qwen2
    from grpo_care.trainer import Trainer

    tok, seen = assets["tok"], {}
    real_generate = trainer_module.generate_rollouts
    monkeypatch.setitem(ACCURACY_OF, "", None)
    for text, value in zip(NAN_OR_INF_TEXTS, accuracy):
        monkeypatch.setitem(ACCURACY_OF, text, value)

    def hand_written(model, prompts, generation_config, group_size, eos_token_id=None):
        rollout = real_generate(model, prompts, generation_config, group_size)
        rows = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in NAN_OR_INF_TEXTS]
        ids = torch.full((len(rows), max(map(len, rows))), generation_config.pad_token_id)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        rollout.completion_ids, rollout.completion_mask = ids, completion_mask(ids, tok.eos_token_id)
        rollout.finished = torch.ones(len(rows), dtype=torch.bool)
        return rollout

    monkeypatch.setattr(trainer_module, "generate_rollouts", hand_written)
    config = _config(assets, tmp_path, max_steps=1, num_generations=4, per_device_train_batch_size=1,
                     max_completion_length=4, report_to=["none"], log_completions=False,
                     confidence_upper_bound=1e-6,  # every likelihood capped: ties, so only the HA set decides
                     reward_funcs=[f"{__name__}.table_accuracy", "format"])
    trainer = Trainer(config, model=tiny_qwen2(tok), tokenizer=tok)
    real_micro_step = trainer._micro_step
    monkeypatch.setattr(trainer, "_micro_step", lambda: seen.setdefault("result", real_micro_step()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = trainer.train()
    result = seen["result"]
    assert result.bonus.tolist() == bonus
    assert torch.isfinite(result.advantages).all() and math.isfinite(summary["losses"][0])


# ------------------------------------------------------------------------------------------------------------
# the step's batch pinned in prompts


def test_prompts_per_step_sets_the_accumulation(assets, tmp_path, monkeypatch):
    """prompts_per_step 4 with 1 prompt per micro-batch on one process: 4 micro-batches per step (under torchrun
    it is divided by the world size; test_grpo_care_batch); a gradient_accumulation_steps that disagrees is
    refused, not replaced."""
    from grpo_care.tiny import tiny_qwen2
    from grpo_care.trainer import Trainer

    with pytest.raises(ValueError, match="gradient_accumulation_steps=2 disagrees with prompts_per_step=4"):
        Trainer(_config(assets, tmp_path / "two", prompts_per_step=4, per_device_train_batch_size=1,
                        gradient_accumulation_steps=2), model=tiny_qwen2(assets["tok"]), tokenizer=assets["tok"])
    config = _config(assets, tmp_path, prompts_per_step=4, per_device_train_batch_size=1,
                     gradient_accumulation_steps=4, max_steps=2, max_completion_length=4, report_to=["none"],
                     log_completions=False)
    trainer = Trainer(config, model=tiny_qwen2(assets["tok"]), tokenizer=assets["tok"])
    calls = []
    real_micro_step = trainer._micro_step
    monkeypatch.setattr(trainer, "_micro_step", lambda: calls.append(1) or real_micro_step())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert len(calls) == 8 and trainer.config.gradient_accumulation_steps == 4
    saved = GRPOCareConfig.from_yaml(tmp_path / "config.yaml")  # the run records what it ran with
    assert (saved.prompts_per_step, saved.gradient_accumulation_steps) == (4, 4)
    with pytest.raises(ValueError, match="prompts_per_step=3 cannot be split"):
        Trainer(_config(assets, tmp_path / "odd", prompts_per_step=3, per_device_train_batch_size=2),
                model=tiny_qwen2(assets["tok"]), tokenizer=assets["tok"])
