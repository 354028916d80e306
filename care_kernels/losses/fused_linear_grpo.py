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
The gradients are computed during forward (as Liger does); backward only scales them.

Tokens outside `attention_mask` are skipped entirely (one host sync to gather the active rows).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from care_kernels import _validate
from care_kernels.losses.policy_loss import check_kl_clamp, policy_loss
from care_kernels.row_epilogue import row_grad_, row_stats

Tensor = torch.Tensor
_IGNORE = -100


class TokenStats(NamedTuple):
    """By-products of the loss head's forward, detached: the policy's per-token log-probs and entropy, [B, T]
    float32 (0 outside the mask; entropy None unless asked for). What `linear_logprobs(...,
    return_entropy=True)` would return, without a second pass over the vocabulary."""

    logprobs: Tensor
    entropy: Optional[Tensor]


def _default_buffer_bytes(device: torch.device) -> int:
    """1 GiB on GPU; 512 MiB on CPU, where every chunk re-reads and re-writes the whole fp32 dW ([V, H]), so
    fewer, taller chunks pay (N=2048, H=896, V=151936 on 2 EPYC cores: 16.8 s with 96 MiB, 13.1 s with 256,
    12.8 s with 512, cut into equal chunks; peak extra memory, dW included, 968 MiB against Liger's 1.25 GiB
    in the benchmark's headline run)."""
    return (1 << 30) if device.type == "cuda" else (512 << 20)


def _buffer_dtype(weight: Tensor) -> torch.dtype:
    """16-bit logits stay 16-bit on GPU (Triton epilogues read them in fp32 math); float32 elsewhere."""
    return weight.dtype if weight.is_cuda else torch.float32


def _logits_chunk(out: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """out[:n] = h @ weight.T + bias, the matmul in the weight's dtype, stored in the buffer's dtype."""
    buf = out[: h.shape[0]]
    if weight.dtype == buf.dtype:
        torch.mm(h, weight.T, out=buf)
    else:
        buf.copy_(h @ weight.T)
    if bias is not None:
        buf += bias.to(buf.dtype)
    return buf


def _accumulate_grad_weight(grad_weight: Tensor, dlogits: Tensor, h: Tensor, first: bool) -> None:
    """grad_weight (fp32) = dlogits.T @ h (first chunk: whatever grad_weight held is ignored) or += it, with fp32
    accumulation. Writing the first chunk saves zero-filling a [V, H] fp32 buffer."""
    if dlogits.dtype == torch.float32:
        grad_weight.addmm_(dlogits.T, h.float() if h.dtype != torch.float32 else h, beta=0 if first else 1)
    elif dlogits.is_cuda:
        from care_kernels.triton.fp32_gemm import addmm_fp32_

        addmm_fp32_(grad_weight, dlogits.T, h, accumulate=not first)
    elif first:
        grad_weight.copy_(dlogits.T @ h)
    else:
        grad_weight += (dlogits.T @ h).float()


class _FusedGRPOHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, ref_hidden,
                ref_weight, ref_bias, loss_kwargs, temperature, buffer_bytes, with_entropy):
        b, t, h = hidden.shape
        v = weight.shape[0]
        flat_h = hidden.reshape(b * t, h)
        active = mask.reshape(-1).nonzero()[:, 0]  # host sync: the number of active tokens
        h_act = flat_h.index_select(0, active).contiguous()
        y_act = targets.reshape(-1).index_select(0, active)
        n = active.numel()
        buf_dtype = _buffer_dtype(weight)
        max_rows = max(1, min(n, buffer_bytes // (torch.finfo(buf_dtype).bits // 8 * v)))
        # Equal chunks: a short last chunk runs its GEMMs well below the BLAS peak.
        chunks = max(1, math.ceil(n / max_rows))
        rows = max(1, math.ceil(n / chunks))
        buf = torch.empty(rows, v, dtype=buf_dtype, device=hidden.device)

        logp_flat = torch.zeros(b * t, dtype=torch.float32, device=hidden.device)
        entropy_flat = torch.zeros(b * t, dtype=torch.float32, device=hidden.device) if with_entropy else None
        ref_flat = None
        if ref_weight is not None:
            ref_flat = torch.zeros(b * t, dtype=torch.float32, device=hidden.device)
            ref_h_act = ref_hidden.reshape(b * t, h).index_select(0, active).contiguous()
        grad_hidden_act = torch.empty_like(h_act)
        # Filled by the first chunk's dW GEMM; zero only when no token is active.
        grad_weight = (torch.empty if n else torch.zeros)(v, h, dtype=torch.float32, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(v, dtype=torch.float32, device=weight.device)

        def chunk_grad(logp_full, ref_full):
            """d loss / d logp for every token, from policy_loss itself (separable per token)."""
            leaf = logp_full.view(b, t).detach().requires_grad_(True)
            with torch.enable_grad():
                loss, _ = policy_loss(leaf, advantages, mask, old_logprobs=old_logps,
                                      ref_logprobs=ref_full.view(b, t) if ref_full is not None else ref_logps,
                                      **loss_kwargs)
                (g,) = torch.autograd.grad(loss, leaf)
            return g.reshape(-1)

        for r0 in range(0, n, rows):
            sel = slice(r0, min(r0 + rows, n))
            idx = active[sel]
            if ref_weight is not None:
                z = _logits_chunk(buf, ref_h_act[sel], ref_weight, ref_bias)
                ref_flat[idx] = row_stats(z, y_act[sel], temperature, _IGNORE)[0]
            z = _logits_chunk(buf, h_act[sel], weight, bias)
            logp, lse, entropy = row_stats(z, y_act[sel], temperature, _IGNORE, with_entropy=with_entropy)
            logp_flat[idx] = logp
            if with_entropy:
                entropy_flat[idx] = entropy
            g = chunk_grad(logp_flat, ref_flat).index_select(0, idx)
            dlogits = row_grad_(z, y_act[sel], lse, g, temperature, _IGNORE)
            if grad_bias is not None:
                grad_bias += dlogits.sum(dim=0, dtype=torch.float32)
            if dlogits.dtype != weight.dtype:  # float32 buffer of a 16-bit CPU head: GEMMs in the head's dtype
                dlogits = dlogits.to(weight.dtype)
            torch.mm(dlogits, weight, out=grad_hidden_act[sel])
            _accumulate_grad_weight(grad_weight, dlogits, h_act[sel], first=r0 == 0)

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
        ctx.mark_non_differentiable(clip_ratio, kl, logprobs, entropy)
        return loss, clip_ratio, kl, logprobs, entropy

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
    Extra: max_buffer_bytes, the size of the float32 logits chunk (default 1 GiB on GPU, 512 MiB on CPU);
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
        buffer_bytes = self.max_buffer_bytes or _default_buffer_bytes(_input.device)
        outs = _FusedGRPOHead.apply(
            _input, lin_weight, bias, selected_token_ids.to(torch.int64), mask, advantages.to(torch.float32),
            None if old_per_token_logps is None else old_per_token_logps.float(),
            None if ref_per_token_logps is None else ref_per_token_logps.float(),
            ref_input.detach() if use_ref_pass else None, ref_weight.detach() if use_ref_pass else None,
            ref_bias.detach() if use_ref_pass and ref_bias is not None else None,
            loss_kwargs, self.temperature, int(buffer_bytes), bool(return_token_stats and return_entropy),
        )
        loss, clip_ratio, kl, logprobs, entropy = outs
        metrics = [kl, clip_ratio] if self.beta != 0 else [clip_ratio]
        if not return_token_stats:
            return loss, metrics
        return loss, metrics, TokenStats(logprobs, entropy if return_entropy else None)
