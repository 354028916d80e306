"""TRL adapters: care_kernels log-probs inside TRL's trainers, and GRPO-CARE for users who live in TRL.

    from care_kernels.integrations.trl import patch_trl, use_care_kernels, CareGRPOTrainer, CareConfig

    patch_trl()                   # TRL's fused-LM-head forwards now run care_kernels.linear_logprobs
    with use_care_kernels(): ...  # the same, undone on exit
    trainer = CareGRPOTrainer(model=..., reward_funcs=[accuracy, fmt], args=GRPOConfig(beta=0.0, ...),
                              train_dataset=..., care_config=CareConfig(consistency_margin=0.01))
    # image prompts: a vision-language model (e.g. Qwen2.5-VL), its processor, `image` / `images` columns
    trainer = CareGRPOTrainer(model=vlm, processing_class=processor, train_dataset=image_set, ...)

The hook. TRL 1.16's GRPOTrainer never builds logits: `add_fused_lm_head` replaces the model's forward,
and `model(..., labels=labels, fused_lm_head=True)` runs the backbone and then calls
`trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
final_logit_softcapping, logit_scale, outputs)
-> (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`, looked up as a module global at every
call. `patch_trl()` swaps that one global for a `CareLogProbFunction` with the same `apply`, so the
policy, reference-model and old-policy passes of GRPOTrainer (and of the other trainers built on
`add_fused_lm_head`: RLOO, DPO, KTO, SFT) go through care_kernels, while TRL's masking, slicing, losses
and metrics stay untouched; restoring the global undoes it. What care_kernels does not compute
(final-logit soft-capping, a non-positive logit scale, the extra outputs `log_sum_sq_probs`,
`mean_logits`, `is_top1`, DeepSpeed ZeRO-3 partitioned heads) is handed to TRL's own function unchanged.

TRL is imported lazily: importing this module needs no TRL; using it without TRL raises an ImportError
that says `pip install care-kernels[trl]`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import math
import sys
import types
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from care_kernels.answer_spans import answer_positions, check_answer_span
from care_kernels.backends import IMPLS
from care_kernels.group import answer_likelihood, care_bonus
from care_kernels.integrations._hf import backbone_and_head
from care_kernels.logprobs import linear_logprobs

__all__ = [
    "CareLogProbFunction",
    "patch_trl",
    "unpatch_trl",
    "is_patched",
    "use_care_kernels",
    "CareConfig",
    "EmaReference",
    "add_care_bonus",
    "answer_span_mask",
    "CareGRPOTrainer",  # noqa: F822 (built on first access, see __getattr__)
    "EmaReferenceCallback",  # noqa: F822
]

Tensor = torch.Tensor

INSTALL_HINT = "pip install care-kernels[trl]"
# TRL 1.16's ChunkedLogProbFunction.forward arguments after ctx: what CareLogProbFunction.apply mirrors.
TRL_APPLY_ARGS = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                  "final_logit_softcapping", "logit_scale", "outputs")
CARE_OUTPUTS = frozenset({"log_probs", "entropy"})
_TRL_EXTRA_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _require_trl():
    """(trl.trainer.utils, TRL's own ChunkedLogProbFunction), or an ImportError naming the extra."""
    try:
        import trl.trainer.utils as trl_utils
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except ImportError as err:
        raise ImportError(
            f"care_kernels.integrations.trl needs TRL >= 1.16 ({err}); install it with `{INSTALL_HINT}`"
        ) from err
    return trl_utils, ChunkedLogProbFunction


def _check_trl_hook(trl_utils, trl_function) -> None:
    import trl

    params = tuple(inspect.signature(trl_function.forward).parameters)[1:]
    has_global = hasattr(trl_utils, "_ChunkedLogProbFunction")
    if params != TRL_APPLY_ARGS or not has_global:
        raise RuntimeError(
            "care_kernels' TRL adapter hooks "
            f"`trl.trainer.utils._ChunkedLogProbFunction.apply{TRL_APPLY_ARGS}` (TRL 1.16); trl "
            f"{trl.__version__} has ChunkedLogProbFunction.forward{params} and "
            f"{'a' if has_global else 'no'} trl.trainer.utils._ChunkedLogProbFunction. "
            "Pin trl==1.16.* or update care_kernels"
        )


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


class CareLogProbFunction:
    """Drop-in for TRL 1.16's `ChunkedLogProbFunction`: the same `apply`, computed by care_kernels.

    `apply(hidden [N, H], weight [V, H], bias [V] | None, targets [N], temperature, chunk_size,
    final_logit_softcapping=None, logit_scale=1.0, outputs=...)
    -> (log_probs [N] fp32, entropy [N] fp32 | None, None, None, None)`, differentiable w.r.t. hidden, weight
    and bias through both outputs. Equivalent to
    `z = (hidden @ weight.T + bias) * logit_scale / temperature` (the scale is folded into the temperature);
    `(z.log_softmax(-1).gather(-1, targets[:, None])[:, 0], entropy(z))`, the matmul in the autocast dtype
    when autocast is on (as TRL does), accumulated in float32. `chunk_size` is ignored: care_kernels tiles the
    vocabulary itself. Calls it does not cover go unchanged to `fallback` (TRL's own function): soft-capping,
    a logit scale that is not a positive finite number, outputs beyond log_probs/entropy, ZeRO-3 heads.

    `check_finite=False` by default: TRL's targets are in range by construction (masked or clamped labels),
    and the check would cost a host sync per forward; non-finite hidden states then give NaN, as in TRL.
    """

    def __init__(self, impl: str = "auto", *, check_finite: bool = False, fallback=None):
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
        self.check_finite = check_finite
        self.fallback = fallback

    def handles(self, final_logit_softcapping, logit_scale, outputs) -> bool:
        scale_ok = isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0
        return (final_logit_softcapping is None and scale_ok and set(outputs) <= CARE_OUTPUTS
                and not _zero3_enabled())

    def apply(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
              temperature: float, chunk_size: int, final_logit_softcapping: Optional[float] = None,
              logit_scale: float = 1.0, outputs: Sequence[str] = _TRL_EXTRA_OUTPUTS):
        outputs = tuple(outputs)
        if not self.handles(final_logit_softcapping, logit_scale, outputs):
            fallback = self.fallback if self.fallback is not None else _require_trl()[1]
            return fallback.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                  final_logit_softcapping, logit_scale, outputs)
        device_type = hidden.device.type
        autocast_on = torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast_on else hidden.dtype
        cast = lambda x: None if x is None else x.to(compute_dtype)
        with_entropy = "entropy" in outputs
        with torch.autocast(device_type, enabled=False):
            result = linear_logprobs(
                cast(hidden), cast(weight), targets, cast(bias), temperature=temperature / logit_scale,
                return_entropy=with_entropy, impl=self.impl, check_finite=self.check_finite,
            )
        log_probs, entropy = result if with_entropy else (result, None)
        return log_probs, entropy, None, None, None

    def __repr__(self) -> str:
        return f"CareLogProbFunction(impl={self.impl!r}, check_finite={self.check_finite})"


