"""Data parallelism under torchrun: torch.distributed's DDP or FSDP2 (`fully_shard`), plugged in, not rebuilt.

    torchrun --nproc_per_node 8 -m grpo_care.cli train --config configs/seed_bench_r1_care.yaml \
        --distributed fsdp

    env = setup(config)                          # DistEnv(rank, world_size, local_rank, mode, device)
    engine = wrap(model, config, env)            # DDP(model), the FSDP2-sharded model itself, or the model
    loss, extras = forward(engine, step_fn)      # step_fn() runs as the engine's forward: DDP/FSDP hooks fire

One process (no torchrun, or `distributed: none`) needs no setup at all: `setup` returns a single-process env
and every helper here is then a no-op, so single-GPU runs are untouched.

- Data: each rank reads every `world_size`-th sample (`shard_samples`), in its own seeded order; the loss
  is averaged over ranks by the gradient all-reduce (DDP) or reduce-scatter (FSDP2), so one optimizer step
  sees `per_device_train_batch_size * gradient_accumulation_steps * world_size` prompts, as the paper's 4
  GPUs under DeepSpeed did.
- DDP: the HF model is wrapped in `DistributedDataParallel`; the backbone-and-loss computation runs as the
  wrapper's forward (`forward`), so the reducer sees it; `gradient_sync` is `no_sync` between micro-batches.
- FSDP2: `fully_shard` on every module whose class is in the model's `_no_split_modules` (the decoder
  layers), bottom-up, then on the root. The embeddings, final norm, LM head and the vision tower stay in the
  root's group (the tower runs once per modality a rank's batch holds, so per-block collectives could differ
  in number between ranks). Inside the root's forward (where `forward` runs the step) the LM head weight is
  the gathered, unsharded parameter, which the fused care_kernels loss reads whole, and its gradient goes
  back through FSDP's reduce-scatter. The EMA reference is sharded the same way, so its update is shard-local.
  `generate` keeps ranks in step (transformers' `synced_gpus`, switched on by `_is_fsdp_managed_module`).
- FSDP2 start-up from files reads the weights on rank 0 only and builds meta skeletons elsewhere
  (fsdp_init.py); the EMA reference is a meta copy filled from the policy's shards (`shard_reference`).
- Rank-aware I/O: rank 0 writes metrics, completions, TensorBoard and checkpoints; metrics are averaged over
  ranks (`data/skipped_samples` summed). Checkpoints hold HF weights gathered in full (loadable by
  `from_pretrained` and `grpo-care eval`) plus every rank's data position and RNG state; the optimizer state
  and EMA shadow are gathered too (DDP, or FSDP2 with fsdp_sharded_checkpoints=False) or written shard by
  shard by every rank (sharded_state.py). Resuming needs the same mode and world size.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from grpo_care.modeling import resolve_device

_SUMMED_METRICS = ("data/skipped_samples",)
_VISION_TOWERS = {"visual", "vision_tower", "vision_model"}


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(config) -> DistEnv:
    """The process's place in a torchrun job (init_process_group on first call), or a single-process env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mode = config.distributed
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode != "none" and "RANK" not in os.environ:
        warnings.warn(
            f"distributed={mode} but the process was not launched by torchrun (no RANK / WORLD_SIZE in the "
            "environment): running as a single process",
            stacklevel=2,
        )
        mode = "none"
    if mode == "none":
        if world > 1:
            raise ValueError(
                f"launched with WORLD_SIZE={world} but distributed=none: every rank would train its own "
                "copy; set distributed: ddp or fsdp"
            )
        return DistEnv(device=resolve_device(config.device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = config.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=config.dist_timeout))
    return DistEnv(rank, dist.get_world_size(), local_rank, mode, device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_samples(samples: list, env: DistEnv) -> list:
    """Rank r's share: samples r, r + W, r + 2W, ... (all of them in one process)."""
    return samples[env.rank :: env.world_size] if env.enabled else samples


# ------------------------------------------------------------------------------------------------------------
# wrapping


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, env: DistEnv) -> None:
    """Every rank gets rank 0's parameters and buffers (before sharding, and before the reference copy)."""
    if not env.enabled:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def wrap(model: torch.nn.Module, config, env: DistEnv) -> torch.nn.Module:
    """The engine to run the step through: DDP(model), the FSDP2-sharded model (in place), or the model."""
    if env.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=config.ddp_find_unused_parameters,
        )
    if env.mode == "fsdp":
        return fully_shard_model(model, config, env)
    return model


