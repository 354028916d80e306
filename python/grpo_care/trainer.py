"""The GRPO / GRPO-CARE training loop, with care_kernels doing every log-prob and group computation.

    summary = train(GRPOCareConfig.from_yaml("configs/seed_bench_r1_care.yaml"))
    summary = train(config, model=tiny_model, processor=processor)      # a ready model object

One micro-batch (grpo_care.md 3-6):
  1. G completions per prompt, sampled with explicit parameters (rollout.py);
  2. base rewards per function (rewards.py), accuracy first;
  3. the policy backbone runs with grad on prompt + completion: hidden states [N, L, H] of the completion
     positions; the reference backbone runs under no_grad on the same inputs;
  4. CARE: one no_grad care_kernels pass over the vocabulary scores the reference head (`linear_logprobs`,
     2NHV), whose per-token log-probs its likelihood needs before the loss; plain GRPO with a KL has the loss
     head score the reference (same 2NHV, the policy's own code: equal weights give a KL gradient of exactly 0);
  5. CARE: answer spans (care_kernels.answer_spans) -> `ck.answer_likelihood` -> `ck.care_bonus`; reward = sum + bonus;
  6. `ck.group_advantages`, then `ck.FusedLinearGRPOLoss` on the policy hidden states and the LM-head
     weight: it forms the per-token gradient during its forward (6NHV) and hands back the policy's log-probs
     and entropy for the metrics, and backward sends the gradient through the backbone. 8NHV of head GEMMs
     per step with a reference, and no [N, L, V] logits are ever built.
Then, per optimizer step: gradient clipping, AdamW, the LR schedule, and every `ref_ema_update_every` steps
the fp32 EMA update of the reference (ema.py). A reference exists for CARE and for `beta > 0`; it follows the
EMA whenever `ref_ema_decay` is set below 1 (plain GRPO with a decay is Table 3's KL-EMA) and stays the
initial model, with no fp32 shadow, at 1.0; unset, CARE's is an EMA (0.995) and plain GRPO's is frozen.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

import care_kernels as ck
from grpo_care import checkpoint as ckpt
from grpo_care import distributed, fsdp_init, sharded_state
from grpo_care.batch import with_pinned_batch
from grpo_care.care import consistency_bonus, total_rewards
from grpo_care.config import GRPOCareConfig
from grpo_care.data import build_messages, load_samples
from grpo_care.ema import EMAReference, ema_decay, ema_moves, needs_reference, unused_decay
from grpo_care.logging_utils import MetricsLogger
from grpo_care.metrics import MicroBatchResult, completion_records, k3_kl, masked_mean, step_metrics
from grpo_care.modeling import (
    autocast,
    backbone_hidden,
    is_multimodal,
    is_on_meta,
    lm_head_params,
    load_model,
    prepare_for_training,
)
from grpo_care.prompts import PromptItem, PromptStream
from grpo_care.rewards import resolve_reward_func, reward_name, score_completions
from grpo_care.rollout import (
    encode_prompts,
    generate_rollouts,
    sampling_config,
    tokenizer_of,
    unsampleable_ids,
)
from grpo_care.user_errors import UsageError
from grpo_care.video import VisualBudget

IGNORE_INDEX = -100


def train(config: GRPOCareConfig, model=None, processor=None, tokenizer=None) -> dict:
    """Run GRPO-CARE (or GRPO) as `config` says; returns a summary (final metrics, losses, output paths).

    `model` may be a ready model object (e.g. a tiny Qwen2.5-VL built in memory) with its `processor`
    (multimodal) and/or `tokenizer`; otherwise `config.model_name_or_path` is loaded.
    """
    return Trainer(config, model=model, processor=processor, tokenizer=tokenizer).train()


class Trainer:
    def __init__(self, config: GRPOCareConfig, model=None, processor=None, tokenizer=None):
        self.dist = distributed.setup(config)  # one process: a no-op env, device from config.device
        # a pinned prompts_per_step sets the accumulation for this world size (the paper's batch on 1 or 4 GPUs)
        config = self.config = with_pinned_batch(config, self.dist.world_size)
        if unused_decay(config) and self.dist.is_main:
            warnings.warn(unused_decay(config), stacklevel=3)
        self.device = self.dist.device
        self.output_dir = Path(config.output_dir)
        self.resume_from = self._prepare_output_dir()  # the checkpoint to continue from, or None
        source = None  # FSDP start-up from files: rank 0's loaded weights, which fill the sharded skeleton
        self._weights_from = None  # ... read from this checkpoint when resuming (so not read a second time)
        if model is None and self.dist.mode == "fsdp":
            self._weights_from = self.resume_from
            model, processor, tokenizer, source = fsdp_init.load_on_meta(
                config, self.dist, weights_from=self._weights_from
            )
        elif model is None:
            model, processor, tokenizer = load_model(config, self.device)
        elif is_on_meta(model):
            raise ValueError("the model's parameters are on the meta device: pass a model with its weights")
        if processor is None and tokenizer is None:
            raise ValueError("pass a processor (multimodal models) or a tokenizer together with the model")
        self.processor = processor if processor is not None else tokenizer
        self.tokenizer = tokenizer if tokenizer is not None else tokenizer_of(processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.multimodal = is_multimodal(model)
        if self.multimodal and not hasattr(self.processor, "image_processor"):
            raise ValueError("a multimodal model needs its processor (with image and video processors)")
        torch.manual_seed(config.seed)
        self.model = prepare_for_training(model, config, self.device)

        self.reward_names = [reward_name(n) for n in config.reward_funcs]
        self.reward_funcs = [resolve_reward_func(n) for n in config.reward_funcs]
        weights = config.reward_weights or [1.0] * len(self.reward_funcs)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)

        if not config.train_file:
            raise ValueError("train_file is empty: point it at the training annotations (JSONL or JSON)")
        all_samples = load_samples(
            config.train_file,
            config.data_root or None,
            fmt=config.dataset_format,
            seed=config.seed,
            template="train",
            prompt_style=config.prompt_style,
            limit=config.max_train_samples,
        )
        samples = distributed.shard_samples(all_samples, self.dist)
        self.stream = PromptStream(
            samples,
            config.per_device_train_batch_size,
            config.seed,
            VisualBudget.from_config(config),
            self.multimodal,
            all_samples=all_samples,
        )
        per_step = (
            config.per_device_train_batch_size * config.gradient_accumulation_steps * self.dist.world_size
        )
        self.max_steps = (
            config.max_steps
            if config.max_steps > 0
            else (math.ceil(len(all_samples) / per_step) * config.num_train_epochs)
        )

        fsdp, skeleton = self.dist.mode == "fsdp", is_on_meta(self.model)
        if not skeleton:  # a skeleton gets rank 0's weights by `materialize` below
            distributed.broadcast_module(self.model, self.dist)  # identical start on every rank
        self.reference = None
        self.ema_decay = ema_decay(config)  # ref_ema_decay, or the method's own when unset
        if needs_reference(config):
            # Under FSDP the reference starts as a meta skeleton and gets its weights and fp32 shadow from the
            # policy's local shards (shard_reference): no rank holds a second whole model. A reference that never
            # moves (decay 1.0, or plain GRPO's unset) keeps no fp32 shadow.
            policy = fsdp_init.meta_copy(self.model) if fsdp else self.model
            self.reference = EMAReference(
                policy,
                dtype=self._reference_dtype(),
                build_shadow=not fsdp,
                frozen=not ema_moves(self.ema_decay),
            )
        self.engine = distributed.wrap(self.model, config, self.dist)  # what the step's forward runs through
        if skeleton:  # FSDP start-up from files (rank 0 holds `source`)
            fsdp_init.materialize(self.model, source, self.dist)
            del source
        if self.reference is not None and fsdp:
            distributed.shard_reference(self.reference, self.model, config, self.dist)
        self.generation_config = sampling_config(
            config, self.tokenizer, suppress_tokens=unsampleable_ids(self.model, self.tokenizer)
        )
        self.loss_fn = ck.FusedLinearGRPOLoss(
            beta=config.beta,
            use_ref_model=config.beta > 0,
            epsilon_low=config.epsilon,
            epsilon_high=config.epsilon_high if config.epsilon_high is not None else config.epsilon,
            loss_type=config.loss_type,
            max_completion_length=config.max_completion_length,
            temperature=config.temperature,
            kl_clamp=config.kl_clamp,
        )
        self.optimizer = self._build_optimizer()
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=math.ceil(config.warmup_ratio * self.max_steps),
            num_training_steps=self.max_steps,
        )
        self.global_step = 0
        self.losses: list[float] = []
        self.last_checkpoint = None

    # --------------------------------------------------------------------------------------------------------
    # setup helpers

    def _prepare_output_dir(self) -> Path | None:
        """Before anything looks for checkpoints (rank 0 does it, the others take its verdict): put back a
        checkpoint that a crash left renamed aside, delete unfinished ones, find the checkpoint to resume from
        (returned, the same on every rank), and refuse to mix two runs in one directory (rotation and `latest` go
        by step number): a fresh run into an earlier run's checkpoints, or a resume from step N while checkpoints
        past N are there. overwrite_output_dir deletes those instead."""
        verdict, error = (None, None), None
        if self.dist.is_main:
            try:
                verdict = self._clean_output_dir()
            except Exception as e:  # noqa: BLE001 - the other ranks must hear of it, not wait for dist_timeout
                error = e
                verdict = (None, f"rank 0 could not prepare output_dir {self.output_dir}: {type(e).__name__}: {e}")
        resume_from, problem = distributed.broadcast_object(verdict, self.dist)
        if error is not None:
            raise error
        if problem:  # the user's to resolve (every rank says it in one line under grpo-care train)
            raise UsageError(problem, source=self.config.describe_source("output_dir"))
        return resume_from

    def _clean_output_dir(self) -> tuple[Path | None, str | None]:
        """(the checkpoint to resume from, what is wrong with output_dir or None)."""
        c = self.config
        for path in ckpt.restore_replaced(self.output_dir):
            warnings.warn(f"restored {path}: a crash interrupted its replacement", stacklevel=4)
        for path in ckpt.remove_unfinished(self.output_dir):
            warnings.warn(f"removed {path}: an unfinished checkpoint of an interrupted run", stacklevel=4)
        resume_from = ckpt.resolve_resume(c.resume_from_checkpoint, self.output_dir)
        start = -1 if resume_from is None else ckpt.step_of(resume_from)
        if start is None:  # a checkpoint directory under another name: its step is unknown, nothing to compare
            return resume_from, None
        later = [p for p in ckpt.list_checkpoints(self.output_dir) if ckpt.step_of(p) > start]
        if not later:
            return resume_from, None
        names = ", ".join(p.name for p in later)
        if c.overwrite_output_dir:
            for path in later:
                shutil.rmtree(path)
            if resume_from is None:
                shutil.rmtree(self.output_dir / "tensorboard", ignore_errors=True)
            warnings.warn(f"overwrite_output_dir: deleted {names} in {self.output_dir}", stacklevel=4)
            return resume_from, None
        what = "checkpoints of an earlier run" if resume_from is None else f"checkpoints past {resume_from.name}"
        advice = "pass --resume_from_checkpoint latest to continue it, " if resume_from is None else ""
        return resume_from, (
            f"output_dir {self.output_dir} holds {what} ({names}), which this run's would mix with: {advice}"
            "pass --overwrite_output_dir true to delete them, or choose another --output_dir"
        )

    def _reference_dtype(self) -> torch.dtype:
        if self.device.type == "cuda" and self.config.bf16:
            return torch.bfloat16
        return next(self.model.parameters()).dtype

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; biases and norm weights (the 1-D parameters) get no weight decay, as HF Trainer does."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        c = self.config
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=c.learning_rate,
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon,
            foreach=self.device.type == "cuda",
        )

    # --------------------------------------------------------------------------------------------------------
    # checkpoints

    def _trainer_state(self) -> dict:
        """Collective under torchrun (every rank calls it); rank 0's copy is the one written. With sharded
        checkpoints (FSDP2) the optimizer state and EMA shadow are left to sharded_state.save."""
        sharded = self.dist.mode == "fsdp" and self.config.fsdp_sharded_checkpoints
        if self.reference is None:
            ema = None
        elif sharded:
            ema = {"shadow": None, "num_updates": self.reference.num_updates}
        else:
            ema = distributed.ema_state(self.reference, self.dist)
        state = {
            "global_step": self.global_step,
            "optimizer": None if sharded else distributed.optimizer_state(self.model, self.optimizer, self.dist),
            "sharded_state": sharded_state.SHARDED_DIR if sharded else None,
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "data": self.stream.state_dict(),
            "losses": list(self.losses),
            "ema": ema,
            "config": self.config.to_dict(),
        }
        state.update(distributed.rank_states({"rng": state["rng"], "data": state["data"]}, self.dist))
        return state

    def save(self) -> Path:
        """checkpoint-<step>, atomically: everything goes into a temporary directory that rank 0 renames last."""
        state = self._trainer_state()
        weights = distributed.full_model_state(self.model, self.dist)
        main = self.dist.is_main
        tmp = ckpt.start_checkpoint(self.output_dir, self.global_step) if main else None
        tmp = distributed.broadcast_object(tmp, self.dist)
        if state["sharded_state"]:
            sharded_state.save(tmp / state["sharded_state"], self.model, self.optimizer, self.reference)
        path = None
        if main:
            ckpt.write_checkpoint(tmp, self.model, state, self.processor, state_dict=weights)
            path = ckpt.commit_checkpoint(tmp, self.config.save_total_limit)
        self.last_checkpoint = distributed.broadcast_object(path, self.dist)
        return self.last_checkpoint

    def resume(self, path: Path) -> None:
        """Continue from checkpoint `path`: its weights, optimizer, EMA, data position and RNG states, under this
        config's hyperparameters (a changed one is named in a warning; a changed seed is refused)."""
        state = ckpt.load_trainer_state(path)
        own = distributed.own_rank_state(state, self.dist, path)
        changes = self.config.resume_changes(state.get("config", {}), str(path))  # refuses another seed
        self.stream.load_state_dict(own["data"])  # refuses other samples, before the heavy loads below
        if changes and self.dist.is_main:
            warnings.warn(
                f"resuming {path} under a changed config ({'; '.join(changes)}): the new values apply from step "
                f"{int(state['global_step']) + 1} on",
                stacklevel=3,
            )
        if self.reference is not None and state["ema"] is None:
            raise ValueError(f"{path} has no reference state, but this run needs one (use_care or beta > 0)")
        if path != self._weights_from:  # else the FSDP start-up filled the model from this checkpoint already
            distributed.load_policy_weights(self.model, path, self.dist)
        if state.get("sharded_state"):
            sharded_state.load(path / state["sharded_state"], self.model, self.optimizer, self.reference)
            if self.reference is not None:
                self.reference.num_updates = int(state["ema"]["num_updates"])
        else:
            distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.dist)
            if self.reference is not None:
                distributed.load_ema_state(self.reference, state["ema"], self.dist)
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_optimizer_config()
        self.global_step = int(state["global_step"])
        self.losses = list(state.get("losses", []))
        ckpt.set_rng_state(own["rng"])

    def _apply_optimizer_config(self) -> None:
        """After loading a checkpoint's optimizer and scheduler states (which carry the old run's lr, betas,
        eps and weight decay): this config's values, and the learning rate its schedule gives the current step.
        With an unchanged config every value is the one saved, bit for bit."""
        c = self.config
        decay, no_decay = self.optimizer.param_groups  # as _build_optimizer made them
        for group in (decay, no_decay):
            group.update(betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon, initial_lr=c.learning_rate)
        decay["weight_decay"] = c.weight_decay
        scheduler = self.scheduler
        scheduler.base_lrs = [c.learning_rate] * len(self.optimizer.param_groups)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # every transformers schedule but plateau
            lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs

    # --------------------------------------------------------------------------------------------------------
    # the loop

    def train(self) -> dict:
        from tqdm.auto import tqdm

        c = self.config
        resume_from = self.resume_from
        if resume_from is not None:
            self.resume(resume_from)
            if resume_from.parent.resolve() == self.output_dir.resolve():
                self.last_checkpoint = resume_from  # a run resumed at its end saves nothing again
        else:
            torch.manual_seed(c.seed + self.dist.rank)  # ranks sample their rollouts independently
        main = self.dist.is_main
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            c.save_yaml(self.output_dir / "config.yaml")
        logger = (
            MetricsLogger(self.output_dir, c.report_to, start_step=self.global_step)
            if main
            else distributed.NullLogger(self.output_dir)
        )
        bar = tqdm(
            total=self.max_steps,
            initial=self.global_step,
            disable=c.disable_tqdm or not main,
            desc="grpo-care",
            dynamic_ncols=True,
        )
        metrics: dict = {}
        try:
            while self.global_step < self.max_steps:
                started = time.perf_counter()
                results = []
                for i in range(c.gradient_accumulation_steps):
                    with distributed.gradient_sync(self.engine, i == c.gradient_accumulation_steps - 1):
                        results.append(self._micro_step())
                lr = self.scheduler.get_last_lr()[0]
                grad_norm = self._optimizer_step()
                self.global_step += 1
                # whenever the decay is set, as the authors' trainer (with use_care false: Table 3's KL-EMA)
                ema_step = self.global_step % c.ref_ema_update_every == 0
                if ema_step and self.reference is not None and not self.reference.frozen:
                    self.reference.update(self.model, self.ema_decay)
                metrics = self._step_metrics(results, grad_norm, lr, time.perf_counter() - started)
                metrics = distributed.reduce_metrics(metrics, self.dist)
                self.losses.append(metrics["loss"])
                if self.global_step % c.logging_steps == 0 or self.global_step == self.max_steps:
                    logger.log(self.global_step, metrics)
                if (
                    main
                    and c.log_completions
                    and (self.global_step % c.log_completions_steps == 0 or self.global_step == 1)
                ):
                    self._log_completions(logger, bar, results)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", loss=f"{metrics['loss']:.4f}")
                if c.save_steps > 0 and self.global_step % c.save_steps == 0:
                    self.save()
            if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"-{self.global_step}"):
                self.save()
        finally:
            bar.close()
            logger.close()
        return {
            "global_step": self.global_step,
            "metrics": metrics,
            "losses": list(self.losses),
            "output_dir": str(self.output_dir),
            "metrics_file": str(logger.metrics_path),
            "completions_file": str(logger.completions_path),
            "checkpoint": str(self.last_checkpoint),
            "skipped_samples": self.stream.skipped,
        }

    def _optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.config.max_grad_norm and self.config.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        else:
            grads = [p.grad.detach() for p in params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(distributed.full_tensor(grad_norm))

    # --------------------------------------------------------------------------------------------------------
    # one micro-batch

    def _micro_step(self) -> MicroBatchResult:
        c, G = self.config, self.config.num_generations
        items: list[PromptItem] = self.stream.next_batch()
        samples = [it.sample for it in items]
        prompts = encode_prompts(
            [build_messages(s, self.multimodal) for s in samples],
            [im for it in items for im in it.images],
            [v for it in items for v in it.videos],
            self.processor,
            multimodal=self.multimodal,
            max_prompt_length=c.max_prompt_length,
        )
        prompts = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in prompts.items()}
        distributed.gather_root(self.model)
        with autocast(self.device, c.bf16):
            rollout = generate_rollouts(self.model, prompts, self.generation_config, G)
        ids, mask = rollout.completion_ids, rollout.completion_mask
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        group_samples = [s for s in samples for _ in range(G)]
        columns = {key: [s.columns()[key] for s in group_samples] for key in samples[0].columns()}
        columns["prompts"] = [s.text for s in group_samples]
        columns["completion_ids"] = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
        scores = score_completions(self.reward_funcs, texts, columns)
        rewards = torch.tensor(
            [[math.nan if v is None else v for v in row] for row in scores], dtype=torch.float32
        ).T.contiguous()  # [N, F]

        inputs = rollout.model_inputs()
        prompt_len, length = rollout.prompt_ids.shape[1], ids.shape[1]
        positions = slice(prompt_len - 1, prompt_len - 1 + length)  # predict completion tokens
        ref_hidden = None
        if self.reference is not None:
            ref = self.reference.module
            with torch.no_grad(), autocast(self.device, c.bf16):
                ref_hidden = distributed.forward(ref, lambda: backbone_hidden(ref, inputs)[:, positions])

        def policy_pass():  # run as the engine's forward: under FSDP the LM head weight is gathered here
            with autocast(self.device, c.bf16):
                hidden = backbone_hidden(self.model, inputs)[:, positions]
            weight, bias = lm_head_params(self.model)
            hidden, weight, bias = self._head_dtype(hidden, weight, bias)
            # CARE needs the reference's log-probs before the loss (its bonus sets the advantages): one pass of
            # their own. Plain GRPO's KL needs them only inside the loss: the loss head scores the reference with
            # the policy's own code, so a reference equal to the policy gives a KL gradient of exactly 0 (two
            # kernels would differ by rounding, which AdamW scales up to full steps when advantages are 0).
            ref_logp, ref_in_head = None, ref_hidden is not None and not c.use_care and c.beta > 0
            if ref_hidden is not None and not ref_in_head:
                ref_logp = self._score_reference(ref_hidden, ids.masked_fill(mask == 0, IGNORE_INDEX))
            ref_head = {}
            if ref_in_head:
                ref_weight, ref_bias = self._reference_head()
                ref_head = dict(ref_input=ref_hidden.to(hidden.dtype), ref_weight=ref_weight.to(weight.dtype),
                                ref_bias=None if ref_bias is None else ref_bias.to(weight.dtype))

            n = ids.shape[0]
            bonus, likelihood = None, torch.full((n,), math.nan)
            span = torch.zeros_like(mask, dtype=torch.bool)
            if c.use_care:
                care = consistency_bonus(rewards[:, 0], ref_logp, ids, mask, self.tokenizer, G, c)
                bonus, likelihood, span = care.bonus, care.likelihood, care.answer_mask
            total = total_rewards(rewards, self.reward_weights, bonus).to(self.device)
            advantages = ck.group_advantages(total, G, scale=c.scale_rewards, eps=1e-4)

            loss, loss_metrics, policy = self.loss_fn(
                hidden,
                weight,
                ids,
                mask,
                advantages,
                bias=bias,
                ref_per_token_logps=ref_logp if c.beta > 0 else None,
                return_token_stats=True,
                return_entropy=True,
                **ref_head,
            )
            if ref_in_head:
                ref_logp = policy.ref_logprobs
            return loss, (policy, ref_logp, bonus, likelihood, span, total, advantages, loss_metrics)

        loss, extras = distributed.forward(self.engine, policy_pass)
        policy, ref_logp, bonus, likelihood, span, total, advantages, loss_metrics = extras
        loss_value = self._checked_loss(loss, ref_logp, mask)
        (loss / c.gradient_accumulation_steps).backward()
        if self.reference is not None:
            distributed.reshard(self.reference.module)
        n = ids.shape[0]

        return MicroBatchResult(
            rewards_per_func=rewards,
            bonus=(bonus if bonus is not None else torch.zeros(n)).cpu(),
            total=total.cpu(),
            advantages=advantages.cpu(),
            likelihood=likelihood.detach().float().cpu(),
            span_found=span.any(dim=1).cpu(),
            lengths=mask.sum(dim=1).cpu(),
            truncated=(~rollout.finished).cpu(),
            loss=loss_value,
            clip_ratio=float(loss_metrics[-1]),
            kl=k3_kl(policy.logprobs, ref_logp, mask, c.kl_clamp) if ref_logp is not None else math.nan,
            entropy=masked_mean(policy.entropy, mask),
            texts=texts,
            samples=group_samples,
        )

    def _head_dtype(self, hidden, weight, bias):
        """Under bf16 autocast the head runs in bf16 (differentiable casts), else in the weight's dtype."""
        dtype = torch.bfloat16 if (self.device.type == "cuda" and self.config.bf16) else weight.dtype
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)

    def _checked_loss(self, loss, ref_logp, mask) -> float:
        """The micro-batch's loss as a float: the step's one host sync, which also brings back whether the loss or
        the reference's log-probs are non-finite. Those flags are agreed over the ranks first, so every rank
        raises the same error before backward (none is left waiting in a collective). A non-finite reference
        would otherwise pass silently at beta = 0: `care_bonus` gives a NaN likelihood no bonus."""
        zero = torch.zeros((), device=loss.device)
        # masked by `&`, not by indexing: a boolean index is a nonzero(), which would be a second host sync
        bad_ref = (~torch.isfinite(ref_logp) & mask.bool()).any().float() if ref_logp is not None else zero
        flags = distributed.max_over_ranks(torch.stack([(~torch.isfinite(loss.detach())).float(), bad_ref]), self.dist)
        value, bad_loss, bad_ref = torch.cat([loss.detach().float().reshape(1), flags.to(loss.device)]).tolist()
        where = f"step {self.global_step + 1}" + (f", rank {self.dist.rank}" if self.dist.enabled else "")
        if bad_ref:
            raise FloatingPointError(
                f"{where}: the reference's log-probs are non-finite (on this or another rank): its weights or "
                "hidden states hold NaN or inf (a corrupt reference checkpoint, or an overflow under bf16: "
                "try bf16: false)"
            )
        if bad_loss:
            raise FloatingPointError(
                f"{where}: the loss is non-finite (on this or another rank): the policy's hidden states or LM head "
                "hold NaN or inf (try a lower learning_rate, max_grad_norm, or bf16: false)"
            )
        return value

    def _reference_head(self):
        """The reference's LM-head weight [V, H] and bias [V] (or None), whole (gathered when sharded)."""
        return tuple(map(distributed.full_tensor, lm_head_params(self.reference.module)))

    @torch.no_grad()
    def _score_reference(self, ref_hidden, targets):
        """The reference's per-token log-probs [N, L] (0 at ignored targets), one care_kernels pass (2NHV).

        At temperature 1 for CARE (the authors' likelihood uses raw logits), else at the sampling temperature
        (the KL of plain GRPO). No host sync: `check_finite=False` (the targets are the policy's own samples, in
        range by construction and still range-checked without a sync); `_checked_loss` checks the result for
        non-finite values within the step's one read of the loss.
        """
        c = self.config
        ref_weight, ref_bias = self._reference_head()
        return ck.linear_logprobs(
            ref_hidden.to(ref_weight.dtype),
            ref_weight,
            targets,
            ref_bias,
            temperature=1.0 if c.use_care else c.temperature,
            check_finite=False,
        )

    # --------------------------------------------------------------------------------------------------------
    # metrics

    def _step_metrics(
        self, results: list[MicroBatchResult], grad_norm: float, lr: float, seconds: float
    ) -> dict:
        metrics = step_metrics(results, self.config.num_generations, self.reward_names, self.config.use_care)
        metrics.update(
            {
                "grad_norm": grad_norm,
                "learning_rate": lr,
                "epoch": self.stream.epoch_progress(),
                "data/skipped_samples": self.stream.skipped,
                "step_time": seconds,
            }
        )
        return metrics

    def _log_completions(self, logger: MetricsLogger, bar, results: list[MicroBatchResult]) -> None:
        records = completion_records(results, self.reward_names, self.config.use_care)
        logger.log_completions(self.global_step, records)
        for record in records[: self.config.num_completions_to_print]:
            snippet = record["completion"].replace("\n", " ")[:300]
            line = f"[step {self.global_step}] reward={record['reward']} gold={record['solution']}: {snippet}"
            bar.write(line, file=sys.stderr)  # stdout stays for the run's summary
