"""FSDP2 start-up pieces that need no process group: meta skeletons of a model (fsdp_init.meta_copy).

The collective half (materialize, shard_reference, sharded checkpoints) runs in the 2-process gloo test,
tests/test_grpo_care_distributed.py."""

import pytest
import torch


def test_meta_copy_keeps_structure_ties_flags_and_buffers_without_parameter_memory():
    from grpo_care.fsdp_init import meta_copy
    from grpo_care.modeling import is_on_meta
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


_SHARDED_STATE_ROUND_TRIP = r"""
import warnings
import torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
from grpo_care import sharded_state
from grpo_care.config import GRPOCareConfig
from grpo_care.distributed import DistEnv, fully_shard_model, shard_reference
from grpo_care.ema import EMAReference
from grpo_care.fsdp_init import meta_copy

warnings.simplefilter("ignore")  # the toy model names no _no_split_modules: one FSDP group
config, env = GRPOCareConfig(device="cpu"), DistEnv(0, 1, 0, "fsdp", torch.device("cpu"))


class Policy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)  # unused: never a gradient

    def forward(self, x):
        return self.used(x)


def build():
    torch.manual_seed(0)
    policy = Policy()
    reference = EMAReference(meta_copy(policy), dtype=torch.bfloat16, build_shadow=False)
    fully_shard_model(policy, config, env)
    shard_reference(reference, policy, config, env)
    return policy, torch.optim.AdamW(policy.parameters(), lr=0.1), reference


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


policy, optimizer, reference = build()
for _ in range(3):
    policy(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    reference.update(policy, decay=0.9)
sharded_state.save("ck/sharded", policy, optimizer, reference)

policy2, optimizer2, reference2 = build()
policy2.load_state_dict(policy.state_dict())
sharded_state.load("ck/sharded", policy2, optimizer2, reference2)
with_state = [name for name, p in policy2.named_parameters() if p in optimizer2.state]
assert with_state == ["used.weight", "used.bias"], with_state  # as in the saved optimizer: none for `unused`
for (name, p1), p2 in zip(policy.named_parameters(), policy2.parameters()):
    if p1 in optimizer.state:
        a, b = optimizer.state[p1], optimizer2.state[p2]
        assert a.keys() == b.keys() and all(torch.equal(local(a[k]), local(b[k])) for k in a), name
for s1, s2 in zip(reference.shadow, reference2.shadow):
    assert s2.dtype == torch.float32 and torch.equal(local(s1), local(s2))
for p1, p2 in zip(reference.module.parameters(), reference2.module.parameters()):
    assert p2.dtype == torch.bfloat16 and torch.equal(local(p1), local(p2))  # refreshed from the shadow
# and the next step is the same as the first run's
for p, o in ((policy, optimizer), (policy2, optimizer2)):
    p(torch.ones(2, 4)).sum().backward()
    o.step()
assert all(torch.equal(local(a), local(b)) for a, b in zip(policy.parameters(), policy2.parameters()))
# the gathered path (fsdp_sharded_checkpoints=False): the same, through full state dicts on rank 0
from grpo_care.distributed import load_optimizer_state, optimizer_state

policy3, optimizer3, _ = build()
load_optimizer_state(policy3, optimizer3, optimizer_state(policy, optimizer, env), env)
with_state = [name for name, p in policy3.named_parameters() if p in optimizer3.state]
assert with_state == ["used.weight", "used.bias"], with_state
for (name, p1), p3 in zip(policy.named_parameters(), policy3.parameters()):
    if p1 in optimizer.state:
        a, b = optimizer.state[p1], optimizer3.state[p3]
        assert a.keys() == b.keys() and all(torch.equal(local(a[k]), local(b[k])) for k in a), name
try:
    sharded_state.load("nowhere", policy2, optimizer2, reference2)
except FileNotFoundError as e:
    assert ".metadata" in str(e)
else:
    raise AssertionError("loading from a directory without a checkpoint must fail")
dist.destroy_process_group()
print("ok")
"""


def test_sharded_state_round_trip_keeps_parameters_without_optimizer_state_without_it(run_gloo_script):
    """One gloo process: AdamW state and a bf16 reference's fp32 shadow through torch.distributed.checkpoint,
    with a parameter that never had a gradient (so AdamW never made state for it): the load restores every
    saved tensor exactly and leaves that parameter without state, and the next step matches. The gathered
    optimizer state (fsdp_sharded_checkpoints=False) loads the same way."""
    run_gloo_script(_SHARDED_STATE_ROUND_TRIP)



def test_a_meta_skeleton_read_from_files_carries_the_saved_generation_config(tmp_path):
    """Checkpoints of an FSDP run are saved from the skeleton: it must hold what from_pretrained would attach."""
    from grpo_care.config import GRPOCareConfig
    from grpo_care.modeling import build_model
    from grpo_care.tiny import byte_tokenizer, tiny_qwen2

    model = tiny_qwen2(byte_tokenizer())
    model.generation_config.eos_token_id = [2, 5]
    model.generation_config.do_sample, model.generation_config.top_k = True, 7
    model.save_pretrained(tmp_path)
    config = GRPOCareConfig(model_name_or_path=str(tmp_path), device="cpu")
    skeleton, loaded = build_model(config, on_meta=True), build_model(config)
    assert all(p.is_meta for p in skeleton.parameters()) and not any(p.is_meta for p in loaded.parameters())
    assert skeleton.generation_config.eos_token_id == [2, 5] and skeleton.generation_config.top_k == 7
    assert skeleton.generation_config.to_diff_dict() == loaded.generation_config.to_diff_dict()
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in loaded.named_parameters()]
