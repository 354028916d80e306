"""grpo_care.modeling: Liger's layer kernels behind `use_liger_kernel` (never its loss or LM head), bf16 autocast
only on CUDA."""

import warnings

import pytest
import torch
from grpo_care.modeling import apply_liger_layer_kernels, autocast
from grpo_care.tiny import byte_tokenizer, tiny_qwen2

monkey_patch = pytest.importorskip("liger_kernel.transformers.monkey_patch", reason="liger-kernel is in [test]")


def test_liger_flag_patches_norm_mlp_and_rope_but_leaves_the_lm_head_to_care_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(monkey_patch, "_apply_liger_kernel_to_instance", lambda **kw: calls.append(kw))
    model = tiny_qwen2(byte_tokenizer())
    assert apply_liger_layer_kernels(model, torch.device("cuda")) is True
    (kw,) = calls
    assert kw["model"] is model
    assert kw["rms_norm"] and kw["swiglu"] and kw["rope"]
    assert kw["cross_entropy"] is False and kw["fused_linear_cross_entropy"] is False


def test_liger_flag_is_refused_with_a_warning_off_cuda(monkeypatch):
    monkeypatch.setattr(monkey_patch, "_apply_liger_kernel_to_instance",
                        lambda **kw: pytest.fail("must not patch a CPU model"))
    with pytest.warns(UserWarning, match="need a CUDA device"):
        assert apply_liger_layer_kernels(tiny_qwen2(byte_tokenizer()), torch.device("cpu")) is False


@pytest.mark.gpu
def test_liger_layer_kernels_keep_the_model_s_outputs():
    """The real patch on a tiny Qwen2 on CUDA: the same logits as the eager model. (Liger's kernels do not run
    under the Triton interpreter, so this needs a GPU: benchmarks/gpu_check.sh runs it.)"""
    tok = byte_tokenizer()
    eager, patched = tiny_qwen2(tok, seed=3).cuda(), tiny_qwen2(tok, seed=3).cuda()
    assert apply_liger_layer_kernels(patched, torch.device("cuda")) is True
    ids = torch.randint(0, 256, (2, 9), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_autocast_is_bf16_on_cuda_only():
    with autocast(torch.device("cpu"), True):
        assert not torch.is_autocast_enabled("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: the context is built, never entered
        ctx = autocast(torch.device("cuda"), True)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(autocast(torch.device("cuda"), False), torch.autocast)