def fully_shard_model(model: torch.nn.Module, config, env: DistEnv) -> torch.nn.Module:
    """FSDP2: `fully_shard` each `_no_split_modules` block (children first), then the root; in place.

    On CUDA with `bf16`, parameters are gathered in bf16 and gradients reduced in fp32 (MixedPrecisionPolicy);
    the sharded master weights keep `model_dtype`.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy()
    if env.device.type == "cuda" and config.bf16:
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [
        m
        for name, m in reversed(list(model.named_modules()))
        if type(m).__name__ in names and m is not model and not _in_vision_tower(name)
    ]
    if not blocks:
        warnings.warn(
            f"{type(model).__name__} names no _no_split_modules: FSDP shards the whole model as one group",
            stacklevel=2,
        )
    kwargs = dict(reshard_after_forward=config.fsdp_reshard_after_forward, mp_policy=mp_policy)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    model._is_fsdp_managed_module = True  # transformers' generate: synced_gpus, ranks step together
    return model


def _in_vision_tower(name: str) -> bool:
    """Vision blocks stay in the root's group: the tower runs once per modality present in a rank's batch
    (image only, or image and video), so per-block all-gathers would differ in number between ranks."""
    return bool(_VISION_TOWERS & set(name.split(".")))


@torch.no_grad()
def shard_reference(reference, policy: torch.nn.Module, config, env: DistEnv) -> None:
    """Shard the EMA reference like the policy and give it the policy's weights, shard by shard.

    `reference.module` is a skeleton of the policy (fsdp_init.meta_copy; a module with weights works too,
    they are overwritten) and `policy` is sharded and materialized already. Afterwards the reference's
    parameters, its fp32 shadow and the policy's parameters are DTensors with the same placements, so the EMA
    update runs on local shards and no rank ever holds a whole second model."""
    fully_shard_model(reference.module, config, env)
    reference.module.to_empty(device=env.device)
    policy_params, policy_buffers = dict(policy.named_parameters()), dict(policy.named_buffers())
    for name, param in reference.module.named_parameters():
        param.copy_(policy_params[name])  # same placements: a local copy (and cast)
    for name, buffer in reference.module.named_buffers():
        buffer.copy_(policy_buffers[name])
    reference._params = [p for _, p in reference.module.named_parameters()]
    if reference.aliased:
        reference.shadow = [p.data for p in reference._params]
    else:
        reference.shadow = [p.detach().float().clone() for _, p in policy.named_parameters()]


def is_engine(module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(module, (DistributedDataParallel, FSDPModule))


def forward(engine: torch.nn.Module, fn):
    """fn() run as `engine`'s forward, so DDP's reducer and FSDP's unshard / reshard hooks fire around it.

    The same redirection as TRL's `_ForwardRedirection`: the wrapped module's `forward` is swapped for `fn`
    for one call. A plain module just runs `fn()`.
    """
    if not is_engine(engine):
        return fn()
    target = getattr(engine, "module", engine)  # DDP holds the model in .module; FSDP2 is the model
    had_own, own = "forward" in target.__dict__, target.__dict__.get("forward")

    def restore():
        if had_own:
            target.forward = own
        else:
            target.__dict__.pop("forward", None)

    def redirected(*_args, **_kwargs):
        restore()
        return fn()

    target.forward = redirected
    try:
        return engine()
    finally:
        restore()


def gather_root(module: torch.nn.Module) -> None:
    """All-gather an FSDP2 root's own parameters now (embeddings, LM head, vision patch embed / merger).

    `generate` runs the vision encoder before its first forward (transformers 5), outside the root's hooks;
    with the root gathered first it finds whole parameters. They stay gathered until the next backward.
    The empty forward makes FSDP set the root up as the root (its lazy init) before any block runs alone."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        with torch.no_grad():
            forward(module, lambda: None)
        module.unshard()


def reshard(module: torch.nn.Module) -> None:
    """Free an FSDP2 module's gathered parameters now (a no-grad root stays gathered otherwise)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.reshard()


@contextlib.contextmanager
def gradient_sync(engine: torch.nn.Module, enabled: bool):
    """Gradient all-reduce / reduce-scatter on (the last micro-batch of a step) or off (the others)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(engine, DistributedDataParallel) and not enabled:
        with engine.no_sync():
            yield
    elif isinstance(engine, FSDPModule):
        engine.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            engine.set_requires_gradient_sync(True)
    else:
        yield


