"""`GRPOCareConfig`: every knob of a run, with help text, loadable from YAML and overridable from the CLI.

    config = GRPOCareConfig.from_yaml("configs/seed_bench_r1_care.yaml", ["max_steps=10"])
    config = GRPOCareConfig.from_cli(["--config", "configs/tiny_cpu.yaml", "--use_care", "false"])

Field names follow TRL's GRPOConfig where the meaning is the same (`num_generations`, `beta`, `epsilon`,
`loss_type`, ...) and GRPO-CARE's where it adds (`use_care`, `ref_ema_decay`, `bonus_coefficient`, ...).
The defaults are the paper's SEED-Bench-R1 run (grpo_care.md section 8), except that one process plays the 4
GPUs of the paper through `gradient_accumulation_steps=4`: 4 prompts x 8 rollouts per optimizer step, the loss
averaged over the 32 sequences exactly as DeepSpeed averaged it over the devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from grpo_care.data import PROMPT_STYLES
from grpo_care.user_errors import OneLineArgumentParser, UsageError, shown_path

_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# The saved data position (epoch, cursor into an order seeded by `seed`) means nothing under another seed. That
# the samples are the same ones is checked on the data itself (PromptStream's fingerprint), not on their path.
RESUME_MUST_MATCH = frozenset({"seed"})
# Where and how a run reports, not what it trains: never worth a warning when they change on resume.
RESUME_BOOKKEEPING = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "logging_steps", "report_to", "log_completions",
    "log_completions_steps", "num_completions_to_print", "save_steps", "save_total_limit", "disable_tqdm",
    "dist_timeout", "eval_files", "eval_temperature", "eval_top_p", "eval_max_new_tokens", "eval_batch_size",
    "eval_video_max_frames", "eval_real_video_timing", "eval_judge", "eval_judge_timeout", "eval_judge_max_retries",
    "eval_judge_workers",
})
_SCALES = ("group", "batch", "none")
_ANSWER_SPANS = ("content", "official")


@functools.lru_cache(maxsize=1)
def lr_scheduler_names() -> tuple[str, ...]:
    """transformers' SchedulerType names that the trainer can run: built by `get_scheduler(name, optimizer,
    num_warmup_steps, num_training_steps)` alone and stepped without a metric (not reduce_lr_on_plateau or
    greedy, which need a metric; not cosine_with_min_lr, cosine_warmup_with_min_lr or warmup_stable_decay, which
    need arguments this config has no field for)."""
    import torch
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    names = []
    for kind in SchedulerType:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        try:
            scheduler = get_scheduler(kind.value, optimizer, num_warmup_steps=1, num_training_steps=4)
            optimizer.step()
            scheduler.step()
        except (TypeError, ValueError):
            continue
        names.append(kind.value)
    return tuple(names)


def _f(default, help: str):
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class GRPOCareConfig:
    # --- model ----------------------------------------------------------------------------------------------
    model_name_or_path: str = _f(
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "Hugging Face id or local directory of the policy (Qwen2.5-VL or any causal LM); "
        "the EMA reference starts as a copy of it.",
    )
    model_dtype: str = _f(
        "float32",
        "dtype of the policy's parameters (float32 keeps fp32 master weights; "
        "bfloat16 halves memory but AdamW then updates bf16 weights).",
    )
    bf16: bool = _f(True, "bf16 autocast for forward passes on GPU (ignored on CPU, which runs fp32).")
    attn_implementation: str = _f(
        "auto",
        "attention kernel: auto (flash_attention_2 when installed on GPU, "
        "else sdpa), sdpa, eager or flash_attention_2.",
    )
    gradient_checkpointing: bool = _f(True, "recompute decoder activations in backward to save memory.")
    use_liger_kernel: bool = _f(
        False,
        "on GPU with liger-kernel installed, swap in its RMSNorm, SwiGLU and RoPE "
        "kernels; the LM head and loss always run through care_kernels.",
    )
    freeze_vision_tower: bool = _f(False, "freeze the vision encoder (the paper trains it: False).")
    device: str = _f("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N.")

    # --- data -----------------------------------------------------------------------------------------------
    train_file: str = _f(
        "",
        "training annotations: SEED-Bench-R1 JSONL (annotations/training_6k.jsonl) or a "
        "Video-R1 style JSON/JSONL list.",
    )
    data_root: str = _f(
        "",
        "dataset root holding videos/ and images/ (SEED-Bench-R1) or the media paths "
        "(Video-R1); empty means the annotation file's parent's parent.",
    )
    dataset_format: str = _f(
        "auto",
        "auto, seed_bench_r1 or video_r1 (auto: a record with `problem_type` is "
        "Video-R1, one without is SEED-Bench-R1).",
    )
    prompt_style: str = _f(
        "paper",
        "the prompt's instructions: paper (GRPO-CARE's templates, grpo_care.md 2) or short (one sentence, "
        "'Please reason between the <think> </think> tags and answer between the <answer> </answer> tags.'; no "
        "option-letter sentence), for training and evaluation alike.",
    )
    eval_files: list = _f([], "validation files scored by `grpo-care eval` (e.g. validation_L1/L2/L3.jsonl).")
    max_train_samples: int = _f(0, "use only the first N training records (0: all).")

    # --- rollouts -------------------------------------------------------------------------------------------
    num_generations: int = _f(8, "G, completions sampled per prompt (one group).")
    per_device_train_batch_size: int = _f(1, "prompts per micro-batch (each expands to G completions).")
    gradient_accumulation_steps: int = _f(
        4,
        "micro-batches per optimizer step; the loss is their mean (derived from prompts_per_step when that is "
        "set).",
    )
    prompts_per_step: int = _f(
        0,
        "prompts per optimizer step over all ranks, pinned: gradient_accumulation_steps becomes prompts_per_step "
        "/ (per_device_train_batch_size x world size), so the batch is the same on 1 GPU or under torchrun "
        "(refused when it does not divide). The paper's 4 GPUs x 1 prompt: 4. 0: not pinned (per_device x "
        "gradient_accumulation_steps x world size).",
    )
    max_prompt_length: int = _f(
        16384,
        "text-only prompts longer than this are left-truncated; multimodal "
        "prompts are never cut (it would split visual tokens).",
    )
    max_completion_length: int = _f(768, "max new tokens per completion.")
    temperature: float = _f(1.0, "sampling temperature of the rollouts (also the loss's logit temperature).")
    top_p: float = _f(0.95, "nucleus sampling threshold of the rollouts.")
    top_k: int = _f(50, "top-k of the rollouts (HF's default, set explicitly; 0 disables).")
    repetition_penalty: float = _f(1.0, "repetition penalty of the rollouts (1.0: none).")

    # --- optimization ---------------------------------------------------------------------------------------
    learning_rate: float = _f(1e-6, "peak AdamW learning rate.")
    lr_scheduler_type: str = _f("cosine", "transformers scheduler name: cosine, linear, constant, ...")
    warmup_ratio: float = _f(0.0, "fraction of max_steps spent warming up linearly.")
    weight_decay: float = _f(
        0.01, "AdamW weight decay (not applied to biases and norm weights, as HF Trainer)."
    )
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(5.0, "global gradient-norm clip (0 disables).")
    max_steps: int = _f(1500, "optimizer steps to run (<= 0: num_train_epochs passes over the data).")
    num_train_epochs: int = _f(1, "passes over the data when max_steps <= 0.")
    seed: int = _f(42, "seed of the option shuffle, the data order and the rollouts.")

    # --- loss -----------------------------------------------------------------------------------------------
    beta: float = _f(0.0, "k3 KL weight against the reference (GRPO-CARE: 0; TRL's default for GRPO: 0.04).")
    kl_clamp: Optional[float] = _f(
        10.0,
        "bound on |ref_logp - logp| inside the k3 KL when beta > 0 (the authors' trainer clamps at 10, "
        "grpo_care.md 6; None: unclamped, as TRL).",
    )
    epsilon: float = _f(0.2, "PPO clip epsilon (lower; never active with one update per rollout batch).")
    epsilon_high: Optional[float] = _f(None, "upper clip epsilon (None: same as epsilon).")
    loss_type: str = _f(
        "grpo", "grpo (token mean per sequence, then mean: GRPO-CARE), bnpo, dr_grpo or dapo."
    )
    scale_rewards: str = _f(
        "group",
        "advantage scale: group ((r - mean) / (std + 1e-4), unbiased std), batch (the std of the micro-batch's "
        "rewards on this rank, which is the group's at per_device_train_batch_size 1; TRL's is over the whole "
        "generation batch), none.",
    )
    reward_funcs: list = _f(
        ["accuracy", "format"],
        "reward functions: built-in names (accuracy, format) or dotted paths "
        "`pkg.module.func` with TRL's signature f(completions, **columns) -> list[float|None]. "
        "The first one is the accuracy that CARE's bonus reads.",
    )
    reward_weights: Optional[list] = _f(None, "one weight per reward function (None: all 1).")

    # --- CARE -----------------------------------------------------------------------------------------------
    use_care: bool = _f(
        True,
        "GRPO-CARE: reference likelihood and consistency bonus (False: plain GRPO, with a reference only for "
        "beta > 0).",
    )
    ref_ema_decay: Optional[float] = _f(
        None,
        "EMA decay alpha of the reference, phi <- alpha*phi + (1-alpha)*theta every ref_ema_update_every steps. "
        "A value applies whenever there is a reference (use_care, or beta > 0: with use_care false, Table 3's "
        "KL-EMA); 1.0 freezes it at the initial model. null (unset): 0.995 with use_care (the paper), frozen "
        "without (plain GRPO's KL reference). A frozen reference keeps no fp32 EMA shadow.",
    )
    ref_ema_update_every: int = _f(10, "update the EMA reference every this many optimizer steps.")
    bonus_coefficient: float = _f(0.5, "lambda: the bonus is bonus_coefficient * accuracy.")
    confidence_upper_bound: float = _f(0.95, "gamma_p: the reference likelihood is capped here.")
    consistency_margin: float = _f(
        0.0,
        "eps_p: the likelihood must reach (baseline - margin); 0.01 for the transfer models of the paper.",
    )
    accuracy_floor: float = _f(0.1, "gamma_acc: high-accuracy rollouts need accuracy above this.")
    answer_span: str = _f(
        "content",
        "the completion tokens whose reference likelihood CARE scores: content (the tokens covering the stripped "
        "content of the first <answer>...</answer>, the string the accuracy reward grades) or official (the "
        "authors' span: after the `answer` token of the last <answer> up to 3 tokens before EOS, so it also holds "
        "the tag's `>`; grpo_care.md 5.2).",
    )

    # --- visual budget (grpo_care.md 2.3) -------------------------------------------------------------------
    video_fps: float = _f(2.0, "frames sampled per second of video.")
    video_min_frames: int = _f(4, "at least this many frames (rounded up to even).")
    video_max_frames: int = _f(16, "at most this many frames (rounded down to even).")
    video_min_pixels: int = _f(128 * 28 * 28, "per-frame pixel floor.")
    video_max_pixels: int = _f(
        128 * 28 * 28,
        "per-frame pixel budget (the effective cap is at least "
        "1.05 x video_min_pixels, as in qwen_vl_utils).",
    )
    video_total_pixels: int = _f(int(128000 * 28 * 28 * 0.9), "pixel budget of a whole video.")
    image_min_pixels: int = _f(4 * 28 * 28, "current-observation image pixel floor.")
    image_max_pixels: int = _f(
        256 * 28 * 28, "current-observation image pixel cap (at most 256 visual tokens)."
    )

    # --- evaluation (grpo_care.md 9.3) ----------------------------------------------------------------------
    eval_temperature: float = _f(0.1, "evaluation sampling temperature (near-greedy).")
    eval_top_p: float = _f(0.001, "evaluation top_p.")
    eval_max_new_tokens: int = _f(1024, "evaluation max new tokens.")
    eval_batch_size: int = _f(4, "prompts per evaluation batch.")
    eval_video_max_frames: int = _f(16, "max frames at evaluation (16 SEED-Bench-R1, 32 general benchmarks).")
    eval_real_video_timing: bool = _f(
        True,
        "at evaluation, give each video its real temporal spacing (M-RoPE's second_per_grid_ts = 2 frames / the "
        "sampled fps, as the authors' vLLM evaluation is given the sampled fps: a clip sampled below 2 fps gets "
        "more than 1 s per temporal patch). False: 1 s per patch for every clip, as in training (the authors' "
        "and this trainer's training drop second_per_grid_ts).",
    )
    eval_judge: str = _f(
        "none",
        "consistency judge of `grpo-care eval` (grpo_care.md 9.4): none, offline (no network: does the "
        "reasoning settle on the answered option), http (OpenAI-compatible; GRPO_CARE_JUDGE_URL, "
        "GRPO_CARE_JUDGE_MODEL, GRPO_CARE_JUDGE_API_KEY) or a dotted path pkg.module:factory.",
    )
    eval_judge_timeout: float = _f(30.0, "seconds per HTTP judge request before it is retried.")
    eval_judge_max_retries: int = _f(
        2, "retries of a failed HTTP judge request before the sample is unjudged."
    )
    eval_judge_workers: int = _f(4, "judge requests in flight at once.")

    # --- distributed (torchrun) -----------------------------------------------------------------------------
    distributed: str = _f(
        "auto",
        "data parallelism under torchrun: auto (ddp when WORLD_SIZE > 1, else one process), none, ddp, "
        "or fsdp (FSDP2 fully_shard per decoder / vision block, then the root).",
    )
    dist_backend: str = _f("", "torch.distributed backend ('' : nccl on CUDA, gloo on CPU).")
    dist_timeout: int = _f(
        1800,
        "seconds a collective may wait for the slowest rank (rank 0 alone reads a 7B model at FSDP start-up "
        "and writes the gathered weights at each checkpoint) before the job is aborted.",
    )
    fsdp_reshard_after_forward: bool = _f(
        True,
        "FSDP2: free each block's gathered parameters after its forward (ZeRO-3 like); False: ZeRO-2 like.",
    )
    fsdp_sharded_checkpoints: bool = _f(
        True,
        "FSDP2: each rank writes its shards of the AdamW state and the EMA shadow (torch.distributed.checkpoint, "
        "in checkpoint-N/sharded/; resuming needs the same world size); False: gathered on rank 0 in "
        "trainer_state.pt. The policy is always saved in full as model.safetensors (from_pretrained reads it).",
    )
    ddp_find_unused_parameters: bool = _f(
        False, "DDP: allow parameters without a gradient in a step (slower; needed if some modules can idle)."
    )

    # --- output, logging, checkpoints -----------------------------------------------------------------------
    output_dir: str = _f("outputs/grpo_care", "where metrics, completions and checkpoints go.")
    logging_steps: int = _f(1, "log metrics every N optimizer steps.")
    report_to: list = _f(["tensorboard"], "metric sinks besides metrics.jsonl: tensorboard or none.")
    log_completions: bool = _f(True, "write sampled completions to completions.jsonl and print a few.")
    log_completions_steps: int = _f(50, "log completions every N optimizer steps.")
    num_completions_to_print: int = _f(2, "completions printed to the console each time.")
    save_steps: int = _f(500, "checkpoint every N optimizer steps (0: only at the end).")
    save_total_limit: int = _f(0, "keep only the newest N checkpoints (0: keep all).")
    resume_from_checkpoint: str = _f(
        "",
        "'' (fresh run), 'latest' (newest checkpoint in output_dir) or a checkpoint directory. The resumed run "
        "takes its hyperparameters from this config; the seed and the samples (wherever the files now are) must "
        "match.",
    )
    overwrite_output_dir: bool = _f(
        False,
        "delete the checkpoints in output_dir that this run's would mix with: all of them for a fresh run (and "
        "the earlier run's tensorboard/), those past the resumed step otherwise (False: refuse to start).",
    )
    disable_tqdm: bool = _f(False, "no progress bar.")

    def __post_init__(self):
        self._check()

    # --------------------------------------------------------------------------------------------------------
    def _check(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        need(
            self.num_generations >= 2,
            f"num_generations must be >= 2 (group statistics), got {self.num_generations}",
        )
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "max_completion_length",
            "ref_ema_update_every",
            "video_min_frames",
            "video_max_frames",
            "eval_batch_size",
            "eval_judge_workers",
        ):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.loss_type in _LOSS_TYPES, f"loss_type must be one of {_LOSS_TYPES}, got {self.loss_type!r}")
        need(
            self.scale_rewards in _SCALES,
            f"scale_rewards must be one of {_SCALES}, got {self.scale_rewards!r}",
        )
        for f in dataclasses.fields(self):  # NaN passes no comparison below, but inf passes many
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                unclamped = " (null: unclamped)" if f.name == "kl_clamp" else ""
                need(False, f"{f.name} must be a finite number{unclamped}, got {value}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.learning_rate >= 0, f"learning_rate must be >= 0, got {self.learning_rate}")
        need(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        need(0 <= self.warmup_ratio <= 1, f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.adam_beta1 < 1, f"adam_beta1 must be in [0, 1), got {self.adam_beta1}")
        need(0 <= self.adam_beta2 < 1, f"adam_beta2 must be in [0, 1), got {self.adam_beta2}")
        need(self.adam_epsilon > 0, f"adam_epsilon must be > 0, got {self.adam_epsilon}")
        need(self.bonus_coefficient >= 0, f"bonus_coefficient must be >= 0, got {self.bonus_coefficient}")
        need(self.confidence_upper_bound > 0,
             f"confidence_upper_bound must be > 0 (a likelihood cap), got {self.confidence_upper_bound}")
        need(self.video_fps > 0, f"video_fps must be > 0, got {self.video_fps}")
        need(self.eval_temperature > 0, f"eval_temperature must be > 0 (sampled), got {self.eval_temperature}")
        need(0 < self.eval_top_p <= 1, f"eval_top_p must be in (0, 1], got {self.eval_top_p}")
        need(
            self.lr_scheduler_type in lr_scheduler_names(),
            f"lr_scheduler_type must be one of {', '.join(lr_scheduler_names())} (transformers' schedulers that "
            f"need nothing but the warmup and step counts), got {self.lr_scheduler_type!r}",
        )
        need(
            self.ref_ema_decay is None or 0.0 <= self.ref_ema_decay <= 1.0,
            f"ref_ema_decay must be in [0, 1] (1.0: a frozen reference) or null (the method's own), "
            f"got {self.ref_ema_decay}",
        )
        need(
            self.answer_span in _ANSWER_SPANS,
            f"answer_span must be one of {_ANSWER_SPANS}, got {self.answer_span!r}",
        )
        need(self.prompts_per_step >= 0, f"prompts_per_step must be >= 0 (0: not pinned), got {self.prompts_per_step}")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(
            self.kl_clamp is None or self.kl_clamp > 0,
            f"kl_clamp must be > 0 or null (unclamped), got {self.kl_clamp}",
        )
        need(len(self.reward_funcs) >= 1, "reward_funcs must name at least one reward function")
        need(
            self.reward_weights is None or len(self.reward_weights) == len(self.reward_funcs),
            f"reward_weights must have one weight per reward function ({len(self.reward_funcs)}), "
            f"got {self.reward_weights}",
        )
        need(
            self.dataset_format in ("auto", "seed_bench_r1", "video_r1"),
            f"dataset_format must be auto, seed_bench_r1 or video_r1, got {self.dataset_format!r}",
        )
        need(
            self.prompt_style in PROMPT_STYLES,
            f"prompt_style must be {' or '.join(PROMPT_STYLES)}, got {self.prompt_style!r}",
        )
        need(
            self.distributed in ("auto", "none", "ddp", "fsdp"),
            f"distributed must be auto, none, ddp or fsdp, got {self.distributed!r}",
        )
        need(self.dist_timeout > 0, f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        need(self.eval_judge_timeout > 0, f"eval_judge_timeout must be > 0, got {self.eval_judge_timeout}")
        need(
            self.eval_judge_max_retries >= 0,
            f"eval_judge_max_retries must be >= 0, got {self.eval_judge_max_retries}",
        )
        need(
            self.model_dtype in ("float32", "bfloat16", "float16"),
            f"model_dtype must be float32, bfloat16 or float16, got {self.model_dtype!r}",
        )

    # --------------------------------------------------------------------------------------------------------
    def resume_changes(self, saved: dict, where: str) -> list[str]:
        """The fields this config changes against a checkpoint's (`saved`, its `to_dict()`), as "name: old ->
        new" lines; a ValueError if one of them defines the saved data position (RESUME_MUST_MATCH)."""
        changes, refused = [], []
        for name in self.field_names():
            if name in RESUME_BOOKKEEPING or not saved:
                continue
            new = getattr(self, name)
            if name not in saved:  # a field added since the checkpoint was written: what it ran under is unknown
                changes.append(f"{name}: (not in the checkpoint's config) -> {new!r}")
                continue
            old = saved[name]
            if old != new:
                (refused if name in RESUME_MUST_MATCH else changes).append(f"{name}: {old!r} -> {new!r}")
        if refused:
            raise ValueError(
                f"{where} was written with {'; '.join(refused)}: its data position means nothing under another "
                "value. Resume with the checkpoint's value, or start a fresh run from its weights "
                f"(model_name_or_path={where}, a new output_dir)"
            )
        return changes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, source: str = "config", sources: Optional[dict] = None) -> GRPOCareConfig:
        """Build from a dict; unknown keys are an error that names the closest field.

        `sources` maps a key to where its value came from (COMMAND_LINE, a file's path; `source` for keys it
        does not name): a bad value is then a UsageError that says where it was set and how to change it, and
        the built config remembers it (`describe_source`)."""
        origins = {key: (sources or {}).get(key, source) for key in values}
        known = set(cls.field_names())
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UsageError(f"unknown config key {key!r}{hint}", source=_where(key, values[key], origins[key]),
                                 hint="`grpo-care train --help` lists every field")
        hints = typing.get_type_hints(cls)
        coerced = {key: _coerce(key, value, hints[key], _where(key, value, origins[key]), _fix(key, origins[key]))
                   for key, value in values.items()}
        try:
            config = cls(**coerced)
        except ValueError as err:
            if isinstance(err, UsageError):
                raise
            named = [k for k in re.findall(r"[a-z_][a-z0-9_]*", str(err)) if k in values]
            if not named:
                raise UsageError(str(err), source="the default values",
                                 hint="set the field(s) it names in the config or on the command line") from err
            key = named[0]
            raise UsageError(str(err), source=_where(key, values[key], origins[key]),
                             hint=_fix(key, origins[key])) from err
        config._sources = {k: _where(k, v, origins[k]) for k, v in values.items()}
        return config

    def describe_source(self, name: str) -> str:
        """Where this config's `name` came from, for messages: "set in c.yaml as name: v", "given on the command
        line as --name v", or "the default"."""
        return getattr(self, "_sources", {}).get(name, "the default")

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None,
                  overrides_source: str = "overrides") -> GRPOCareConfig:
        """Load a YAML file (or the defaults when path is None) and apply overrides.

        Overrides are `key=value` strings or `--key value` / `--key=value` tokens; values are parsed as YAML
        (`true`, `1e-6`, `[accuracy, format]`, `null`), lists also as comma-separated text. `overrides_source`
        names where they came from in error messages (COMMAND_LINE for the CLI's). A missing or malformed file
        and a bad value are UsageErrors that say which file or override set what.
        """
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        if path:
            for key, value in _read_config_file(Path(path)).items():
                values[key], sources[key] = value, str(path)
        for key, value in _parse_overrides(overrides or [], overrides_source).items():
            values[key], sources[key] = value, overrides_source
        return cls.from_dict(values, source=str(path) if path else overrides_source, sources=sources)

    @classmethod
    def from_cli(cls, argv: list[str] | None = None, prog: str = "grpo-care train") -> GRPOCareConfig:
        """`--config FILE.yaml` plus `--field value` overrides; `--help` lists every field with its help."""
        parser = cls.argument_parser(prog)
        args, rest = parser.parse_known_args(argv)
        if rest:
            unknown = [t[2:].split("=")[0] for t in rest if t.startswith("--")]
            close = difflib.get_close_matches(unknown[0], cls.field_names(), n=1) if unknown else []
            parser.error(f"unrecognized arguments: {' '.join(rest)}"
                         + (f" (did you mean --{close[0]}?)" if close else ""))
        given = {k: v for k, v in vars(args).items() if k != "config"}
        overrides = [f"{k}={v}" for k, v in given.items()]
        return cls.from_yaml(args.config, overrides, overrides_source=COMMAND_LINE)

    @classmethod
    def argument_parser(cls, prog: str = "grpo-care train") -> argparse.ArgumentParser:
        parser = OneLineArgumentParser(
            prog=prog,
            description="GRPO / GRPO-CARE training. Values on the command line override the YAML file.",
            argument_default=argparse.SUPPRESS,
        )
        parser.add_argument("--config", default=None, help="YAML file of field: value pairs.")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            parser.add_argument(
                f"--{f.name}", metavar="VALUE", type=str, help=f"{f.metadata['help']} [default: {default}]"
            )
        return parser


COMMAND_LINE = "the command line"


def _where(key: str, raw: Any, origin: str) -> str:
    """'given on the command line as --key raw', 'set in c.yaml as key: raw', ..."""
    shown = raw if isinstance(raw, str) else yaml.safe_dump(raw, default_flow_style=True).strip().removesuffix("...")
    shown = shown.strip()
    if origin == COMMAND_LINE:
        return f"given on the command line as --{key} {shown}"
    if origin == "overrides":
        return f"given as the override {key}={shown}"
    return f"set in {origin} as {key}: {shown}"


def _fix(key: str, origin: str) -> str:
    if origin == COMMAND_LINE:
        return f"pass another value to --{key}"
    if origin == "overrides":
        return f"change the override {key}=..."
    return f"change `{key}:` in {origin} (or override it with --{key} VALUE)"


def _read_config_file(path: Path) -> dict:
    """The mapping in a YAML config file, or a UsageError saying what is wrong with the file."""
    where = "given as --config"
    if not path.expanduser().is_file():
        problem = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
        raise UsageError(f"config file {shown_path(path)} {problem}", source=where,
                         hint="pass the path of a YAML config, e.g. --config configs/tiny_cpu.yaml")
    try:
        loaded = yaml.safe_load(path.expanduser().read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"config file {path} is not valid YAML{at}: {problem}", source=where,
                         hint="fix the file: one `field: value` per line") from err
    if loaded is not None and not isinstance(loaded, dict):
        raise UsageError(f"{path}: a config file must be a YAML mapping of field: value", source=where,
                         hint="write one `field: value` per line")
    return loaded or {}


def _parse_overrides(tokens: list[str], origin: str = "overrides") -> dict[str, Any]:
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        key = token[2:] if token.startswith("--") else token
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif token.startswith("--") and i + 1 < len(tokens):
            raw = tokens[i + 1]
            i += 2
        else:
            raise UsageError(f"override {token!r} must be key=value or --key value",
                             source=f"given on {origin}" if origin == COMMAND_LINE else "",
                             hint="write --field VALUE or field=VALUE")
        out[key.replace("-", "_")] = raw
    return out


def _coerce(key: str, value: Any, hint: Any, source: str, fix: str = "") -> Any:
    """Turn a YAML or command-line value into the field's type, or a UsageError naming the field, where its
    value was `source`d and (`fix`) how to change it."""
    origin_args = typing.get_args(hint)
    optional = type(None) in origin_args
    base = next((a for a in origin_args if a is not type(None)), hint) if origin_args else hint
    if isinstance(value, str):
        text = value.strip()
        if optional and text.lower() in ("none", "null", "~", ""):
            return None
        if base is list:
            parsed = (
                yaml.safe_load(text)
                if text.startswith("[")
                else [x.strip() for x in text.split(",") if x.strip()]
            )
            value = parsed
        elif base is str:
            return text
        else:
            value = yaml.safe_load(text)
    if value is None:
        if optional:
            return None
        raise UsageError(f"{key} may not be null", source=source, hint=fix)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is list:
            return list(value) if isinstance(value, (list, tuple)) else [value]
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise UsageError(f"{key} must be {getattr(base, '__name__', base)}, got {value!r}", source=source, hint=fix)