def patch_trl(impl: str = "auto", *, check_finite: bool = False) -> CareLogProbFunction:
    """Route TRL's fused LM head (`add_fused_lm_head`, used by GRPOTrainer) through care_kernels; reversible.

    Replaces the module global `trl.trainer.utils._ChunkedLogProbFunction`, which TRL's patched forward looks
    up at each call, so it also applies to trainers and models built before the call. Returns the installed
    `CareLogProbFunction`. Undo with `unpatch_trl()`, or use the `use_care_kernels()` context manager.
    """
    trl_utils, trl_function = _require_trl()
    _check_trl_hook(trl_utils, trl_function)
    function = CareLogProbFunction(impl, check_finite=check_finite, fallback=trl_function)
    trl_utils._ChunkedLogProbFunction = function
    return function


def unpatch_trl() -> None:
    """Restore TRL's own ChunkedLogProbFunction."""
    trl_utils, trl_function = _require_trl()
    trl_utils._ChunkedLogProbFunction = trl_function


def is_patched() -> bool:
    trl_utils, _ = _require_trl()
    return isinstance(getattr(trl_utils, "_ChunkedLogProbFunction", None), CareLogProbFunction)


@contextlib.contextmanager
def use_care_kernels(impl: str = "auto", *, check_finite: bool = False):
    """`with use_care_kernels(): trainer.train()`: `patch_trl()` inside; what was there is restored after."""
    trl_utils, trl_function = _require_trl()
    _check_trl_hook(trl_utils, trl_function)
    previous = trl_utils._ChunkedLogProbFunction
    function = patch_trl(impl, check_finite=check_finite)
    try:
        yield function
    finally:
        trl_utils._ChunkedLogProbFunction = previous


