"""Atomic checkpoints: everything needed to continue a run exactly.

    output_dir/checkpoint-500/
        model.safetensors (+ config.json, processor files)   the policy, loadable with from_pretrained
        trainer_state.pt     EMA shadow, optimizer, scheduler, RNG states, data position, step, config
        sharded/             FSDP2 (fsdp_sharded_checkpoints): each rank's shards of the optimizer state and
                             EMA shadow, written by torch.distributed.checkpoint (see sharded_state.py)

A checkpoint is written into `checkpoint-500.tmp-<pid>` and renamed into place, so a crash never leaves a
half-written `checkpoint-500`; `latest_checkpoint` ignores temporary directories. A `checkpoint-500` that is
already there (a resumed run saving the same step again) is first renamed aside to `checkpoint-500.old-<pid>`
and deleted only once the new one is in place; `restore_replaced` puts it back if a crash came in between.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the legacy global state is what needs restoring
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model,
    trainer_state: dict,
    processor=None,
    save_total_limit: int = 0,
    state_dict: dict | None = None,
) -> Path:
    """Write checkpoint-<step> atomically, return its path; drop the oldest beyond save_total_limit.

    `state_dict`: the weights to write instead of the model's own (FSDP: the full state dict gathered on
    rank 0, see distributed.full_model_state)."""
    tmp = start_checkpoint(output_dir, step)
    write_checkpoint(tmp, model, trainer_state, processor, state_dict)
    return commit_checkpoint(tmp, save_total_limit)


def start_checkpoint(output_dir: str | Path, step: int) -> Path:
    """A fresh, empty `checkpoint-<step>.tmp-<pid>` to write into (other ranks may write their shards there
    too before `commit_checkpoint`)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f"checkpoint-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_checkpoint(tmp: Path, model, trainer_state: dict, processor=None, state_dict: dict | None = None):
    """The HF weights (+ config, processor files) and trainer_state.pt into the temporary directory."""
    if state_dict is None:
        model.save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if processor is not None:
        try:
            processor.save_pretrained(tmp)
        except Exception as e:  # noqa: BLE001 - an in-memory processor may not serialize; the weights matter
            warnings.warn(f"could not save the processor with the checkpoint: {e}", stacklevel=2)
    torch.save(trainer_state, tmp / "trainer_state.pt")


def commit_checkpoint(tmp: Path, save_total_limit: int = 0) -> Path:
    """Rename the finished temporary directory into `checkpoint-<step>`; keep the newest `save_total_limit`."""
    final = tmp.with_name(tmp.name.split(".tmp-")[0])
    replaced = None
    if final.exists():  # never delete the old one before the new one is in place
        replaced = final.with_name(f"{final.name}.old-{os.getpid()}")
        if replaced.exists():
            shutil.rmtree(replaced)
        os.replace(final, replaced)
    os.replace(tmp, final)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    if save_total_limit and save_total_limit > 0:
        for old in list_checkpoints(final.parent)[:-save_total_limit]:
            if old != final:  # the one just written stays, whatever else is there
                shutil.rmtree(old, ignore_errors=True)
    return final


def remove_unfinished(output_dir: str | Path) -> list[Path]:
    """Delete the `checkpoint-<step>.tmp-<pid>` directories a crashed run left behind (under FSDP they hold
    every rank's optimizer shards: gigabytes); return what was deleted. One whose <pid> is a live process on
    this machine is left alone (another run may be writing it). Call it before training starts."""
    removed = []
    for path in _left_behind(output_dir, ".tmp-"):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def restore_replaced(output_dir: str | Path) -> list[Path]:
    """Put back each `checkpoint-<step>.old-<pid>` whose replacement never arrived (a crash between the two
    renames of `commit_checkpoint`), delete those whose replacement did; return the restored checkpoints.
    Call it before looking for checkpoints."""
    restored = []
    for path in _left_behind(output_dir, ".old-"):
        final = path.with_name(path.name.rsplit(".old-", 1)[0])
        if final.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.replace(path, final)
            restored.append(final)
    return restored


def _left_behind(output_dir: str | Path, marker: str) -> list[Path]:
    """`checkpoint-<step><marker><pid>` directories whose <pid> is not another live process on this machine
    (this process's own are left over from an earlier run in it that raised)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in sorted(p for p in output_dir.glob(f"checkpoint-*{marker}*") if p.is_dir()):
        pid = path.name.rsplit(marker, 1)[1]
        if not (pid.isdigit() and int(pid) != os.getpid() and _is_running(int(pid))):
            found.append(path)
    return found


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return True


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if p.is_dir() and (m := _NAME.match(p.name)) and (p / "trainer_state.pt").is_file()
    ]
    return [p for _, p in sorted(found)]


def step_of(path: str | Path) -> int | None:
    """N of a `checkpoint-N` directory, None for a directory named otherwise."""
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'' -> None; 'latest' -> the newest checkpoint in output_dir (None if none); else that directory."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={resume!r} is not a checkpoint (no trainer_state.pt)"
        )
    return path


def load_policy_weights(model, checkpoint: str | Path) -> None:
    """Load the saved policy into `model` in place.

    The files are read back through `from_pretrained` (on CPU), which undoes the key renaming that
    `save_pretrained` applies for some architectures (Qwen2.5-VL's `model.visual` -> `visual`), then copied.
    """
    saved = type(model).from_pretrained(str(checkpoint), dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict(), strict=True)
    del saved


def load_trainer_state(checkpoint: str | Path) -> dict:
    return torch.load(Path(checkpoint) / "trainer_state.pt", map_location="cpu", weights_only=False)