def full_tensor(tensor):
    """A DTensor gathered in full (a collective: every rank calls it); other tensors and None as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# ------------------------------------------------------------------------------------------------------------
# metrics and objects


def reduce_metrics(metrics: dict, env: DistEnv) -> dict:
    """Numbers averaged over ranks (NaN / None left out; `data/skipped_samples` summed); others rank 0's."""
    if not env.enabled:
        return metrics
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, metrics)
    out = {}
    for key, value in gathered[0].items():
        values = [g.get(key) for g in gathered]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) != len(values):
            out[key] = value
            continue
        finite = [float(v) for v in numbers if math.isfinite(v)]
        if key in _SUMMED_METRICS:
            out[key] = sum(finite)
        else:
            out[key] = sum(finite) / len(finite) if finite else math.nan
    return out


def max_over_ranks(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """values (any shape, on the step's device) -> their elementwise max over all ranks (itself on one rank)."""
    if not env.enabled:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def broadcast_object(obj, env: DistEnv):
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, env: DistEnv) -> list:
    if not env.enabled:
        return [obj]
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


class NullLogger:
    """What ranks other than 0 log to: nothing (rank 0's MetricsLogger writes the files)."""

    def __init__(self, output_dir: str | Path):
        self.metrics_path = Path(output_dir) / "metrics.jsonl"
        self.completions_path = Path(output_dir) / "completions.jsonl"

    def log(self, step: int, metrics: dict) -> None:
        pass

    def log_completions(self, step: int, records: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------------------
# checkpoints (collectives: every rank calls these; rank 0 writes)


def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_model_state(model: torch.nn.Module, env: DistEnv) -> dict | None:
    """FSDP2: the full state dict on rank 0's CPU (empty elsewhere); None otherwise (save_pretrained's)."""
    if env.mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_dict_options(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: torch.nn.Module, optimizer, env: DistEnv) -> dict:
    if env.mode != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    options = _state_dict_options(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, env: DistEnv) -> None:
    if env.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # strict=False: a parameter that never had a gradient has no saved AdamW state; the load fills in a
    # fresh one (step 1, zero moments), which is dropped again so that such a parameter keeps none.
    options = _state_dict_options(full_state_dict=True, strict=False)
    set_optimizer_state_dict(model, optimizer, state, options=options)
    saved = set(state["state"])
    for name, param in model.named_parameters():
        if name not in saved:
            optimizer.state.pop(param, None)


def ema_state(reference, env: DistEnv) -> dict:
    state = reference.state_dict()
    if env.mode == "fsdp":
        state["shadow"] = [full_tensor(s).cpu() for s in state["shadow"]]
    return state


def load_ema_state(reference, state: dict, env: DistEnv) -> None:
    if env.mode == "fsdp":
        from torch.distributed.tensor import distribute_tensor

        state = dict(state)
        state["shadow"] = [
            distribute_tensor(
                full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None
            )
            for full, like in zip(state["shadow"], reference.shadow)
        ]
    reference.load_state_dict(state)


def load_policy_weights(model: torch.nn.Module, checkpoint: str | Path, env: DistEnv) -> None:
    """The checkpoint's HF weights into `model` in place (FSDP2: rank 0 reads the files, every rank receives
    its shards by broadcast)."""
    from grpo_care.checkpoint import load_policy_weights as load_plain

    if env.mode != "fsdp":
        load_plain(model, checkpoint)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    full_state = {}
    if env.is_main:
        base = next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule))
        full_state = base.from_pretrained(str(checkpoint), dtype=next(model.parameters()).dtype).state_dict()
    options = _state_dict_options(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    del full_state


def rank_states(own: dict, env: DistEnv) -> dict:
    """{"distributed", "world_size", "ranks": [each rank's `own`]} for the trainer state ({} in 1 process)."""
    if not env.enabled:
        return {}
    return {"distributed": env.mode, "world_size": env.world_size, "ranks": gather_objects(own, env)}


def own_rank_state(state: dict, env: DistEnv, path) -> dict:
    """This rank's entry of a checkpoint's `ranks` (the top-level rng / data in one process)."""
    saved_mode, saved_world = state.get("distributed", "none"), state.get("world_size", 1)
    if (saved_mode, saved_world) != (env.mode, env.world_size):
        raise ValueError(
            f"{path} was written by a {saved_mode} run on {saved_world} process(es); resume it the same way "
            f"(this run: {env.mode} on {env.world_size})"
        )
    if not env.enabled:
        return {"rng": state["rng"], "data": state["data"]}
    return state["ranks"][env.rank]
