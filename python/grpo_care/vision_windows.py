"""Qwen2.5-VL's vision attention with one SDPA call per window length instead of one per window.

    batch_vision_windows(model)   # in place; returns how many attention modules now batch their windows

Qwen2.5-VL's vision tower attends within windows (and, in a few blocks, within each image or video). With
flash-attention the windows go to one varlen kernel; with SDPA, transformers splits the sequence and calls
SDPA once per window: hundreds of calls per block for one image, most of a small model's vision time on a
CPU. Here the windows of equal length are gathered into one batch, `[windows, heads, length, head_dim]`, and
attended in one call. The torch expression each window computes is unchanged:

    softmax(q_w @ k_w.T * scaling) @ v_w          # per window w and head, as transformers computes it

Only SDPA without dropout takes this path; every other attention implementation (flash, eager, flex) runs
transformers' own forward. Transformers versions whose vision attention has another interface (before
`forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, ...)` and a `config`) are left alone.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

try:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as _qwen
except ImportError:  # transformers without Qwen2.5-VL: nothing to batch
    _qwen = None


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """Attention within each window `[cu_seqlens[i], cu_seqlens[i + 1])` of the `[S, H, D]` sequences; returns
    `[S, H, D]`. Windows of one length share one SDPA call; when all are equal, no gather is needed."""
    seq, heads, dim = q.shape
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold the window boundaries 0, ..., {seq}, got {cu_seqlens.tolist()}")
    starts = cu_seqlens[:-1].tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if starts[0] != 0 or starts[-1] + lengths[-1] != seq or min(lengths) < 0:
        raise ValueError(f"cu_seqlens must run from 0 to the sequence length {seq} without going back, "
                         f"got {cu_seqlens.tolist()}")
    distinct = sorted(set(lengths) - {0})
    if len(distinct) == 1:  # every window as long (the boundaries cover the sequence): a view, no gather
        n = distinct[0]
        windows = [t.reshape(seq // n, n, heads, dim).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*windows, scale=scaling).transpose(1, 2).reshape(seq, heads, dim)
    out = torch.empty_like(q)
    for n in distinct:
        first = torch.tensor([s for s, m in zip(starts, lengths) if m == n], device=q.device)
        index = (first[:, None] + torch.arange(n, device=q.device)).reshape(-1)  # [windows * n] token positions
        windows = [t.index_select(0, index).reshape(-1, n, heads, dim).transpose(1, 2) for t in (q, k, v)]
        attended = F.scaled_dot_product_attention(*windows, scale=scaling).transpose(1, 2).reshape(-1, heads, dim)
        out = out.index_copy(0, index, attended)
    return out


_ATTRIBUTES = ("config", "scaling", "num_heads", "qkv", "proj", "attention_dropout")


def _interface_is_known() -> bool:
    """transformers' vision attention takes (hidden_states, cu_seqlens, position_embeddings, max_seqlen), as in
    transformers 5.x; older ones (4.5x: rotary_pos_emb first, no config) are not swapped."""
    if _qwen is None:
        return False
    parameters = list(inspect.signature(_qwen.Qwen2_5_VLVisionAttention.forward).parameters)
    return parameters[1:5] == ["hidden_states", "cu_seqlens", "position_embeddings", "max_seqlen"]


if _qwen is not None and _interface_is_known():

    class WindowBatchedVisionAttention(_qwen.Qwen2_5_VLVisionAttention):
        """Qwen2_5_VLVisionAttention whose SDPA path attends all windows of one length in one call."""

        def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
            if self.config._attn_implementation != "sdpa" or (self.training and self.attention_dropout > 0):
                return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
            seq = hidden_states.shape[0]
            q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = position_embeddings
            q, k = _qwen.apply_rotary_pos_emb_vision(q, k, cos, sin)
            return self.proj(window_attention(q, k, v, cu_seqlens, self.scaling).reshape(seq, -1))

else:
    WindowBatchedVisionAttention = None


def batch_vision_windows(model: torch.nn.Module) -> int:
    """Swap the class of every Qwen2.5-VL vision attention module in `model` for the batched one (same
    parameters, same state dict); returns how many were swapped (0 for other models and other transformers)."""
    if WindowBatchedVisionAttention is None:
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is _qwen.Qwen2_5_VLVisionAttention and all(hasattr(module, a) for a in _ATTRIBUTES):
            module.__class__ = WindowBatchedVisionAttention
            swapped += 1
    return swapped
