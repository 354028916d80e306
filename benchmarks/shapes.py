"""The shapes the benchmarks run: real LM heads, token counts scaled to the device, one plan per device.

Environment overrides (all optional):
  CK_BENCH_HEADS=qwen2.5-0.5b,llama-3-8b   heads to run (default: the device plan's)
  CK_BENCH_N=512,2048                      token counts for every log-prob case (default: the plan's)
  CK_BENCH_HEADLINE=auto|1|0               the big CPU headline case: run when the time budget allows
                                           (auto), always (1), never (0)
  CK_BENCH_ROUNDS=3                        timed rounds per case (default: chosen from the case's cost)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Head:
    """An LM head: hidden size H and vocabulary size V of a released model."""

    key: str
    model: str
    hidden: int
    vocab: int


HEADS = {
    h.key: h
    for h in (
        Head("qwen2.5-0.5b", "Qwen2.5-0.5B", 896, 151936),
        Head("qwen2.5-1.5b", "Qwen2.5-1.5B", 1536, 151936),
        Head("qwen2.5-vl-7b", "Qwen2.5-VL-7B", 3584, 152064),
        Head("llama-3-8b", "Llama-3-8B", 4096, 128256),
        Head("toy", "toy head (gpu_check.sh --dry-run)", 32, 300),
    )
}

LOGPROB_CASES = ("forward", "fwd_bwd", "entropy", "dual", "grpo_head")
GROUP_CASES = ("group_advantages", "answer_likelihood", "care_bonus")


@dataclass(frozen=True)
class Spec:
    """One benchmark: a case, a provider, a head, a token count, a dtype."""

    case: str
    provider: str
    head: str
    n: int
    dtype: str
    headline: bool = False

    @property
    def key(self) -> tuple:
        """Providers measured on the same key are compared with each other."""
        return (self.case, self.head, self.n, self.dtype)

    @property
    def group(self) -> str:
        return f"{self.case} {self.head} N={self.n} {self.dtype}"

    def __str__(self) -> str:
        return f"{self.head}-N{self.n}-{self.dtype}-{self.provider}"


@dataclass(frozen=True)
class Plan:
    device: str
    dtype: str
    heads: tuple[str, ...]
    n_by_case: dict
    headline: dict  # case -> token counts run only when the time budget allows
    group_rows: int  # B * G rewards for the group ops
    group_size: int
    answer_len: int  # T of answer_likelihood's [B*G, T]


CPU_PLAN = Plan(
    device="cpu",
    dtype="float32",
    heads=("qwen2.5-0.5b",),
    n_by_case={
        "forward": (512,),
        "fwd_bwd": (256, 512),
        "entropy": (256,),
        "dual": (512,),
        "grpo_head": (512,),
    },
    headline={"grpo_head": (2048,)},  # the issues' CPU goal: N=2048, H=896, V=151936, fp32
    group_rows=4096 * 8,
    group_size=8,
    answer_len=256,
)

GPU_PLAN = Plan(
    device="cuda",
    dtype="bfloat16",
    heads=("qwen2.5-vl-7b",),
    n_by_case={
        "forward": (16384,),
        "fwd_bwd": (4096, 16384, 65536),
        "entropy": (16384,),
        "dual": (16384,),
        "grpo_head": (16384,),
    },
    headline={},
    group_rows=8192 * 8,  # the Python-loop baseline syncs once per group
    group_size=8,
    answer_len=1024,
)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plan() -> Plan:
    return GPU_PLAN if device().type == "cuda" else CPU_PLAN


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name, "").strip()
    return [x.strip() for x in raw.split(",") if x.strip()] or None


def heads() -> tuple[str, ...]:
    chosen = _env_list("CK_BENCH_HEADS") or list(plan().heads)
    unknown = [h for h in chosen if h not in HEADS]
    if unknown:
        raise ValueError(f"CK_BENCH_HEADS: unknown heads {unknown}; choose from {sorted(HEADS)}")
    return tuple(chosen)


def token_counts(case: str) -> tuple[tuple[int, bool], ...]:
    """(N, is_headline) pairs for a log-prob case on this device."""
    override = _env_list("CK_BENCH_N")
    if override:
        return tuple((int(n), False) for n in override)
    p = plan()
    regular = tuple((n, False) for n in p.n_by_case.get(case, ()))
    return regular + tuple((n, True) for n in p.headline.get(case, ()))


def batch_layout(n: int) -> tuple[int, int]:
    """N tokens as B sequences of T tokens (GRPO completions), T a power of two up to 1024."""
    t = 1
    while t * 2 <= min(n, 1024) and n % (t * 2) == 0:
        t *= 2
    return n // t, t


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def specs(case: str, providers: list[str]) -> list[Spec]:
    p = plan()
    if case in GROUP_CASES:
        return [Spec(case, prov, "groups", p.group_rows, "float32") for prov in providers]
    out = []
    for head in heads():
        for n, headline in token_counts(case):
            out += [Spec(case, prov, head, n, p.dtype, headline) for prov in providers]
    return out