# -------------------------------------------------------------------------------------------------------
# GRPO-CARE on top of TRL's GRPOTrainer


@dataclasses.dataclass
class CareConfig:
    """GRPO-CARE knobs (grpo_care.md sections 5 and 7; names as in grpo_care's config).

    `answer_span`: which tokens of a completion the reference's likelihood averages over, as in grpo_care
    (care_kernels.answer_spans): `content` (default), the tokens of the stripped text between the first
    `answer_open_tag` and the next `answer_close_tag`, i.e. what an accuracy reward grades; `official`, the
    authors' span (from the `>` of the last `<answer>` tag to 3 tokens before EOS; `<answer>` tags only).
    `ref_ema_decay=1.0` keeps a frozen reference: a copy of the policy in its own dtype, no fp32 copy, no update.
    """

    bonus_coefficient: float = 0.5
    confidence_upper_bound: float = 0.95
    accuracy_floor: float = 0.1
    consistency_margin: float = 0.0
    ref_ema_decay: float = 0.995
    ref_ema_update_every: int = 10
    accuracy_reward_index: int = 0
    answer_span: str = "content"
    answer_open_tag: str = "<answer>"
    answer_close_tag: str = "</answer>"
    impl: str = "auto"

    def __post_init__(self):
        if not 0.0 <= self.ref_ema_decay <= 1.0:  # also refuses NaN
            raise ValueError(f"ref_ema_decay must be in [0, 1], got {self.ref_ema_decay}")
        if isinstance(self.ref_ema_update_every, bool) or not isinstance(self.ref_ema_update_every, int) \
                or self.ref_ema_update_every < 1:
            raise ValueError(
                f"ref_ema_update_every must be a positive int, got {self.ref_ema_update_every!r}")
        if isinstance(self.accuracy_reward_index, bool) or not isinstance(self.accuracy_reward_index, int) \
                or self.accuracy_reward_index < 0:
            raise ValueError(f"accuracy_reward_index must be an int >= 0, got {self.accuracy_reward_index!r}")
        check_answer_span(self.answer_span, self.answer_open_tag, self.answer_close_tag)
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")


