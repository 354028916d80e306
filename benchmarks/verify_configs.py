"""gpu_check phase (c): every Triton config and timed code path of the log-prob kernels, run on this GPU, against
float64.

    python benchmarks/verify_configs.py --out verified.json [--budget-s 170] [--toy]

Each config of each family that care_kernels.triton.verified gates ("forward 16-bit", "forward fp32",
"dlogits 16-bit", "dlogits fp32") and each config of the cuBLAS strategies' two slab passes ("slab stats",
"slab dlogits") is launched as is (no autotuning) and checked within twice the error of the same computation in
torch at the operands' dtype, against float64 (care_kernels.testing.assert_error_within), on:
  - a shape with tails: rows past a tile, a K tail, columns past V (N=2300, H=1000, V=151937): the forward dual
    with the entropy, without a bias and with one on the policy only (where the config may run with a bias); the
    backward with a bias and both output gradients;
  - the benchmark's shape (Qwen2.5-VL-7B head, N=16384, bf16), launched as the timing phase launches it (the GRPO
    head's dual forward and backward, the single forward of the two-singles line), so that phase finds the kernels
    compiled in Triton's cache.
Configs that are no candidates on this GPU (warp-specialized ones off Hopper) and variants a config never runs
in (a bias with a config pruned for spilling with one) are skipped, with the reason.

The code paths `auto` chooses by timing (verified.PATHS), run as a user's call runs them (autotuned):
  - "logits GEMM strategy" cublas and cublas16: forced, the same forward and backward checks as a config's;
  - "fused head variant" one_sweep, one_sweep_tall (and the always-on two_sweeps): the chunk loop
    (fused_head_chunks) on the tails shape (bias, a reference model, the entropy, three chunks but for the tall
    variant) and the benchmark's shape (a reference model: the benchmark's call): log-probs, the reference's,
    entropy, and the hidden, weight and bias gradients of sum(g * logp);
  - "row pass": each config of the one-sweep variants' row pass (row_stats_probs_), launched as is: statistics
    and the in-place (onehot - p) / T on a tails buffer.
A path is recorded as passed only when its own checks and every config of the passes it autotunes (slab passes for
the strategies, the row pass for the one-sweep variants) passed: its autotuner may pick any of them.

Isolation: worker processes (--workers at once: compiling is CPU work, the GPU has room) take the configs one at a
time and report each verdict as it comes. A worker that dies (it exits at the first CUDA error: a fault that
corrupts the context fails every later launch) or hangs (no verdict within --config-timeout-s) is replaced by a
fresh one that goes on with the next config; the config it was on is recorded as failed, with what happened.
Configs that --budget-s leaves no time for are listed as not run.

Output: the verification record (format: care_kernels/triton/verified.py) at --out, rewritten after every verdict,
so a killed run keeps what it finished; a one-line-per-config report on stdout.

--toy: the same walk on a CPU at toy sizes under the Triton interpreter (gpu_check.sh --dry-run, tested in CI),
where each config's code path (loop shape, TMA loads, persistent programs, warp specialization's loop nest) runs
with the interpreter's tile. Its record has arch "interpreter": it never counts for a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import select
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

IGNORE = -100
MARK = "CK_VERIFY"


# ------------------------------------------------------------------------------------------------ the jobs


ROW_PASS = "row pass"
# The passes a code path autotunes: it is recorded as passed only with every config of them passed.
PASSES_OF = {"logits GEMM strategy": ("slab stats", "slab dlogits"), "fused head variant": (ROW_PASS,)}


def jobs() -> list[tuple[str, str]]:
    """(family, label) of every config and code path to check, the ones whose verdict decides something first: the
    gated configs, the gated paths, the configs of the passes those paths autotune, then the always-on ones."""
    from care_kernels.triton import cublas_logits, row_epilogue, verified
    from care_kernels.triton import linear_logprobs as tlp

    gated, always = [], []
    for family, configs in tlp.config_families().items():
        for config in configs:
            (gated if verified.needs_verification(config) else always).append((family, tlp.config_label(config)))
    paths = [(family, name) for family, names in verified.PATHS.items() for name in names
             if name not in verified.ALWAYS_ON[family]]  # fmt: skip
    passes = [("slab stats", tlp.config_label(c)) for c in cublas_logits.FOLD_CONFIGS]
    passes += [("slab dlogits", tlp.config_label(c)) for c in cublas_logits.GRAD_CONFIGS]
    passes += [(ROW_PASS, tlp.config_label(c)) for c in row_epilogue.PROBS_CONFIGS]
    # the fused strategy runs in every config check; the two-sweep loop has its own
    always_paths = [(verified.HEAD_FAMILY, name) for name in verified.ALWAYS_ON[verified.HEAD_FAMILY]]
    order = ("forward 16-bit", "dlogits 16-bit", "forward fp32", "dlogits fp32")
    by_order = lambda job: order.index(job[0])  # noqa: E731
    return sorted(gated, key=by_order) + paths + passes + sorted(always, key=by_order) + always_paths


def _is_path(family: str) -> bool:
    from care_kernels.triton import verified

    return family in verified.PATHS


def _config(family: str, label: str):
    """The config object a job checks (a code path's job: its name)."""
    from care_kernels.triton import cublas_logits, row_epilogue
    from care_kernels.triton import linear_logprobs as tlp

    if _is_path(family):
        return label
    if family.startswith("slab"):
        configs = cublas_logits.FOLD_CONFIGS if family == "slab stats" else cublas_logits.GRAD_CONFIGS
    elif family == ROW_PASS:
        configs = row_epilogue.PROBS_CONFIGS
    else:
        configs = tlp.config_families()[family]
    return next(c for c in configs if tlp.config_label(c) == label)


# ------------------------------------------------------------------------------------------------ inputs, truth


class Shapes:
    """The shapes the checks run on: real ones on a GPU, toy ones under the interpreter."""

    def __init__(self, toy: bool):
        self.toy = toy
        # n, h, v: rows past a tile, a K tail (H % 64 != 0), columns past V
        self.tails = (37, 48, 600) if toy else (2300, 1000, 151937)
        self.bench = (64, 64, 512) if toy else (16384, 3584, 152064)
        self.rows_per_chunk = 4096 if toy else 1024  # of the float64 references


def make_inputs(n, h, v, dtype, device, *, seed, bias=False, dual=False):
    """hidden [n, h], weight [v, h] (logits of std ~2), bias [v] or None, targets [n] (10% ignored), and a
    reference model close to the policy (dual)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape, scale=1.0: torch.randn(*shape, generator=gen, device=device).mul_(scale)  # noqa: E731
    hidden, weight = randn(n, h), randn(v, h, scale=2.0 / h**0.5)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    targets[torch.rand(n, generator=gen, device=device) < 0.1] = IGNORE
    inputs = {"hidden": hidden.to(dtype), "weight": weight.to(dtype), "targets": targets,
              "bias": randn(v, scale=0.5).to(dtype) if bias else None}  # fmt: skip
    if dual:
        inputs["ref_hidden"] = (hidden + randn(n, h, scale=0.1)).to(dtype)
        inputs["ref_weight"] = (weight + randn(v, h, scale=0.01)).to(dtype)
    return inputs


def reference(hidden, weight, bias, targets, temperature, g_lp, g_ent, dtype, rows_per_chunk, *, grads):
    """(logprobs, entropy, lse[, grad_hidden, grad_weight, grad_bias]) of the materialized computation in `dtype`,
    row chunk by row chunk: logits = hidden @ weight.T + bias in `dtype` (rounded to it), the softmax statistics
    in at least float32 and their gradient by autograd (care_kernels.reference.naive's computation); the logits'
    gradient then goes through the two matmuls in `dtype`, as autograd would, with the weight and bias gradients
    summed over chunks in float64 (float32 for a 16-bit `dtype`: its own rounding is far larger). No [V, H]
    tensor is made per chunk."""
    import torch

    stat = torch.float64 if dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype)
    b = None if bias is None else bias.detach().to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if grads else None
    grad_b = torch.zeros(w.shape[0], dtype=acc, device=w.device) if grads and b is not None else None
    outs, grad_h = [], []
    for start in range(0, hidden.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        h, y = hidden[rows].detach().to(dtype), targets[rows]
        logits = h @ w.T
        if b is not None:
            logits = logits + b
        logits.requires_grad_(grads)
        with torch.enable_grad() if grads else torch.no_grad():
            z = logits.to(stat) / temperature
            logp_all = torch.log_softmax(z, dim=-1)
            valid = y != IGNORE
            lp = torch.where(valid, logp_all.gather(-1, torch.where(valid, y, 0)[:, None])[:, 0], 0.0)
            ent = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
            lse = torch.logsumexp(z.detach(), dim=-1)
            if grads:
                loss = (lp * g_lp[rows].to(stat)).sum()
                if g_ent is not None:
                    loss = loss + (ent * g_ent[rows].to(stat)).sum()
                (dz,) = torch.autograd.grad(loss, logits)
                grad_h.append(dz @ w)
                if dtype == acc:
                    grad_w.addmm_(dz.T, h)
                else:  # this chunk's product rounded to `dtype`, as autograd's would be, then summed
                    grad_w.add_(dz.T @ h)
                if grad_b is not None:
                    grad_b += dz.sum(0).to(acc)
        outs.append((lp.detach(), ent.detach(), lse))
        del logits, z, logp_all
    cat = tuple(torch.cat([o[i] for o in outs]) for i in range(3))
    if not grads:
        return cat
    return (*cat, torch.cat(grad_h), grad_w, grad_b)


class Truths:
    """float64 references and same-dtype torch baselines, computed once per worker and case. Workers compute
    theirs one at a time (a lock file): the benchmark shape's backward needs ~15 GB while it runs."""

    def __init__(self, shapes: Shapes):
        self.shapes = shapes
        self.cache: dict = {}

    def get(self, name, inputs, temperature, g_lp, g_ent, *, grads, model=""):
        key = (name, model, grads)
        if key not in self.cache:
            import fcntl

            import torch

            prefix = "ref_" if model == "ref" else ""
            model_args = (inputs[prefix + "hidden"], inputs[prefix + "weight"], inputs.get(prefix + "bias"))
            args = (*model_args, inputs["targets"], temperature, g_lp, g_ent)
            chunk = self.shapes.rows_per_chunk
            with open(os.path.join(os.environ.get("TMPDIR", "/tmp"), "ck_verify_truth.lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                truth = reference(*args, torch.float64, chunk, grads=grads)
                base = reference(*args, inputs["hidden"].dtype, chunk, grads=grads)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the transients go back for the other workers
            self.cache[key] = (truth, base)
        return self.cache[key]


# ------------------------------------------------------------------------------------------------ forcing a config


class _Patch:
    """setattr / setitem that can be undone (a small monkeypatch)."""

    def __init__(self):
        self.undo = []

    def attr(self, obj, name, value):
        old = getattr(obj, name)
        self.undo.append(lambda: setattr(obj, name, old))
        setattr(obj, name, value)

    def item(self, mapping, key, value):
        self.undo.append(lambda old=mapping[key]: mapping.__setitem__(key, old))
        mapping[key] = value

    def restore(self):
        while self.undo:
            self.undo.pop()()


@contextlib.contextmanager
def forced(family: str, config, toy: bool, slab_strategy: str = "cublas"):
    """Launch `config` as is wherever its family's kernel runs (on a GPU), or its code path under the
    interpreter (toy). The logits GEMM runs in the fused kernels, or in cuBLAS for the slab families
    (slab_strategy: cublas, an fp32 slab, or cublas16, a 16-bit one)."""
    from care_kernels.triton import cublas_logits, logits_gemm, tuning
    from care_kernels.triton import linear_logprobs as tlp

    patch = _Patch()
    try:
        patch.attr(tlp, "_TUNE_FROM_N_CLASS", 99)  # the list's first config, launched untuned: ours
        if family == ROW_PASS:
            from care_kernels.triton import row_epilogue

            tuned = tuning.autotune([config], ["V", "WITH_ENTROPY"], restore_value=["z_ptr"])
            patch.attr(row_epilogue, "_probs_tuned", tuned(row_epilogue._row_stats_probs_kernel))
            strategy = "fused"
        elif family.startswith("slab"):
            if family == "slab stats":
                name, kernel, keys = "_fold_tuned", cublas_logits.logits_slab_stats_kernel, ["HAS_BIAS", "WITH_ENTROPY"]
            else:
                name, kernel, keys = (
                    "_grad_tuned",
                    cublas_logits.logits_slab_grad_kernel,
                    ["HAS_BIAS", "HAS_GRAD_ENTROPY"],
                )
            patch.attr(cublas_logits, name, tuning.autotune([config], keys)(kernel))
            strategy = slab_strategy
        else:
            forward = family.startswith("forward")
            if toy:
                flags = tlp.INTERPRETER_FORWARD if forward else tlp.INTERPRETER_BACKWARD
                patch.attr(tlp, "INTERPRETER_FORWARD" if forward else "INTERPRETER_BACKWARD",
                           {k: config.kwargs[k] for k in flags})  # fmt: skip
            else:
                lists = tlp._FWD_LISTS if forward else tlp._BWD_LISTS
                for list_name in ("fp32",) if family.endswith("fp32") else ("16-bit", "16-bit TMA"):
                    patch.item(lists, list_name, (lists[list_name][0], [config]))
            strategy = "fused"
        with logits_gemm.use(strategy):
            yield
    finally:
        patch.restore()


def _slab_strategies(device) -> list[str]:
    """The cuBLAS strategies that can run here (the fp32 slab needs torch's fp32-output GEMM for bf16)."""
    import torch

    from care_kernels.triton import cublas_logits

    probe = torch.zeros(1, 1, dtype=torch.bfloat16, device=device)
    return [name for name, usable in (("cublas", cublas_logits.usable), ("cublas16", cublas_logits.usable16))
            if usable(probe)]  # fmt: skip


def runnable(family: str, config, toy: bool, device) -> str:
    """Why `config` (a code path: its name) is no candidate here ("" when it is one)."""
    import torch

    from care_kernels.triton import linear_logprobs as tlp
    from care_kernels.triton import verified

    if family == verified.STRATEGY_FAMILY:
        return "" if config in _slab_strategies(device) else f"{config} cannot run here (cublas_logits.usable)"
    if family in (verified.HEAD_FAMILY, ROW_PASS):
        return ""
    if family.startswith("slab"):
        return "" if _slab_strategies(device) else "neither cuBLAS strategy can run here"
    if tlp.warp_specialized(config) and not toy:
        if torch.cuda.get_device_capability(device)[0] != 9:
            return "warp-specialized configs run on Hopper (sm_90) only"
    return ""


# ------------------------------------------------------------------------------------------------ the checks


def _within(name, got, truth, base, errors):
    from care_kernels.testing import assert_error_within

    try:
        assert_error_within(got, truth, base, name=name)
    except AssertionError as exc:
        errors.append(str(exc))


def check_forward(family, config, shapes, truths, device, toy) -> list[str]:
    """The forward variants of one config; returns the names of the checks run (raises AssertionError)."""
    import torch

    from care_kernels.triton import linear_logprobs as tlp

    dtype = torch.float32 if family.endswith("fp32") else torch.bfloat16
    ran, errors = [], []
    variants = [("tails dual entropy", shapes.tails, True, False)]
    if isinstance(config, str) or not tlp.spills_with_bias(config):  # a strategy (str) runs with a bias
        variants.append(("tails dual entropy policy-bias", shapes.tails, True, True))
    if dtype == torch.bfloat16:
        variants += [("bench dual", shapes.bench, False, False), ("bench single", shapes.bench, False, False)]
    for name, (n, h, v), with_entropy, bias in variants:
        seed = 1 if name.startswith("tails") else 2
        inputs = make_inputs(n, h, v, dtype, device, seed=seed + 10 * bias, bias=bias, dual=True)
        dual = "single" not in name
        temperature = 0.7 if name.startswith("tails") else 1.0
        lp, ent, lse, ref_lp = tlp.forward(
            inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"], temperature=temperature,
            ignore_index=IGNORE, with_entropy=with_entropy,
            **({"ref_hidden": inputs["ref_hidden"], "ref_weight": inputs["ref_weight"]} if dual else {}),
        )  # fmt: skip
        zeros = torch.zeros(n, device=device)
        data_name = f"{name.split()[0]} {dtype} bias={bias}"
        truth, base = truths.get(data_name, inputs, temperature, zeros, None, grads=False)
        for what, got, t, b in zip(("logprobs", "entropy", "lse"), (lp, ent, lse), truth, base):
            if what != "entropy" or with_entropy:
                _within(f"{name}: {what}", got, t, b, errors)
        if dual:
            truth, base = truths.get(data_name, inputs, temperature, zeros, None, grads=False, model="ref")
            _within(f"{name}: ref_logprobs", ref_lp, truth[0], base[0], errors)
        if not toy:
            torch.cuda.synchronize()
        ran.append(name)
    if errors:
        raise AssertionError("; ".join(errors))
    return ran


def check_backward(family, config, shapes, truths, device, toy) -> list[str]:
    import torch

    from care_kernels.triton import linear_logprobs as tlp
    from care_kernels.triton import logits_gemm

    dtype = torch.float32 if family.endswith("fp32") else torch.bfloat16
    variants = [("tails bias grad-entropy", shapes.tails, True)]
    if dtype == torch.bfloat16:
        variants.append(("bench", shapes.bench, False))
    ran, errors = [], []
    for name, (n, h, v), with_entropy in variants:
        bias = with_entropy  # the tails case has both, the benchmark's launch neither
        inputs = make_inputs(n, h, v, dtype, device, seed=3 if bias else 4, bias=bias)
        gen = torch.Generator(device=device).manual_seed(5)
        g_lp = torch.randn(n, generator=gen, device=device)
        g_ent = torch.randn(n, generator=gen, device=device) if with_entropy else None
        temperature = 0.7 if bias else 1.0
        args = (inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"])
        # the forward's statistics from the always-on first config (this family is the backward's), from logits of
        # the backward's precision (a cublas16 backward reads 16-bit logits: its forward must have too)
        forward_family = "forward fp32" if dtype == torch.float32 else "forward 16-bit"
        if logits_gemm.requested() == "cublas16":
            with logits_gemm.use("cublas16"):
                _, ent, lse, _ = tlp.forward(*args, temperature=temperature, ignore_index=IGNORE,
                                             with_entropy=with_entropy)  # fmt: skip
        else:
            with forced(forward_family, tlp.config_families()[forward_family][0], toy):
                _, ent, lse, _ = tlp.forward(*args, temperature=temperature, ignore_index=IGNORE,
                                             with_entropy=with_entropy)  # fmt: skip
        grads = tlp.backward(g_lp, g_ent, *args, lse, ent, temperature=temperature, ignore_index=IGNORE)
        truth, base = truths.get(f"{name} {dtype}", inputs, temperature, g_lp, g_ent, grads=True)
        for what, got, t, b in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, truth[3:], base[3:]):
            if t is None:
                if got is not None:
                    errors.append(f"{name}: {what} returned without a bias")
                continue
            _within(f"{name}: {what}", got, t, b, errors)
        if not toy:
            torch.cuda.synchronize()
        ran.append(name)
    if errors:
        raise AssertionError("; ".join(errors))
    return ran


def _row_truth(z, targets, temperature, stat_dtype, out_dtype):
    """(logprobs, lse, entropy, q) of the row pass on buffer z [n, V]: statistics of z / T in stat_dtype, and
    q = (onehot(y) - softmax(z / T)) / T rounded to out_dtype (zero one-hot at ignored targets), a few rows at a
    time."""
    import torch

    outs = []
    for rows in torch.split(torch.arange(z.shape[0], device=z.device), 256):
        zz = z[rows].to(stat_dtype) / temperature
        y = targets[rows]
        valid = y != IGNORE
        lse = zz.logsumexp(-1)
        p = (zz - lse[:, None]).exp()
        safe = torch.where(valid, y, 0)
        logp = torch.where(valid, zz.gather(1, safe[:, None])[:, 0] - lse, 0.0)
        ent = torch.where(valid, lse - (p * zz).sum(-1), 0.0)
        q = (-p).scatter_add_(1, safe[:, None], valid.to(p.dtype)[:, None]).div_(temperature)
        outs.append((logp, lse, ent, q.to(out_dtype)))
    return tuple(torch.cat([o[i] for o in outs]) for i in range(4))


def check_row_pass(family, config, shapes, truths, device, toy) -> list[str]:
    """One config of the one-sweep row pass (row_stats_probs_, forced to it) on a bf16 buffer of the tails shape's
    rows and vocabulary: log-probs, lse, entropy and the in-place q, against float64."""
    import torch

    from care_kernels.triton import row_epilogue

    n, _, v = shapes.tails
    gen = torch.Generator(device=device).manual_seed(6)
    z = (torch.randn(n, v, generator=gen, device=device) * 2.0).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    targets[torch.rand(n, generator=gen, device=device) < 0.1] = IGNORE
    truth = _row_truth(z, targets, 0.7, torch.float64, torch.float64)
    base = _row_truth(z, targets, 0.7, torch.float32, torch.bfloat16)
    buf = z.clone()
    got = row_epilogue.row_stats_probs_(buf, targets, 0.7, IGNORE, with_entropy=True)
    errors: list[str] = []
    for what, x, t, b in zip(("logprobs", "lse", "entropy", "q"), (*got, buf), truth, base):
        _within(f"tails: {what}", x, t, b, errors)
    if not toy:
        torch.cuda.synchronize()
    if errors:
        raise AssertionError("; ".join(errors))
    return ["tails entropy"]


def check_head(family, name, shapes, truths, device, toy) -> list[str]:
    """One variant of the fused GRPO head's chunk loop (fused_head_chunks), called as `run` calls it, with a loss
    gradient g per token that does not depend on its log-prob: the log-probs (the reference's, the entropy) and
    the gradients of sum(g * logp)."""
    import torch

    from care_kernels.losses import fused_head_chunks as chunks

    dtype = torch.bfloat16
    # bias, entropy, temperature, chunks (None: the loss's default 1 GiB buffer); the benchmark's call last (and what
    # phase d compiles)
    cases = [("head tails", shapes.tails, True, True, 0.7, 3), ("bench", shapes.bench, False, False, 1.0, None)]
    ran, errors = [], []
    for case, (n, h, v), bias, with_entropy, temperature, n_chunks in cases:
        inputs = make_inputs(n, h, v, dtype, device, seed=3 if bias else 4, bias=bias, dual=True)
        g = torch.randn(n, generator=torch.Generator(device=device).manual_seed(5), device=device)
        ref = (inputs["ref_hidden"], inputs["ref_weight"], None)
        inp = chunks.HeadInputs(inputs["hidden"], inputs["targets"], inputs["weight"], inputs["bias"], ref,
                                temperature, IGNORE)  # fmt: skip
        size = torch.finfo(chunks.buffer_dtype(inp.weight)).bits // 8
        buffer_bytes = -(-n // n_chunks) * v * size if n_chunks else 1 << 30
        rows = n if name == "one_sweep_tall" else chunks.chunk_rows(n, v, chunks.buffer_dtype(inp.weight), buffer_bytes)
        loop = chunks.two_sweeps if name == "two_sweeps" else chunks.one_sweep
        got = loop(inp, lambda logp, ref_logp, sel, g=g: g[sel], rows, with_entropy)
        data_name = f"{case} {dtype}"  # "bench ...": the dlogits checks' data and truth (seeds 4 and 5), computed once
        truth, base = truths.get(data_name, inputs, temperature, g, None, grads=True)
        outputs = [("logprobs", got.logp, truth[0], base[0]), ("grad_hidden", got.grad_hidden, truth[3], base[3]),
                   ("grad_weight", got.grad_weight, truth[4], base[4])]  # fmt: skip
        if with_entropy:
            outputs.append(("entropy", got.entropy, truth[1], base[1]))
        if bias:
            outputs.append(("grad_bias", got.grad_bias, truth[5], base[5]))
        ref_truth, ref_base = truths.get(data_name, inputs, temperature, g, None, grads=False, model="ref")
        outputs.append(("ref_logprobs", got.ref_logp, ref_truth[0], ref_base[0]))
        for what, x, t, b in outputs:
            _within(f"{case}: {what}", x, t, b, errors)
        if not toy:
            torch.cuda.synchronize()
        ran.append(f"{case} ({-(-n // rows)} chunks)")
        del got
    if errors:
        raise AssertionError("; ".join(errors))
    return ran


def check(family, config, shapes, truths, device, toy) -> list[str]:
    """Every check of one config or code path; a slab pass's configs under both cuBLAS strategies (fp32 and 16-bit
    slabs); a strategy forced, its slab passes autotuned as a user's call tunes them."""
    from care_kernels.triton import logits_gemm, verified

    if family == verified.STRATEGY_FAMILY:
        with logits_gemm.use(config):
            forward = check_forward(family, config, shapes, truths, device, toy)
            return [f"forward {name}" for name in forward] + [
                f"backward {name}" for name in check_backward(family, config, shapes, truths, device, toy)]  # fmt: skip
    if family == verified.HEAD_FAMILY:
        return check_head(family, config, shapes, truths, device, toy)
    if family == ROW_PASS:
        with forced(family, config, toy):
            return check_row_pass(family, config, shapes, truths, device, toy)
    family_check = check_forward if family in ("forward 16-bit", "forward fp32", "slab stats") else check_backward
    if not family.startswith("slab"):
        with forced(family, config, toy):
            return family_check(family, config, shapes, truths, device, toy)
    ran = []
    for strategy in _slab_strategies(device):
        with forced(family, config, toy, strategy):
            ran += [f"{strategy}: {name}" for name in family_check(family, config, shapes, truths, device, toy)]
    return ran


# ------------------------------------------------------------------------------------------------ the worker


def _cuda_broken(exc: BaseException) -> bool:
    """Whether the CUDA context is unusable after `exc` (every later launch would fail too)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() != 2.0
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return True


def _one_percent_off(out: tuple) -> tuple:
    return (out[0] * 1.01, *out[1:])


@contextlib.contextmanager
def _planted(family: str, label: str):
    """CK_VERIFY_PLANT="family/label=crash|hang|raise|wrong[;...]": plant a failure in a config's check (tests of
    the isolation and of the checks themselves, on a CPU); wrong: the pass's first output is off by 1%."""
    from care_kernels.triton import linear_logprobs as tlp
    from care_kernels.triton import verified

    patch = _Patch()
    for item in filter(None, os.environ.get("CK_VERIFY_PLANT", "").split(";")):
        target, _, kind = item.rpartition("=")
        if target != f"{family}/{label}":
            continue
        if kind == "crash":
            os._exit(7)
        if kind == "hang":
            time.sleep(3600)
        if kind != "wrong":
            raise RuntimeError(f"planted failure in {target}")
        if family == verified.HEAD_FAMILY:
            from care_kernels.losses import fused_head_chunks as chunks

            for name in ("two_sweeps", "one_sweep"):
                real = getattr(chunks, name)
                patch.attr(chunks, name, lambda *a, real=real, **k: dataclasses.replace(
                    (out := real(*a, **k)), logp=out.logp * 1.01))  # fmt: skip
        elif family == ROW_PASS:
            from care_kernels.triton import row_epilogue

            real = row_epilogue.row_stats_probs_
            patch.attr(row_epilogue, "row_stats_probs_", lambda *a, real=real, **k: _one_percent_off(real(*a, **k)))
        else:
            name = "forward" if family in ("forward 16-bit", "forward fp32", "slab stats") else "backward"
            real = getattr(tlp, name)
            patch.attr(tlp, name, lambda *a, real=real, **k: _one_percent_off(real(*a, **k)))
    try:
        yield
    finally:
        patch.restore()


def worker(toy: bool) -> int:
    """Read job numbers from stdin, one per line; report each verdict on stdout; exit at EOF, or after a CUDA
    error that leaves the context unusable (the verdict then says restart)."""
    import torch

    device = torch.device("cpu" if toy else "cuda")
    all_jobs = jobs()
    shapes = Shapes(toy)
    truths = Truths(shapes)
    print(f"{MARK} READY", flush=True)
    for line in sys.stdin:
        index = int(line)
        family, label = all_jobs[index]
        config = _config(family, label)
        start = time.monotonic()
        verdict = {"job": index, "family": family, "label": label}
        broken = False
        why_not = runnable(family, config, toy, device)
        if why_not:
            verdict.update(status="skipped", detail=why_not)
        else:
            try:
                with _planted(family, label):
                    verdict.update(status="passed", checks=check(family, config, shapes, truths, device, toy))
            except AssertionError as exc:
                verdict.update(status="failed", detail=f"wrong results: {exc}")
            except Exception as exc:  # noqa: BLE001 - the verdict on this config, whatever went wrong
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                verdict.update(status="failed", detail=f"raised {detail[:1500]}")
                broken = _cuda_broken(exc)
        verdict.update(seconds=round(time.monotonic() - start, 1), restart=broken)
        print(f"{MARK} DONE {json.dumps(verdict)}", flush=True)
        if broken:
            print(f"{MARK}: the CUDA context is broken after {label}: a fresh worker goes on", file=sys.stderr)
            return 3
    return 0


# ------------------------------------------------------------------------------------------------ the driver


def _hold_back_paths(passed: dict, failed: dict, other: dict) -> list[str]:
    """A code path that passed its own checks stays passed only when every config of the passes it autotunes
    (PASSES_OF; not those of the always-on paths, which run none of them) passed too: else it is failed (one of
    them failed) or not checked (some were not run). Moves it in place; returns what it moved, one line each."""
    from care_kernels.triton import verified

    moved = []
    for family, pass_families in PASSES_OF.items():
        failing = [f"{pf}/{label}" for pf in pass_families for label in failed.get(pf, {})]
        unchecked = [f"{pf}/{label}" for pf in pass_families for label in other.get(pf, {})]
        keep = []
        for name in passed.get(family, []):
            if name in verified.ALWAYS_ON[family] or not (failing or unchecked):
                keep.append(name)
            elif failing:
                failed.setdefault(family, {})[name] = f"its own checks passed, but configs it may run failed: {failing}"
                moved.append(f"{family}/{name}: failed (configs it may run failed: {', '.join(failing)})")
            else:
                other.setdefault(family, {})[name] = f"its own checks passed; not all configs it may run: {unchecked}"
                moved.append(f"{family}/{name}: not recorded as passed ({len(unchecked)} configs it may run unchecked)")
        if family in passed:
            passed[family] = keep
    return moved


def _record(verdicts: dict[int, dict], all_jobs, toy: bool, about: dict) -> dict:
    from care_kernels.triton import verified

    passed: dict[str, list[str]] = {}
    failed: dict[str, dict[str, str]] = {}
    other: dict[str, dict[str, str]] = {}
    for index, (family, label) in enumerate(all_jobs):
        v = verdicts.get(index, {"status": "not run", "detail": "no time left in the budget"})
        if v["status"] == "passed":
            passed.setdefault(family, []).append(label)
        elif v["status"] == "failed":
            failed.setdefault(family, {})[label] = v["detail"]
        else:
            other.setdefault(family, {})[label] = f"{v['status']}: {v.get('detail', '')}"
    held_back = _hold_back_paths(passed, failed, other)
    passed = {family: labels for family, labels in passed.items() if labels}
    if toy:
        import torch
        import triton

        record = {"arch": "interpreter", "device": "cpu (Triton interpreter, toy sizes)", "triton": triton.__version__,
                  "torch": torch.__version__, "kernel_fingerprint": verified.kernel_fingerprint(),
                  "fingerprints": verified.fingerprints(), **about,
                  "passed": {k: sorted(v) for k, v in passed.items()}, "failed": failed}  # fmt: skip
    else:
        import torch

        record = verified.make_record(passed, failed, torch.device("cuda"), **about)
    record["not_checked"] = other
    record["held_back"] = held_back
    return {"format": verified.FORMAT, "records": [record]}


def _write(path: Path, data: dict) -> None:
    """Write the record file whole or not at all (phase d reads it; a kill mid-write must not leave half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


class _Worker:
    """One worker process and the lines it writes (read with a time limit)."""

    def __init__(self, toy: bool, echo):
        cmd = [sys.executable, __file__, "--worker"] + (["--toy"] if toy else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.echo = echo

    def expect(self, prefix: str, deadline: float) -> str | None:
        """The rest of the next line starting with `prefix` (other lines echoed); "" if the worker ended, None if
        the deadline passed first."""
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            line = self.proc.stdout.readline()
            if line == "":
                return ""
            if line.startswith(prefix):
                return line[len(prefix) :].strip() or " "
            self.echo(line.rstrip("\n"))

    def send(self, index: int) -> bool:
        try:
            self.proc.stdin.write(f"{index}\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def stop(self, kill: bool) -> int:
        if kill:
            self.proc.kill()
        else:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def drive(args) -> int:
    all_jobs = jobs()
    verdicts: dict[int, dict] = {}
    queue, per_family = [], {}
    for index, (family, label) in enumerate(all_jobs):
        per_family[family] = per_family.get(family, 0) + 1
        if args.max_per_family and per_family[family] > args.max_per_family:
            verdicts[index] = {"job": index, "family": family, "label": label, "status": "not run",
                               "detail": f"--max-per-family {args.max_per_family}"}  # fmt: skip
        else:
            queue.append(index)
    start = time.monotonic()
    stop_at = start + args.budget_s
    about = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "commit": os.environ.get("CK_GIT_COMMIT", ""), "tool": "benchmarks/verify_configs.py"}  # fmt: skip
    lock = threading.Lock()
    failed_starts = [0]

    def echo(text: str) -> None:
        with lock:
            print(text, flush=True)

    def record(verdict: dict) -> None:
        with lock:
            verdicts[verdict["job"]] = verdict
            extra = ", ".join(verdict.get("checks", [])) if verdict["status"] == "passed" else verdict.get("detail", "")
            print(f"{verdict['status']:>7}  {verdict['family']:<20} {verdict['label']:<40} "
                  f"{verdict.get('seconds', 0):6.1f} s  {extra[:300]}", flush=True)  # fmt: skip
            _write(args.out, _record(verdicts, all_jobs, args.toy, about))

    def lost(index: int, status: str, detail: str) -> None:
        family, label = all_jobs[index]
        record({"job": index, "family": family, "label": label, "status": status, "detail": detail})

    def slot() -> None:
        worker = None
        while time.monotonic() < stop_at:
            if worker is None:
                with lock:
                    if not queue or failed_starts[0] >= 2:
                        return
                worker = _Worker(args.toy, echo)
                ready = worker.expect(f"{MARK} READY", min(stop_at, time.monotonic() + args.config_timeout_s))
                if not ready:
                    worker.stop(kill=True)
                    worker = None
                    with lock:
                        failed_starts[0] += 1
                    echo(f"{MARK}: a worker did not start" + (" (no time left)" if ready is None else ""))
                    continue
            with lock:
                if not queue:
                    break
                index = queue.pop(0)
            answer = None
            if worker.send(index):
                answer = worker.expect(f"{MARK} DONE ", min(stop_at, time.monotonic() + args.config_timeout_s))
            if answer:
                verdict = json.loads(answer)
                record(verdict)
                if verdict.get("restart"):
                    worker.stop(kill=False)
                    worker = None
                continue
            out_of_budget = answer is None and time.monotonic() >= stop_at
            code = worker.stop(kill=answer is None)
            worker = None
            if out_of_budget:
                lost(index, "not run", "stopped: no time left in the budget")
            elif answer is None:
                lost(index, "failed", f"no verdict within {args.config_timeout_s:.0f} s (hung?)")
            else:
                lost(index, "failed", f"the worker died (exit code {code})")
        if worker is not None:
            worker.stop(kill=False)

    _write(args.out, _record(verdicts, all_jobs, args.toy, about))
    threads = [threading.Thread(target=slot) for _ in range(max(1, args.workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    record_all = _record(verdicts, all_jobs, args.toy, about)
    _write(args.out, record_all)
    for line in record_all["records"][0]["held_back"]:
        print(f"held back: {line}")
    counts = {s: sum(v["status"] == s for v in verdicts.values()) for s in ("passed", "failed", "skipped")}
    counts["not run"] = len(all_jobs) - sum(counts.values())
    print(f"verified: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped, "
          f"{counts['not run']} not run, of {len(all_jobs)} configs and code paths -> {args.out}")  # fmt: skip
    return 1 if counts["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("verified.json"))
    parser.add_argument("--budget-s", type=float, default=170.0, help="start no config after this many seconds")
    parser.add_argument("--config-timeout-s", type=float, default=90.0, help="a config without a verdict by then hung")
    parser.add_argument("--toy", action="store_true", help="toy sizes under the Triton interpreter (a dry run)")
    parser.add_argument("--max-per-family", type=int, default=0, help="check only the first N configs of a family")
    parser.add_argument("--workers", type=int, default=0, help="workers at once (default: 3 on a GPU, 1 --toy)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.toy:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's care_kernels
    if args.worker:
        return worker(args.toy)
    args.workers = args.workers or (1 if args.toy else 3)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
