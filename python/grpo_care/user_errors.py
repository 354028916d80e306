"""Mistakes in what a user asked for, said in one line: the argument, where its value came from, what to do.

    raise UsageError("model_name_or_path: no such directory 'outputs/tiny/model'", source="set in c.yaml as ...",
                     hint="`python -m grpo_care.synthetic outputs/tiny` writes it")
    check_model_source(config.model_name_or_path, "model_name_or_path", "set in configs/tiny_cpu.yaml")
    check_file(config.train_file, "train_file", "given on the command line", what="annotation file")

`grpo-care` prints a UsageError as `grpo-care <command>: error: <message> (<source>); <hint>` and exits with
status 2 (`--debug` or GRPO_CARE_DEBUG=1: the traceback instead). A UsageError is a ValueError, so library
callers that catch ValueError keep working.

A model name that looks like a path (absolute, `./`, `~`, more than one `/`, a first component that is a local
directory, characters a hub id cannot have) and does not exist is reported here and never sent to the Hugging
Face hub, whose answer to it is `Repo id must be in the form 'repo_name' or 'namespace/repo_name'` or a failed
connection. A hub id (`name` or `namespace/name`) is checked against the local cache only when the hub is off.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

SYNTHETIC_COMMAND = "python -m grpo_care.synthetic outputs/tiny"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class UsageError(ValueError):
    """A user's mistake: `message` names the argument and says what is wrong with its value; `source` where that
    value came from ("given on the command line as --x 1", "set in c.yaml as x: 1", "the default"); `hint`
    what to do."""

    def __init__(self, message: str, *, source: str = "", hint: str = ""):
        super().__init__(message)
        self.message, self.source, self.hint = message, source, hint

    def __str__(self) -> str:
        text = self.message + (f" ({self.source})" if self.source else "")
        return text + (f"; {self.hint}" if self.hint else "")


def shown_path(path: str | Path) -> str:
    """'outputs/x under /the/working/dir' for a relative path (where it was looked for), else 'path'."""
    return f"{str(path)!r}" if Path(path).expanduser().is_absolute() else f"{str(path)!r} under {Path.cwd()}"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, whose errors (an unknown option, a missing value) are UsageErrors instead of usage + exit, and
    which takes options only by their full names: argparse's prefix matching would read `--lr 1e-5` as
    `--lr_scheduler_type 1e-5` and `--num_gen 4` as `--num_generations 4`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(message, source="on the command line", hint=f"`{self.prog} --help` lists the options")


def _writer_hint(path: str) -> str:
    """What writes `path`, when the project knows."""
    parts = Path(path).parts
    if parts[:2] == ("outputs", "tiny"):
        return f"`{SYNTHETIC_COMMAND}` writes it (the synthetic data set and tiny model of configs/tiny_cpu.yaml)"
    if any(re.fullmatch(r"checkpoint-\d+", part) for part in parts):
        return "`grpo-care train` writes checkpoint-N into its output_dir every save_steps; pass one that exists"
    return ""


def looks_local(name: str) -> bool:
    """True when `name` can only be a filesystem path, not a Hugging Face hub id (`name` or `namespace/name`)."""
    if not name or name.startswith(("/", "~", ".")) or "\\" in name or name.endswith("/"):
        return True
    if name.count("/") > 1 or not _HUB_ID.fullmatch(name):
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_model_source(name: str, argument: str, source: str = "") -> None:
    """A saved model directory (with config.json), or a hub id; else a UsageError that says why and what to do."""
    path = Path(name).expanduser()
    what_to_pass = f"pass a directory written by save_pretrained (e.g. a run's checkpoint-N) or a hub id such as " \
                   f"Qwen/Qwen2.5-VL-7B-Instruct to {argument}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{argument}: {shown_path(name)} is a directory without config.json, not a saved model",
                             source=source, hint=what_to_pass)
        return
    if path.exists():
        raise UsageError(f"{argument}: {shown_path(name)} is a file, not a model directory", source=source,
                         hint=what_to_pass)
    if looks_local(name):
        raise UsageError(f"{argument}: no such directory {shown_path(name)}", source=source,
                         hint=_writer_hint(name) or what_to_pass)
    if _hub_offline() and not _in_hub_cache(name):
        raise UsageError(
            f"{argument}: {name!r} is not a local directory, and the hub is off (HF_HUB_OFFLINE) with no copy of it "
            "in the Hugging Face cache", source=source,
            hint=(_writer_hint(name) or f"download it once with the hub on, or {what_to_pass}"))


def check_file(name: str, argument: str, source: str = "", what: str = "file") -> None:
    """An existing file, else a UsageError naming the argument (and what writes it, when the project knows)."""
    path = Path(name).expanduser()
    if path.is_file():
        return
    problem = "is a directory, not a file" if path.is_dir() else "does not exist"
    raise UsageError(f"{argument}: the {what} {shown_path(name)} {problem}", source=source,
                     hint=_writer_hint(name) or f"pass the path of an existing {what}")


def check_dir(name: str, argument: str, source: str = "", what: str = "directory") -> None:
    path = Path(name).expanduser()
    if path.is_dir():
        return
    problem = "is a file, not a directory" if path.exists() else "does not exist"
    raise UsageError(f"{argument}: the {what} {shown_path(name)} {problem}", source=source,
                     hint=_writer_hint(name) or f"pass an existing {what}")
