"""grpo_care.vision_windows: Qwen2.5-VL's window attention batched by window length equals transformers' own
per-window loop, in values and gradients, for equal windows (the demo's), unequal ones (a real image's edge
windows), empty windows and low precision."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from grpo_care import vision_windows
from grpo_care.vision_windows import batch_vision_windows, window_attention

pytest.importorskip("transformers")


def per_window_reference(q, k, v, cu_seqlens, scaling):
    """transformers' SDPA path: one call per window, concatenated ([S, H, D] in and out)."""
    outs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        w = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # [1, H, n, D]
        outs.append(F.scaled_dot_product_attention(*w, scale=scaling)[0].transpose(0, 1))
    return torch.cat(outs, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[4] * 24, [64, 64, 40, 64, 24, 15], [3, 0, 5, 5, 0, 3, 1]])
def test_window_attention_matches_the_per_window_loop(lengths, dtype):
    generator = torch.Generator().manual_seed(len(lengths))
    seq, heads, dim = sum(lengths), 2, 16
    qkv = [torch.randn(seq, heads, dim, generator=generator).to(dtype).requires_grad_() for _ in range(3)]
    cu = torch.tensor([0] + lengths).cumsum(0)
    scaling = dim**-0.5
    ours = window_attention(*qkv, cu, scaling)
    grads = torch.autograd.grad(ours.float().square().sum(), qkv)
    reference = per_window_reference(*qkv, cu, scaling)
    reference_grads = torch.autograd.grad(reference.float().square().sum(), qkv)
    assert ours.shape == (seq, heads, dim) and ours.dtype == dtype
    assert torch.equal(ours, reference)  # the same bits: each window's SDPA computes the same sums
    for g, r in zip(grads, reference_grads):
        assert torch.equal(g, r)


def test_window_attention_refuses_boundaries_that_do_not_cover_the_sequence():
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        window_attention(q, q, q, torch.tensor([0, 4, 8]), 1.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        window_attention(q, q, q, torch.tensor([0, 6, 4, 10]), 1.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        window_attention(q, q, q, torch.tensor([0]), 1.0)


def _vision_tower(window_size: int, full_attention_blocks: list[int]):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=full_attention_blocks, window_size=window_size),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config)


@pytest.mark.parametrize("window_size, grid", [(28, [[2, 8, 8], [1, 8, 8]]), (112, [[1, 10, 14], [2, 6, 20]])])
def test_a_swapped_vision_tower_gives_the_same_features_and_gradients(window_size, grid, monkeypatch):
    """The demo's geometry (2 x 2 windows, all equal) and a real model's (112-pixel windows cut at the edges of
    a 140 x 196 image and a 84 x 280 clip), one window block and one full-attention block."""
    calls = []
    monkeypatch.setattr(vision_windows, "window_attention",
                        lambda *a: calls.append(a[3].diff().unique().numel()) or window_attention(*a))
    model = _vision_tower(window_size, full_attention_blocks=[1])
    swapped = copy.deepcopy(model)
    assert batch_vision_windows(swapped) == 2
    assert batch_vision_windows(swapped) == 0  # already swapped
    grid_thw = torch.tensor(grid)
    patches = int(grid_thw.prod(-1).sum())
    pixels = torch.randn(patches, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    features = []
    for m in (model, swapped):
        out = m.model.visual(pixels, grid_thw=grid_thw)
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        out = torch.cat(list(out), 0) if isinstance(out, (list, tuple)) else out
        out.square().sum().backward()
        features.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    assert len(calls) == 2 and (max(calls) > 1) == (window_size == 112)  # both blocks batched; edge windows
    assert torch.equal(features[1][0], features[0][0])
    assert features[0][1].keys() == features[1][1].keys() and features[0][1]
    for name, grad in features[0][1].items():
        assert torch.equal(features[1][1][name], grad), name
    assert model.state_dict().keys() == swapped.state_dict().keys()
    again = pickle.loads(pickle.dumps(swapped))  # torch.save(model), spawned workers
    assert type(again.model.visual.blocks[0].attn) is vision_windows.WindowBatchedVisionAttention


def test_other_attention_implementations_keep_transformers_forward(monkeypatch):
    monkeypatch.setattr(vision_windows, "window_attention", lambda *a: pytest.fail("batched path taken"))
    model = _vision_tower(28, full_attention_blocks=[])
    model.config.vision_config._attn_implementation = "eager"
    swapped = copy.deepcopy(model)
    batch_vision_windows(swapped)
    grid_thw = torch.tensor([[1, 8, 8]])
    pixels = torch.randn(64, 3 * 2 * 14 * 14)
    a, b = (m.model.visual(pixels, grid_thw=grid_thw) for m in (model, swapped))
    a, b = (x.pooler_output if hasattr(x, "pooler_output") else x for x in (a, b))
    torch.testing.assert_close(b, a)


def test_models_without_a_qwen_vision_tower_are_left_alone():
    assert batch_vision_windows(torch.nn.Linear(2, 2)) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_attention_on_cuda_matches_the_per_window_loop(dtype):
    """What gpu_check.sh verifies before the trainer may batch windows on a GPU too (it does on CPU only): on CUDA
    SDPA picks its kernel by shape, so the batched call may round differently; within each dtype's tolerance."""
    lengths = [64] * 12 + [40, 24, 15, 0, 64]
    generator = torch.Generator().manual_seed(0)
    qkv = [torch.randn(sum(lengths), 16, 80, generator=generator).to("cuda", dtype).requires_grad_() for _ in range(3)]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0)
    ours = window_attention(*qkv, cu, 80**-0.5)
    reference = per_window_reference(*qkv, cu, 80**-0.5)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(ours, reference, **tol)
    grads = torch.autograd.grad(ours.float().square().sum(), qkv)
    for g, r in zip(grads, torch.autograd.grad(reference.float().square().sum(), qkv)):
        torch.testing.assert_close(g, r, **tol)
