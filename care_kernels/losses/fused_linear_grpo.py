"""`FusedLinearGRPOLoss`: the whole GRPO loss head from hidden states, a drop-in for Liger's.

    loss_fn = ck.FusedLinearGRPOLoss(beta=0.0, loss_type="grpo")
    loss, metrics = loss_fn(hidden, lm_head.weight, completion_ids, completion_mask, advantages)

Equivalent to
    logp = ck.linear_logprobs(hidden, W, completion_ids, bias, temperature=T)
    loss, m = ck.policy_loss(logp, advantages, completion_mask, old_logprobs=..., ref_logprobs=..., ...)
but cheaper: the per-token loss of every registered loss type is a weighted sum of terms that each depend
on one token's log-prob, so a token's loss gradient is known as soon as its log-prob is. The head keeps
one bounded chunk of whole logits rows `[n, V]`, scores it, asks `policy_loss` (via autograd on its
[B, T] inputs) for the chunk's per-token gradients, turns the buffer into dlogits in place and multiplies
out dH and dW: 2NHV (logits) + 4NHV (dH, dW) for the policy, plus 2NHV for a reference given as
`ref_input`/`ref_weight`, i.e. 8NHV, where an autograd log-prob op followed by a loss costs 10NHV.
The gradients are computed during forward (as Liger does); backward only scales them. On a GPU the chunk loop
runs in the variant timed fastest for the shape (fused_head_chunks: two sweeps of each chunk, one sweep, or one tall
chunk where memory allows).

Tokens outside `attention_mask` are skipped entirely (one host sync to gather the active rows).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from care_kernels import _validate
from care_kernels.losses import fused_head_chunks
from care_kernels.losses.policy_loss import check_kl_clamp, policy_loss

Tensor = torch.Tensor
_IGNORE = -100


class TokenStats(NamedTuple):
    """By-products of the loss head's forward, detached: the policy's per-token log-probs and entropy, [B, T]
    float32 (0 outside the mask; entropy None unless asked for), and the reference's log-probs when the head
    scored it (`ref_input`/`ref_weight`; else None). What `linear_logprobs(..., return_entropy=True)` would
    return, without a second pass over the vocabulary. Policy and reference are scored by the same code, so
    equal weights give equal log-probs bit for bit (and a k3 KL gradient of exactly 0)."""

    logprobs: Tensor
    entropy: Optional[Tensor]
    ref_logprobs: Optional[Tensor] = None


def _default_buffer_bytes(device: torch.device) -> int:
    """1 GiB on GPU; 512 MiB on CPU, where every chunk re-reads and re-writes the whole fp32 dW ([V, H]), so
    fewer, taller chunks pay (N=2048, H=896, V=151936 on 2 EPYC cores: 16.8 s with 96 MiB, 13.1 s with 256,
    12.8 s with 512, cut into equal chunks; peak extra memory, dW included, 968 MiB against Liger's 1.25 GiB
    in the benchmark's headline run)."""
    return (1 << 30) if device.type == "cuda" else (512 << 20)


class _FusedGRPOHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, ref_hidden,
                ref_weight, ref_bias, loss_kwargs, temperature, buffer_bytes, with_entropy):
        b, t, h = hidden.shape
        flat_h = hidden.reshape(b * t, h)
        active = mask.reshape(-1).nonzero()[:, 0]  # host sync: the number of active tokens
        h_act = flat_h.index_select(0, active).contiguous()
        y_act = targets.reshape(-1).index_select(0, active)
        ref = None
        if ref_weight is not None:
            ref = (ref_hidden.reshape(b * t, h).index_select(0, active).contiguous(), ref_weight, ref_bias)

        def flat(act):  # active tokens' values -> [B * T], zeros elsewhere
            return torch.zeros(b * t, dtype=torch.float32, device=hidden.device).index_copy_(0, active, act)

        def loss_grad(logp_act, ref_act, rows):
            """d loss / d logp for the active tokens in `rows`, from policy_loss itself (separable per token)."""
            leaf = flat(logp_act).view(b, t).requires_grad_(True)
            with torch.enable_grad():
                loss, _ = policy_loss(leaf, advantages, mask, old_logprobs=old_logps,
                                      ref_logprobs=flat(ref_act).view(b, t) if ref_act is not None else ref_logps,
                                      **loss_kwargs)
                (g,) = torch.autograd.grad(loss, leaf)
            return g.reshape(-1).index_select(0, active[rows])

        # The chunk loop, in the variant timed fastest for this shape on a GPU (fused_head_chunks).
        bounded = buffer_bytes is not None
        inputs = fused_head_chunks.HeadInputs(h_act, y_act, weight, bias, ref, temperature, _IGNORE)
        grads = fused_head_chunks.run(inputs, loss_grad, bounded=bounded, with_entropy=with_entropy,
                                      buffer_bytes=buffer_bytes if bounded else _default_buffer_bytes(hidden.device))
        logp_flat = flat(grads.logp)
        entropy_flat = flat(grads.entropy) if with_entropy else None
        ref_flat = None if ref is None else flat(grads.ref_logp)
        grad_hidden_act, grad_weight, grad_bias = grads.grad_hidden, grads.grad_weight, grads.grad_bias

        with torch.no_grad():
            loss, metrics = policy_loss(logp_flat.view(b, t), advantages, mask, old_logprobs=old_logps,
                                        ref_logprobs=ref_flat.view(b, t) if ref_flat is not None else ref_logps,
                                        **loss_kwargs)
        grad_hidden = torch.zeros_like(flat_h)
        grad_hidden.index_copy_(0, active, grad_hidden_act)
        ctx.save_for_backward(grad_hidden.view(b, t, h), grad_weight.to(weight.dtype),
                              None if grad_bias is None else grad_bias.to(bias.dtype))
        clip_ratio = metrics["clip_ratio"]
        kl = metrics.get("kl", torch.zeros_like(clip_ratio))
        logprobs = logp_flat.view(b, t)
        entropy = entropy_flat.view(b, t) if with_entropy else torch.zeros_like(logprobs)
        ref_logprobs = ref_flat.view(b, t) if ref_flat is not None else torch.zeros_like(logprobs)
        ctx.mark_non_differentiable(clip_ratio, kl, logprobs, entropy, ref_logprobs)
        return loss, clip_ratio, kl, logprobs, entropy, ref_logprobs

    @staticmethod
    def backward(ctx, grad_loss, *_):
        # The gradients were formed in forward; scale them in place (no second weight-sized buffer).
        if getattr(ctx, "consumed", False):
            raise RuntimeError("FusedLinearGRPOLoss supports one backward per forward (no retain_graph reuse)")
        ctx.consumed = True
        gh, gw, gb = ctx.saved_tensors
        # loss.backward() passes exactly 1: on CPU, where the check costs no device sync, skip a pass over dW.
        unit = grad_loss.device.type == "cpu" and bool(grad_loss == 1)
        grads = [(g if unit else g.mul_(grad_loss.to(g.dtype))) if g is not None and need else None
                 for g, need in zip((gh, gw, gb), ctx.needs_input_grad[:3])]
        return *grads, *([None] * 12)


