"""FSDP2 start-up pieces that need no process group: meta skeletons of a model (fsdp_init.meta_copy).

The collective half (materialize, shard_reference, sharded checkpoints) runs in the 2-process gloo test,
tests/test_grpo_care_distributed.py."""

import pytest
import torch


def test_meta_copy_keeps_structure_ties_flags_and_buffers_without_parameter_memory():
    from grpo_care.fsdp_init import is_on_meta, meta_copy
    from grpo_care.tiny import byte_tokenizer, tiny_qwen2

    model = tiny_qwen2(byte_tokenizer())
    model.model.layers[0].requires_grad_(False)
    model.model.norm.forward = lambda x: x  # an instance-level patch (as Liger's layer kernels are)
    skeleton = meta_copy(model)

    assert is_on_meta(skeleton) and not is_on_meta(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight  # the tie survives
    mine, theirs = dict(skeleton.named_parameters()), dict(model.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, param in theirs.items():
        assert mine[name].shape == param.shape and mine[name].dtype == param.dtype
        assert mine[name].requires_grad == param.requires_grad, name
    buffers = dict(model.named_buffers())
    for name, buffer in skeleton.named_buffers():  # small, kept with their values (rotary frequencies)
        assert not buffer.is_meta and torch.equal(buffer, buffers[name]), name
    assert skeleton.model.norm.forward(torch.ones(2)).tolist() == [1.0, 1.0]


def test_trainer_refuses_a_meta_model_outside_fsdp(tmp_path):
    from grpo_care.config import GRPOCareConfig
    from grpo_care.fsdp_init import meta_copy
    from grpo_care.tiny import byte_tokenizer, tiny_qwen2
    from grpo_care.trainer import Trainer

    tok = byte_tokenizer()
    config = GRPOCareConfig(device="cpu", distributed="none", output_dir=str(tmp_path), report_to=["none"])
    with pytest.raises(ValueError, match="meta device"):
        Trainer(config, model=meta_copy(tiny_qwen2(tok)), tokenizer=tok)
