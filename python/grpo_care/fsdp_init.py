"""FSDP2 start-up without a whole model on every rank: skeletons on the meta device, weights from rank 0.

    model, processor, tokenizer, source = load_on_meta(config, env)   # rank 0: source = the weights (CPU)
    fully_shard_model(model, config, env)                              # shards of meta tensors, no memory
    materialize(model, source, env)                                    # each rank gets its shards from rank 0

Loading the checkpoint on every rank and sharding it afterwards would hold W full copies in host memory at
once (8 ranks x 30 GB for Qwen2.5-VL-7B's fp32 master weights) and a full copy on every GPU. Here only rank 0
reads the files; every rank builds the model's skeleton on the meta device (from config.json), shards it,
allocates its own shards (`to_empty`) and receives their values by broadcast from rank 0
(`set_model_state_dict(..., broadcast_from_rank0=True)`, the recipe torch.distributed documents for FSDP2).
Buffers (rotary frequencies) are not in the state dict: rank 0 broadcasts its own.

The EMA reference is built the same way (`meta_copy` of the policy, sharded like it, then its shards copied
from the policy's shards, distributed.shard_reference), so no rank ever holds a second whole model either.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from grpo_care.modeling import build_model, is_multimodal, load_processor


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose parameters live on the meta device (no memory); buffers, tied weights, requires_grad
    flags and any patched forwards are copied as they are. Equivalent to `copy.deepcopy(module)` minus the
    parameter storage."""
    memo = {}
    for param in module.parameters():  # each shared (tied) parameter once: the memo keeps it shared
        memo[id(param)] = torch.nn.Parameter(
            torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
        )
    return copy.deepcopy(module, memo)


def load_on_meta(config, env, weights_from=None):
    """(model skeleton on meta, processor, tokenizer, source): `source` is the loaded model on rank 0's CPU,
    None on the other ranks, which read nothing but the config and the processor files. `weights_from`: a
    checkpoint to take the weights from instead of `config.model_name_or_path` (a resumed run)."""
    model = build_model(config, env.device, on_meta=True)
    source = build_model(config, env.device, path=weights_from) if env.is_main else None  # rank 0's CPU
    processor, tokenizer = load_processor(config.model_name_or_path, is_multimodal(model))
    return model, processor, tokenizer, source


@torch.no_grad()
def materialize(model: torch.nn.Module, source: torch.nn.Module | None, env) -> None:
    """Allocate a sharded meta model's local shards on `env.device` and fill them from rank 0's `source`
    (a collective: every rank calls it; `source` is only read on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full_state = source.state_dict() if env.is_main else {}
    model.to_empty(device=env.device)
    set_model_state_dict(
        model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    source_buffers = dict(source.named_buffers()) if env.is_main else {}
    for name, buffer in model.named_buffers():
        if env.is_main:
            buffer.copy_(source_buffers[name])
        dist.broadcast(buffer, src=0)