class FusedLinearGRPOLoss(torch.nn.Module):
    """Drop-in for `liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss` (same constructor, forward, return).

    Args (as Liger's): beta (k3 KL weight), compiled (accepted for compatibility; the loss math is a few
    elementwise ops), use_ref_model, chunk_size (accepted for compatibility: the buffer here is bounded by
    `max_buffer_bytes` instead), epsilon_low/epsilon_high (PPO clip), loss_type ("grpo", "bnpo", "dr_grpo",
    "dapo" or any registered type), max_completion_length (dr_grpo), temperature.
    Extra: max_buffer_bytes, the size of the logits chunk (default 1 GiB on GPU, 512 MiB on CPU; unless given, a
    GPU may take one chunk of every token where free memory allows and that is faster: fused_head_chunks);
    kl_clamp, the bound on |ref - logp| inside the k3 KL (None, as Liger and TRL: unclamped; see policy_loss).

    forward(_input [B, T, H], lin_weight [V, H], selected_token_ids [B, T], attention_mask [B, T] (the loss
    mask), advantages [B], bias=None, ref_per_token_logps=None [B, T], old_per_token_logps=None [B, T],
    ref_input=None [B, T, H], ref_weight=None [V, H], ref_bias=None, num_items_in_batch=None)
    -> (loss, [kl_mean, clip_ratio]) when beta != 0 else (loss, [clip_ratio]).
    Extra keywords: return_token_stats=True appends a `TokenStats` (the policy's per-token log-probs, and
    with return_entropy=True its entropy): a trainer that logs them needs no second head pass.
    """

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True,
                 chunk_size: int = 1, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: str = "dapo", max_completion_length: Optional[int] = None,
                 temperature: float = 1.0, max_buffer_bytes: Optional[int] = None,
                 kl_clamp: Optional[float] = None):
        super().__init__()
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.temperature = _validate.check_temperature(temperature)
        self.max_buffer_bytes = max_buffer_bytes
        self.kl_clamp = check_kl_clamp(kl_clamp)

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
                ref_bias=None, num_items_in_batch=None, *, return_token_stats=False, return_entropy=False):
        if return_entropy and not return_token_stats:
            raise ValueError("return_entropy=True needs return_token_stats=True (the entropy comes back in TokenStats)")
        _validate.check_head(_input, lin_weight, bias, "_input", "lin_weight", "bias")
        if _input.dim() != 3:
            raise ValueError(f"_input must be [B, T, H], got {tuple(_input.shape)}")
        _validate.check_targets(selected_token_ids, _input, "selected_token_ids")
        b, t, _ = _input.shape
        if tuple(attention_mask.shape) != (b, t):
            raise ValueError(f"attention_mask must be [B, T] = {(b, t)}, got {tuple(attention_mask.shape)}")
        if tuple(advantages.shape) != (b,):
            raise ValueError(f"advantages must be [B] = [{b}], got {tuple(advantages.shape)}")
        for name, x in (("ref_per_token_logps", ref_per_token_logps), ("old_per_token_logps", old_per_token_logps)):
            if x is not None and tuple(x.shape) != (b, t):
                raise ValueError(f"{name} must be [B, T] = {(b, t)}, got {tuple(x.shape)}")
        use_ref_pass = False
        if self.beta != 0 and self.use_ref_model:
            if ref_per_token_logps is None:
                if ref_input is None or ref_weight is None:
                    raise ValueError(
                        "beta != 0 with use_ref_model: pass ref_per_token_logps, or ref_input and ref_weight"
                    )
                _validate.check_head(ref_input, ref_weight, ref_bias, "ref_input", "ref_weight", "ref_bias")
                if ref_input.shape != _input.shape or ref_weight.shape[0] != lin_weight.shape[0]:
                    raise ValueError("ref_input/ref_weight must match _input's shape and lin_weight's vocabulary")
                use_ref_pass = True
        loss_kwargs = dict(beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                           loss_type=self.loss_type, max_completion_length=self.max_completion_length,
                           num_items_in_batch=num_items_in_batch, kl_clamp=self.kl_clamp)
        mask = attention_mask.to(torch.float32)
        outs = _FusedGRPOHead.apply(
            _input, lin_weight, bias, selected_token_ids.to(torch.int64), mask, advantages.to(torch.float32),
            None if old_per_token_logps is None else old_per_token_logps.float(),
            None if ref_per_token_logps is None else ref_per_token_logps.float(),
            ref_input.detach() if use_ref_pass else None, ref_weight.detach() if use_ref_pass else None,
            ref_bias.detach() if use_ref_pass and ref_bias is not None else None,
            loss_kwargs, self.temperature, int(self.max_buffer_bytes) if self.max_buffer_bytes else None,
            bool(return_token_stats and return_entropy),
        )
        loss, clip_ratio, kl, logprobs, entropy, ref_logprobs = outs
        metrics = [kl, clip_ratio] if self.beta != 0 else [clip_ratio]
        if not return_token_stats:
            return loss, metrics
        return loss, metrics, TokenStats(logprobs, entropy if return_entropy else None,
                                         ref_logprobs if use_ref_pass else None)
