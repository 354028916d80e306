"""The large training state under FSDP2, saved and loaded shard by shard with torch.distributed.checkpoint.

    checkpoint-500/
        model.safetensors, config.json   the policy in full, gathered to rank 0 (from_pretrained / eval read it)
        trainer_state.pt                  step, scheduler, every rank's RNG state and data position, config
        sharded/                          AdamW moments and the EMA fp32 shadow: a file per rank + .metadata

    save(directory, model, optimizer, reference)    # collective: every rank writes its own shards, in parallel
    load(directory, model, optimizer, reference)    # collective: every rank reads its own shards back

Why: gathered on rank 0, a 7B run's optimizer state (2 x 30 GB in fp32) and EMA shadow (30 GB) would pass
through one process's memory and one writer at every checkpoint. Sharded, each rank writes 1/W of it.
"""

from __future__ import annotations

from pathlib import Path

import torch

SHARDED_DIR = "sharded"


def _state(model: torch.nn.Module, optimizer, reference) -> dict:
    """The tensors DCP saves or loads in place: the optimizer's sharded state dict and the EMA shadow."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    if reference is not None:
        state["ema_shadow"] = {str(i): shadow for i, shadow in enumerate(reference.shadow)}
    return state


def save(directory: str | Path, model: torch.nn.Module, optimizer, reference=None) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer, reference), checkpoint_id=str(directory))


@torch.no_grad()
def load(directory: str | Path, model: torch.nn.Module, optimizer, reference=None) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not (Path(directory) / ".metadata").is_file():
        raise FileNotFoundError(f"{directory} holds no torch.distributed.checkpoint state (.metadata missing)")
    state = _state(model, optimizer, reference)
    _keep_saved_parameter_states(state["optimizer"]["state"], directory)
    dcp.load(state, checkpoint_id=str(directory))  # in place: the shadow tensors are filled directly
    # strict=False: parameters without saved state (see _keep_saved_parameter_states) stay without state
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
    if reference is not None:
        reference.refresh_module()


def _keep_saved_parameter_states(optimizer_state: dict, directory: str | Path) -> None:
    """Drop from `optimizer_state` ({fqn: {"exp_avg": ..., ...}}) the parameters the checkpoint has no state
    for. `get_optimizer_state_dict` gives a fresh optimizer state for every trainable parameter, but AdamW only
    creates it at a parameter's first gradient, so a parameter that never had one (a vision tower on a
    text-only dataset) is absent from the checkpoint; loading then leaves it without state, as it was."""
    import torch.distributed.checkpoint as dcp

    prefix = "optimizer.state."
    saved = {
        key[len(prefix) :].rsplit(".", 1)[0]
        for key in dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        if key.startswith(prefix)
    }
    for fqn in [fqn for fqn in optimizer_state if fqn not in saved]:
        del optimizer_state[fqn]