class EmaReference:
    """GRPO-CARE's slowly-evolving reference: an fp32 copy of the policy, `phi <- d*phi + (1-d)*theta`.

    fp32 so that the 0.005 * (theta - phi) steps are not rounded away, as they would be in a bf16 copy
    (grpo_care.md section 7). `maybe_update(model, global_step)` updates when
    `global_step % update_every == 0`; call it after the optimizer step (EmaReferenceCallback does, from
    `on_step_end`). `decay=1.0` is a frozen reference (`frozen`): the copy keeps the policy's dtype (an fp32
    copy would never be read at more than that precision) and is never updated.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.995, update_every: int = 10):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {update_every!r}")
        shadow = copy.deepcopy(model)
        # TRL's add_fused_lm_head stores a forward on the instance that closes over the original model.
        shadow.__dict__.pop("forward", None)
        self.frozen = decay == 1.0
        if not self.frozen:
            shadow.float()
        self.module = shadow.eval().requires_grad_(False)
        self.decay = float(decay)
        self.update_every = update_every
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        if self.frozen:
            raise RuntimeError("this reference is frozen (decay 1.0): it keeps no EMA to update")
        live = dict(model.named_parameters())
        for name, shadow in self.module.named_parameters():
            if name not in live:
                raise ValueError(
                    f"the policy has no parameter {name!r}: pass the model the reference was copied from")
            shadow.lerp_(live[name].detach().to(device=shadow.device, dtype=torch.float32), 1.0 - self.decay)
        self.num_updates += 1

    def maybe_update(self, model: torch.nn.Module, global_step: int) -> bool:
        if self.frozen or global_step <= 0 or global_step % self.update_every != 0:
            return False
        self.update(model)
        return True


def add_care_bonus(
    rewards_per_func: Tensor,
    likelihood: Tensor,
    group_size: int,
    config: Optional[CareConfig] = None,
) -> tuple[Tensor, Tensor]:
    """Add the CARE consistency bonus to the accuracy column of TRL's `rewards_per_func` [B*G, n_funcs].

    `likelihood` [B*G]: the reference's answer likelihood per completion. Returns
    `(new_rewards_per_func, bonus)` with
    `new[:, i] = rewards_per_func[:, i] + care_bonus(accuracy, likelihood, group_size, ...)` for
    `i = config.accuracy_reward_index`; the other columns are unchanged. The accuracy reaches `care_bonus`
    unconverted: a missing accuracy (NaN, TRL's marker for a reward function that returned None) or an infinite
    one is left out of its group's mean accuracy and earns no bonus; it stays as it was in the output.
    The bonus goes through TRL's reward weights like the accuracy it is added to (1.0 unless you set them).
    """
    config = config or CareConfig()
    index = config.accuracy_reward_index
    if rewards_per_func.dim() != 2 or index >= rewards_per_func.shape[1]:
        raise ValueError(
            f"rewards_per_func must be [B*G, n_funcs] with more than accuracy_reward_index={index} columns, "
            f"got shape {tuple(rewards_per_func.shape)}"
        )
    accuracy = rewards_per_func[:, index]
    bonus = care_bonus(
        accuracy, likelihood.to(accuracy.device), group_size, coef=config.bonus_coefficient,
        likelihood_cap=config.confidence_upper_bound, accuracy_floor=config.accuracy_floor,
        margin=config.consistency_margin,
    )
    rewards = rewards_per_func.clone()
    rewards[:, index] = accuracy + bonus.to(accuracy.dtype)
    return rewards, bonus


def answer_span_mask(
    completion_ids: Sequence[Sequence[int]],
    tokenizer,
    open_tag: str = "<answer>",
    close_tag: str = "</answer>",
    *,
    mode: str = "content",
) -> list[list[bool]]:
    """Per completion (a list of ids, as TRL's `completion_ids_list`: no padding, EOS last when generated),
    which tokens hold the answer: `care_kernels.answer_spans.answer_positions`, the rule grpo_care's trainer
    uses. `content`: the tokens overlapping the stripped text between the first `open_tag` and the next
    `close_tag` (with Qwen2's BPE, `<answer>A</answer>` gives `>A` and `<answer> C </answer>` gives ` C`);
    no closed tag, or an empty answer, gives an all-False mask. `official`: the authors' span
    (`<answer> C </answer>` gives `>`, ` C`).
    """
    masks = []
    for ids in completion_ids:
        picked = set(answer_positions(ids, tokenizer, mode, open_tag, close_tag))
        masks.append([j in picked for j in range(len(ids))])
    return masks


# TRL 1.16's `GRPOTrainer._generate_and_score_completions` builds, before it calls `_calculate_rewards`, the
# tensors it scores the policy and its own reference model with (prompt + completion ids, attention mask, the
# processor's pixel_values / image_grid_thw / mm_token_type_ids / ..., images per row). They live only in its
# locals; CareGRPOTrainer reads them from that frame so that the EMA reference is scored on exactly those
# tensors, for every model TRL supports, without rebuilding them (which would copy TRL's model-specific code).
TRL_SCORING_LOCALS = ("prompt_completion_ids", "attention_mask", "logits_to_keep", "batch_size", "forward_kwargs",
                      "num_images", "num_tiles", "tool_mask")
TRL_OPTIONAL_LOCALS = frozenset({"num_images", "num_tiles", "tool_mask"})  # None: no images, no tiles, no tools
VIDEO_KEYS = ("video", "videos")
VIDEO_ERROR = ("CareGRPOTrainer got video ({where}), but TRL's GRPOTrainer has no video path (it would train on "
               "the text alone); train video with grpo_care's own trainer (`grpo-care train`, "
               "python/grpo_care/README.md). CareGRPOTrainer takes text and image prompts")


def _generate_and_score_code(grpo_trainer_class):
    return inspect.unwrap(grpo_trainer_class._generate_and_score_completions).__code__


def _check_scoring_locals(grpo_trainer_class) -> None:
    import trl

    missing = [name for name in TRL_SCORING_LOCALS
               if name not in _generate_and_score_code(grpo_trainer_class).co_varnames]
    if missing:
        raise RuntimeError(
            f"CareGRPOTrainer scores its EMA reference with the inputs TRL 1.16's "
            f"GRPOTrainer._generate_and_score_completions builds ({', '.join(TRL_SCORING_LOCALS)}); trl "
            f"{trl.__version__} has no {', '.join(missing)} there. Pin trl==1.16.* or update care_kernels"
        )


def _trl_scoring_inputs(code) -> dict:
    """The TRL_SCORING_LOCALS of the running `_generate_and_score_completions` (a caller of the caller)."""
    frame = sys._getframe(1)
    try:
        while frame is not None and frame.f_code is not code:
            frame = frame.f_back
        if frame is None:
            raise RuntimeError(
                "CareGRPOTrainer._calculate_rewards must run inside GRPOTrainer._generate_and_score_completions "
                "(it scores the EMA reference with the inputs built there); call that, or "
                "reference_answer_likelihood() directly")
        scope = frame.f_locals
        found = {name: scope.get(name) for name in TRL_SCORING_LOCALS}
    finally:
        del frame
    unset = [name for name, value in found.items() if value is None and name not in TRL_OPTIONAL_LOCALS]
    if unset:
        import trl

        raise RuntimeError(
            f"CareGRPOTrainer scores its EMA reference with the inputs TRL 1.16's "
            f"GRPOTrainer._generate_and_score_completions has built when it calls _calculate_rewards; in trl "
            f"{trl.__version__} {', '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set by then. "
            "Pin trl==1.16.* or update care_kernels"
        )
    return found


def _refuse_video(inputs: Sequence[dict]) -> None:
    for example in inputs:
        for key in VIDEO_KEYS:
            if example.get(key) is not None:
                raise NotImplementedError(VIDEO_ERROR.format(where=f"a {key!r} column"))
        prompt = example.get("prompt")
        if isinstance(prompt, list):
            for message in prompt:
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, list) and any(
                        isinstance(part, dict) and part.get("type") == "video" for part in content):
                    raise NotImplementedError(VIDEO_ERROR.format(where="a message part of type 'video'"))


class ReferenceScorer:
    """A model behind TRL's fused-LM-head call that scores with care_kernels and never builds logits.

    `scorer(input_ids=[B, T], attention_mask=[B, T], labels=[B, T], fused_lm_head=True, **multimodal)` returns
    an object whose `log_probs` [B, T - 1] float32 holds `log p(labels[:, t + 1] | ...)` where that label is
    not -100, else 0: what `model(..., labels=labels, fused_lm_head=True).log_probs` returns for a model
    patched by TRL's `add_fused_lm_head`, so TRL's `_get_per_token_logps_and_entropies` can slice the
    multimodal inputs per micro-batch for it. Equivalent to
    `(backbone(...).last_hidden_state[:, :-1] @ head.weight.T + head.bias).log_softmax(-1).gather(-1, labels[:, 1:])`
    at the labelled positions only, computed by `care_kernels.linear_logprobs` (vocabulary streamed), in the
    model's own dtype with autocast off (the EMA reference is fp32: its likelihood is not rounded to bf16).
    """

    def __init__(self, model: torch.nn.Module, impl: str = "auto"):
        self.model = model
        self.impl = impl

    def __call__(self, *, labels: Tensor, fused_lm_head: bool = True, **inputs):
        if not fused_lm_head:
            raise ValueError("ReferenceScorer only scores (fused_lm_head=True)")
        backbone, head = backbone_and_head(self.model)
        with torch.autocast(labels.device.type, enabled=False):
            hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1]
            targets = labels[:, 1:].to(hidden.device)
            scored = targets != -100
            logps = linear_logprobs(hidden[scored], head.weight, targets[scored], head.bias, impl=self.impl)
        return types.SimpleNamespace(log_probs=logps.new_zeros(scored.shape).masked_scatter(scored, logps),
                                     entropy=None, aux_loss=None)


def _build_trainer_classes() -> dict:
    _require_trl()
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    _check_scoring_locals(GRPOTrainer)
    scoring_code = _generate_and_score_code(GRPOTrainer)

    class EmaReferenceCallback(TrainerCallback):
        """Updates `trainer.care_reference` every `ref_ema_update_every` optimizer steps, after the step."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            trainer = self.trainer
            model = trainer.accelerator.unwrap_model(trainer.model)
            trainer.care_reference.maybe_update(model, state.global_step)

    class CareGRPOTrainer(GRPOTrainer):
        """TRL's GRPOTrainer plus GRPO-CARE's consistency bonus, scored by an fp32 EMA reference.

        Text prompts with a tokenizer, or image prompts (`image` / `images` columns, conversational prompts)
        with a vision-language model and its processor (Qwen2.5-VL, ... any model TRL's GRPOTrainer trains).
        Extra arguments: `care_config` (CareConfig) and
        `answer_mask_fn(completion_ids_list) -> list[list[bool]]` (default: `answer_span_mask` with the
        config's `answer_span` and tags). After TRL scores the completions with the reward functions, the reference
        (`self.care_reference.module`) scores each prompt + completion by teacher forcing on the very inputs TRL
        built for the policy (ids, masks, pixel_values, image_grid_thw, ...), through TRL's own per-micro-batch
        slicing (`_get_per_token_logps_and_entropies`, as TRL scores its reference model) with a
        `ReferenceScorer`: `care_kernels.linear_logprobs` on its last hidden states, temperature 1, no
        `[B, T, V]` logits. `answer_likelihood` turns the answer tokens' log-probs into a likelihood and
        `care_bonus` is added to the accuracy reward (`care_config.accuracy_reward_index`) before TRL computes
        the advantages. The reference starts as a copy of the policy and follows it by EMA every
        `ref_ema_update_every` optimizer steps (fp32); with `ref_ema_decay=1.0` it stays that copy, in the
        policy's dtype.

        GRPO-CARE trains with beta=0; with beta > 0, TRL's own (frozen) ref_model serves the KL term. Video is
        refused (TRL's GRPOTrainer has no video path: use grpo_care's trainer); PEFT and DeepSpeed ZeRO-3 are
        not supported. For care_kernels in the policy's own log-probs too, call `patch_trl()`.
        """

        def __init__(self, *args, care_config: Optional[CareConfig] = None,
                     answer_mask_fn: Optional[Callable[[list], list]] = None, **kwargs):
            for name in ("train_dataset", "eval_dataset"):
                columns = getattr(kwargs.get(name), "column_names", None) or []
                found = [c for c in VIDEO_KEYS if c in columns]
                if found:
                    raise NotImplementedError(VIDEO_ERROR.format(where=f"{name} column {found[0]!r}"))
            super().__init__(*args, **kwargs)
            self.care_config = care_config or CareConfig()
            if self.care_config.accuracy_reward_index >= len(self.reward_funcs):
                raise ValueError(
                    f"care_config.accuracy_reward_index={self.care_config.accuracy_reward_index} but there "
                    f"are only {len(self.reward_funcs)} reward functions; point it at the accuracy reward"
                )
            model = self.accelerator.unwrap_model(self.model)
            if hasattr(model, "peft_config"):
                raise NotImplementedError("CareGRPOTrainer does not support PEFT models (the EMA reference "
                                          "is a full copy of the policy); train the full model")
            self.care_reference = EmaReference(model, self.care_config.ref_ema_decay,
                                               self.care_config.ref_ema_update_every)
            backbone_and_head(self.care_reference.module)  # fails here, not at the first step
            self.answer_mask_fn = answer_mask_fn or functools.partial(
                answer_span_mask, tokenizer=self._tokenizer, open_tag=self.care_config.answer_open_tag,
                close_tag=self.care_config.answer_close_tag, mode=self.care_config.answer_span,
            )
            self.add_callback(EmaReferenceCallback(self))

        def _generate_and_score_completions(self, inputs):
            _refuse_video(inputs)
            return super()._generate_and_score_completions(inputs)

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            scoring = _trl_scoring_inputs(scoring_code)
            mode = "train" if self.model.training else "eval"
            group_size = self.num_generations if mode == "train" else self.num_generations_eval
            answer_mask = self._answer_mask(completion_ids_list, scoring)
            likelihood = self.reference_answer_likelihood(
                scoring["prompt_completion_ids"], scoring["attention_mask"], scoring["logits_to_keep"],
                answer_mask, batch_size=scoring["batch_size"], num_images=scoring["num_images"],
                num_tiles=scoring["num_tiles"], **scoring["forward_kwargs"],
            )
            likelihood = self.accelerator.gather(likelihood)
            rewards_per_func, bonus = add_care_bonus(rewards_per_func, likelihood, group_size,
                                                     self.care_config)
            self._metrics[mode]["care/bonus"].append(bonus.mean().item())
            self._metrics[mode]["care/answer_likelihood"].append(likelihood.mean().item())
            return rewards_per_func

        def _answer_mask(self, completion_ids_list, scoring) -> Tensor:
            """bool [B, logits_to_keep]: `answer_mask_fn`'s tokens among those TRL scores (attention mask 1;
            generated by the model, not a tool, when TRL keeps a tool mask)."""
            rows = self.answer_mask_fn(completion_ids_list)
            if len(rows) != len(completion_ids_list) or any(
                    len(m) != len(c) for m, c in zip(rows, completion_ids_list)):
                raise ValueError(
                    "answer_mask_fn must return one bool per completion token, for every completion")
            width = scoring["logits_to_keep"]
            attention = scoring["attention_mask"]
            mask = torch.zeros(len(rows), width, dtype=torch.bool, device=attention.device)
            for i, row in enumerate(rows):
                mask[i, : len(row)] = torch.tensor([bool(x) for x in row], dtype=torch.bool)
            mask &= attention[:, -width:].bool()
            if scoring["tool_mask"] is not None:
                mask &= scoring["tool_mask"].bool()
            return mask

        @torch.no_grad()
        def reference_answer_likelihood(self, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int,
                                        answer_mask: Tensor, *, batch_size: Optional[int] = None,
                                        num_images: Optional[list] = None, num_tiles: Optional[list] = None,
                                        **multimodal) -> Tensor:
            """float32 [B]: exp(mean log-prob of the answer tokens) under the EMA reference (1.0 when a row
            has no answer token).

            input_ids, attention_mask [B, P + C]: prompts left-padded then completions right-padded, as TRL
            lays out the policy's input; logits_to_keep = C; answer_mask [B, C] bool; `multimodal`: the
            processor's tensors for the prompts (pixel_values, image_grid_thw, mm_token_type_ids [B, P + C],
            ...) with `num_images` per row, as TRL passes them to `_get_per_token_logps_and_entropies`.
            Scored `batch_size` rows at a time (default: all), each through a `ReferenceScorer`.
            """
            device = self.accelerator.device
            reference = self.care_reference.module
            if next(reference.parameters()).device != device:
                reference.to(device)
            logps, _, _ = self._get_per_token_logps_and_entropies(
                ReferenceScorer(reference, self.care_config.impl), input_ids, attention_mask, logits_to_keep,
                batch_size=batch_size, num_images=num_images, num_tiles=num_tiles, **multimodal,
            )
            return answer_likelihood(logps, answer_mask.to(logps.device))

    return {"CareGRPOTrainer": CareGRPOTrainer, "EmaReferenceCallback": EmaReferenceCallback}


@functools.lru_cache(maxsize=1)
def _trainer_classes() -> dict:
    return _build_trainer_classes()


def __getattr__(name: str):
    # CareGRPOTrainer subclasses trl.GRPOTrainer, so it is built on first access (TRL imported then).
    if name in ("CareGRPOTrainer", "EmaReferenceCallback"):
        return _trainer_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
