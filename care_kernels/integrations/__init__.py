"""Thin adapters that put care_kernels under other RL frameworks (each imports its framework lazily).

- `care_kernels.integrations.trl`: `patch_trl()` / `use_care_kernels()` make TRL (>= 1.16) compute its
  fused-LM-head per-token log-probs (GRPOTrainer, RLOO, DPO, ...) with `care_kernels.linear_logprobs`;
  `CareGRPOTrainer` is TRL's GRPOTrainer with the GRPO-CARE consistency bonus and an fp32 EMA reference, for
  text prompts and, with a vision-language model and its processor, image prompts.
- `care_kernels.integrations.verl`: `linear_cross_entropy` (verl's fused-kernel contract,
  `verl.utils.kernel.linear_cross_entropy`) and `FusedLinearForPPO` (verl's torch module of the same name).
- `care_kernels.integrations.openrlhf`: `patch_actor` / `patch_actor_class` give OpenRLHF's `Actor.forward`
  (action log-probs and entropy, text and vision-language models) without the `[B, T, V]` logits;
  `log_probs_from_hidden` is `log_probs_from_logits` from hidden states and the LM-head weight.

The submodules are not imported here, so `import care_kernels.integrations` needs none of those frameworks.
"""

__all__ = ["trl", "verl", "openrlhf"]
