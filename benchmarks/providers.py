"""Who computes each case: care_kernels' implementations, the peers, naive torch and the bare matmuls.

A provider turns a case's inputs into `Built(run, reset)`: `run()` is the timed work (it leaves the
gradients in `.grad` for the backward cases), `reset()` (untimed) clears them between rounds. Every
peer is imported lazily; `available(case, device)` says why a provider cannot run here, and the
benchmark skips it with that reason.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from cases import (
    BARE_MATMULS,
    BETA,
    FUSED_HEAD_MATMULS,
    LOSS_TYPE,
    GroupInputs,
    LogprobInputs,
    trl_style_grpo_loss,
)

TRL_CHUNK = 32768  # the vocabulary tile GRPOTrainer passes (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)


@dataclass
class Built:
    run: Callable[[], object]
    reset: Callable[[], None] = lambda: None
    analytic_bytes: int | None = None  # memory known without measuring (bare matmuls' preallocated buffers)
    note: str = ""


@dataclass
class Provider:
    name: str
    label: str
    kind: str  # "ours" | "peer" | "naive" | "bare"
    builders: dict  # case -> (inputs, device) -> Built
    available: Callable[[str, torch.device], tuple[bool, str]] = lambda case, device: (True, "")
    compiles: bool = False  # the first call compiles: always warm up, also in the memory subprocess
    order: int = 50  # run order within a case (the headline runs the important ones first)


def _zero_grads(inp: LogprobInputs) -> Callable[[], None]:
    def reset():
        for t in (inp.hidden, inp.weight):
            t.grad = None

    return reset


# ----------------------------------------------------------------------------------------- bare matmuls


def _bare(case: str, count: int | None = None):
    """`count` GEMMs of the case's shapes into preallocated buffers: the speed-of-light line."""

    def build(inp: LogprobInputs, device) -> Built:
        h, w, rh, rw = inp.hidden.detach(), inp.weight.detach(), inp.ref_hidden, inp.ref_weight
        n, v = h.shape[0], w.shape[0]
        k = count or BARE_MATMULS[case]
        z = torch.empty(n, v, dtype=h.dtype, device=device)
        zr = torch.empty(n, v, dtype=h.dtype, device=device) if case in ("dual", "grpo_head") else None
        dh = torch.empty_like(h) if case not in ("forward", "dual") else None
        dw = torch.empty_like(w) if case not in ("forward", "dual") else None
        steps = {
            "forward": [lambda: torch.mm(h, w.T, out=z)],
            "dual": [lambda: torch.mm(h, w.T, out=z), lambda: torch.mm(rh, rw.T, out=zr)],
        }
        backward = [lambda: torch.mm(z, w, out=dh), lambda: torch.mm(z.T, h, out=dw)]
        steps["fwd_bwd"] = steps["entropy"] = [lambda: torch.mm(h, w.T, out=z)] * 2 + backward
        steps["grpo_head"] = (
            [lambda: torch.mm(h, w.T, out=z), lambda: torch.mm(rh, rw.T, out=zr)]
            + [lambda: torch.mm(h, w.T, out=z)] * (k - 4)
            + backward
        )
        seq = steps[case]
        assert len(seq) == k, (case, k, len(seq))

        def run():
            for mm in seq:
                mm()

        buffers = [x for x in (z, zr, dh, dw) if x is not None]
        return Built(
            run,
            analytic_bytes=sum(b.numel() * b.element_size() for b in buffers),
            note=f"{k} GEMMs into preallocated buffers (memory = those buffers)",
        )

    return build


# ------------------------------------------------------------------------------------------ care_kernels


def _ck():
    import care_kernels

    return care_kernels


def _ck_impl_available(impl: str):
    def available(case, device):
        dry_run = os.environ.get("CK_BENCH_INTERPRETER") == "1" and os.environ.get("TRITON_INTERPRET") == "1"
        if impl == "triton" and device.type != "cuda" and not dry_run:
            return False, (
                "Triton runs on CPU only under TRITON_INTERPRET=1, a correctness tool; "
                "benchmarked on CUDA only (CK_BENCH_INTERPRETER=1 with TRITON_INTERPRET=1: dry runs)"
            )
        try:
            from care_kernels import backends

            backends.resolve(impl, device)
        except (ImportError, ValueError) as exc:
            return False, str(exc)
        return True, ""

    return available


def _policy_loss():
    """care_kernels.policy_loss (the loss our GRPO head uses), or None while it is not importable."""
    ck = _ck()
    fn = getattr(ck, "policy_loss", None)
    if fn is None:
        with contextlib.suppress(ImportError):
            fn = importlib.import_module("care_kernels.losses.policy_loss").policy_loss
    return fn


def _ck_logprobs(impl: str, case: str, single_x2: bool = False):
    def build(inp: LogprobInputs, device) -> Built:
        ck = _ck()
        h, w, y, rh, rw = inp.hidden, inp.weight, inp.targets, inp.ref_hidden, inp.ref_weight
        kw = dict(impl=impl, check_finite=False)
        if case == "forward":
            return Built(lambda: ck.linear_logprobs(h, w, y, **kw))
        if case == "fwd_bwd":
            return Built(
                lambda: (ck.linear_logprobs(h, w, y, **kw) * inp.grad_logprobs).sum().backward(),
                _zero_grads(inp),
            )
        if case == "entropy":

            def run():
                lp, ent = ck.linear_logprobs(h, w, y, return_entropy=True, **kw)
                (lp * inp.grad_logprobs + ent * inp.grad_entropy).sum().backward()

            return Built(run, _zero_grads(inp))
        if case == "dual" and single_x2:
            return Built(
                lambda: (ck.linear_logprobs(h, w, y, **kw), ck.linear_logprobs(rh, rw, y, **kw)),
                note="two single passes",
            )
        if case == "dual":
            return Built(lambda: ck.dual_linear_logprobs(h, w, rh, rw, y, **kw))
        if case == "grpo_head":
            policy_loss = _policy_loss()
            b, t = inp.batch, inp.seq

            def run():
                lp, ref = ck.dual_linear_logprobs(h, w, rh, rw, y, **kw)
                if policy_loss is not None:
                    loss = policy_loss(
                        lp.view(b, t),
                        inp.advantages,
                        inp.mask,
                        ref_logprobs=ref.view(b, t),
                        beta=BETA,
                        loss_type=LOSS_TYPE,
                    )[0]
                else:
                    loss = trl_style_grpo_loss(lp.view(b, t), ref.view(b, t), inp.advantages, inp.mask)
                loss.backward()

            note = "dual_linear_logprobs + " + (
                "ck.policy_loss" if policy_loss else "TRL-style loss (ck.policy_loss not importable yet)"
            )
            return Built(run, _zero_grads(inp), note=note)
        raise KeyError(case)

    return build


def _ck_triton_strategy(name: str, case: str):
    """impl=triton with its logits GEMM forced to `name` (fused, cublas or cublas16; `auto` times them and keeps
    the fastest per shape and pass): the sweep records each, whichever `auto` picks."""

    def build(inp: LogprobInputs, device) -> Built:
        from care_kernels.triton import logits_gemm

        built = _ck_logprobs("triton", case)(inp, device)
        run = built.run

        def forced():
            with logits_gemm.isolated(), logits_gemm.use(name):  # auto's later picks and precisions: its own
                return run()

        built.run = forced
        built.note = f"logits GEMM forced to {name}" + (f"; {built.note}" if built.note else "")
        return built

    return build


def _ck_triton_cublas_available(case, device):
    ok, why = _ck_impl_available("triton")(case, device)
    if not ok:
        return ok, why
    from care_kernels.triton import cublas_logits

    probe = torch.zeros(1, 1, dtype=torch.bfloat16, device=device)
    if not cublas_logits.usable(probe):
        return False, "this torch has no fp32-output cuBLAS GEMM for 16-bit inputs: only the fused forward runs"
    return True, ""


def _ck_fused_available(case, device):
    try:
        from care_kernels import FusedLinearGRPOLoss  # noqa: F401
    except ImportError as exc:
        try:
            importlib.import_module("care_kernels.losses.fused_linear_grpo")
        except ImportError as exc2:
            return False, f"care_kernels.FusedLinearGRPOLoss not importable ({exc2 or exc})"
    return True, ""


def _ck_fused(inp: LogprobInputs, device) -> Built:
    try:
        from care_kernels import FusedLinearGRPOLoss
    except ImportError:
        FusedLinearGRPOLoss = importlib.import_module(
            "care_kernels.losses.fused_linear_grpo"
        ).FusedLinearGRPOLoss
    b, t, hdim = inp.batch, inp.seq, inp.hidden.shape[1]
    loss_fn = FusedLinearGRPOLoss(beta=BETA, loss_type=LOSS_TYPE, use_ref_model=True)

    def run():
        loss, _ = loss_fn(
            inp.hidden.view(b, t, hdim),
            inp.weight,
            inp.targets.view(b, t),
            inp.mask,
            inp.advantages,
            ref_input=inp.ref_hidden.view(b, t, hdim),
            ref_weight=inp.ref_weight,
        )
        loss.backward()

    return Built(run, _zero_grads(inp), note="FusedLinearGRPOLoss(ref_input, ref_weight): 8NHV of GEMMs")


def _ck_fused_trainer(inp: LogprobInputs, device) -> Built:
    """The GRPO head as grpo_care's trainer runs it (Trainer._score_reference, then its loss call): the reference
    scored alone by ck.linear_logprobs (no gradient, no host sync; the CARE likelihood needs it before the loss),
    then FusedLinearGRPOLoss with those log-probs, returning the policy's per-token log-probs and entropy
    (return_token_stats, return_entropy): 8NHV, the same FLOP count as the other GRPO-head lines."""
    import care_kernels as ck

    b, t, hdim = inp.batch, inp.seq, inp.hidden.shape[1]
    loss_fn = ck.FusedLinearGRPOLoss(beta=BETA, loss_type=LOSS_TYPE, use_ref_model=True)
    targets = inp.targets.view(b, t)

    def run():
        with torch.no_grad():
            ref_targets = targets.masked_fill(inp.mask == 0, -100)
            ref_logp = ck.linear_logprobs(
                inp.ref_hidden.view(b, t, hdim), inp.ref_weight, ref_targets, check_finite=False
            )
        loss, _, stats = loss_fn(
            inp.hidden.view(b, t, hdim),
            inp.weight,
            targets,
            inp.mask,
            inp.advantages,
            ref_per_token_logps=ref_logp,
            return_token_stats=True,
            return_entropy=True,
        )
        loss.backward()
        return stats

    note = "ck.linear_logprobs(reference) + FusedLinearGRPOLoss(ref_per_token_logps, return_token_stats, "
    return Built(run, _zero_grads(inp), note=note + "return_entropy) as grpo_care's trainer calls them: 8NHV of GEMMs")


# ----------------------------------------------------------------------------------------------- naive


def _naive_lp(h, w, y, entropy=False):
    """log_softmax((h @ W.T).float()).gather(y): materializes the [N, V] logits (and their fp32 copy)."""
    logp_all = torch.log_softmax((h @ w.T).float(), dim=-1)
    lp = logp_all.gather(-1, y[:, None])[:, 0]
    if not entropy:
        return lp
    return lp, -(logp_all.exp() * logp_all).sum(-1)


def _two_pass_builder(score: Callable, case: str, note: str = "") -> Callable:
    """The cases for a provider that scores one model per call: score(h, w, y, entropy) -> lp | (lp, ent)."""

    def build(inp: LogprobInputs, device) -> Built:
        h, w, y, rh, rw = inp.hidden, inp.weight, inp.targets, inp.ref_hidden, inp.ref_weight
        if case == "forward":

            def run():
                with torch.no_grad():
                    return score(h, w, y, False)

            return Built(run, note=note)
        if case == "fwd_bwd":
            return Built(
                lambda: (score(h, w, y, False) * inp.grad_logprobs).sum().backward(),
                _zero_grads(inp),
                note=note,
            )
        if case == "entropy":

            def run():
                lp, ent = score(h, w, y, True)
                (lp * inp.grad_logprobs + ent * inp.grad_entropy).sum().backward()

            return Built(run, _zero_grads(inp), note=note)
        if case == "dual":

            def run():
                with torch.no_grad():
                    return score(h, w, y, False), score(rh, rw, y, False)

            return Built(run, note=(note + "; " if note else "") + "two passes")
        if case == "grpo_head":
            b, t = inp.batch, inp.seq

            def run():
                lp = score(h, w, y, False)
                with torch.no_grad():
                    ref = score(rh, rw, y, False)
                trl_style_grpo_loss(lp.view(b, t), ref.view(b, t), inp.advantages, inp.mask).backward()

            return Built(
                run, _zero_grads(inp), note=(note + "; " if note else "") + "policy + ref + TRL loss"
            )
        raise KeyError(case)

    return build


# ----------------------------------------------------------------------------------------------- TRL


def _trl_standalone_package():
    """trl/kernels/* imported without trl/__init__ and trl.trainer (which pull accelerate, datasets, ...).

    The GPU machine carries only the trl wheel. ChunkedLogProbFunction's backward imports
    `..trainer.utils.maybe_gather_lm_head_ctx`, which only gathers DeepSpeed ZeRO-3 shards (a null
    context otherwise): the stub below is that null context.
    """
    name = "_ck_bench_trl"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("trl is not installed (pip install trl==1.16.0)")
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    trainer = types.ModuleType(name + ".trainer")
    trainer.__path__ = []
    utils = types.ModuleType(name + ".trainer.utils")
    utils.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
    sys.modules.update({name: pkg, name + ".trainer": trainer, name + ".trainer.utils": utils})
    importlib.import_module(name + ".kernels")
    return pkg


def _trl_version() -> str:
    try:
        from importlib.metadata import version

        return version("trl")
    except Exception:  # noqa: BLE001 - metadata missing is not an error here
        return "?"


@functools.cache  # a failed import is retried on every call otherwise, inside the timed region
def trl_chunked():
    """(ChunkedLogProbFunction, how it was loaded)."""
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import maybe_gather_lm_head_ctx  # noqa: F401 - its backward needs it

        return ChunkedLogProbFunction, f"trl {_trl_version()}"
    except Exception as exc:  # noqa: BLE001 - trl's package imports need accelerate, datasets, ...
        pkg = _trl_standalone_package()
        fn = importlib.import_module(pkg.__name__ + ".kernels.chunked_logprob").ChunkedLogProbFunction
        return fn, f"trl {_trl_version()} kernels loaded standalone (trl.trainer: {exc})"


def _trl_chunked_available(case, device):
    try:
        trl_chunked()
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        return False, f"TRL ChunkedLogProbFunction not importable: {exc}"
    return True, ""


def _trl_chunked_score(h, w, y, entropy):
    fn, _ = trl_chunked()
    lp, ent, *_ = fn.apply(h, w, None, y, 1.0, TRL_CHUNK, None, 1.0, ("entropy",) if entropy else ())
    return (lp, ent) if entropy else lp


@functools.cache
def trl_selective():
    """(selective_log_softmax(logits, index), entropy_from_logits(logits) or None, how it was loaded)."""
    try:
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        return selective_log_softmax, entropy_from_logits, f"trl {_trl_version()}"
    except Exception as exc:  # noqa: BLE001
        if not torch.cuda.is_available():
            raise
        # On CUDA, trl's selective_log_softmax and entropy_from_logits are this Triton kernel.
        pkg = _trl_standalone_package()
        fused = importlib.import_module(
            pkg.__name__ + ".kernels.logprob_entropy"
        ).selective_log_softmax_and_entropy
        return (
            (lambda z, y: fused(z, y)[0]),
            (lambda z: fused(z, torch.zeros(z.shape[:-1], dtype=torch.long, device=z.device))[1]),
            f"trl {_trl_version()} logprob_entropy kernel loaded standalone (trl.trainer: {exc})",
        )


def _trl_selective_available(case, device):
    try:
        trl_selective()
    except Exception as exc:  # noqa: BLE001
        return False, f"TRL selective_log_softmax not importable: {exc}"
    return True, ""


def _trl_selective_score(h, w, y, entropy):
    sel, ent_fn, _ = trl_selective()
    z = h @ w.T
    if entropy:
        return sel(z, y), ent_fn(z)
    return sel(z, y)


# ----------------------------------------------------------------------------------------------- Liger


def _liger_available(case, device):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"liger-kernel not importable: {exc} (pip install liger-kernel packaging)"
    return True, ""


def _liger(inp: LogprobInputs, device) -> Built:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b, t, hdim = inp.batch, inp.seq, inp.hidden.shape[1]
    # compiled=False: torch.compile would only fuse Liger's [B, T] loss math (negligible next to the GEMMs)
    # and costs a compile per shape; it is also what runs on CPU.
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=BETA,
        compiled=False,
        use_ref_model=True,
        loss_type=LOSS_TYPE,
        epsilon_low=0.2,
        epsilon_high=0.2,
        temperature=1.0,
    )

    def run():
        loss, _ = loss_fn(
            inp.hidden.view(b, t, hdim),
            inp.weight,
            inp.targets.view(b, t),
            inp.mask,
            inp.advantages,
            ref_input=inp.ref_hidden.view(b, t, hdim),
            ref_weight=inp.ref_weight,
        )
        loss.backward()

    return Built(
        run, _zero_grads(inp), note="LigerFusedLinearGRPOLoss(compiled=False, ref_input, ref_weight)"
    )


def _liger_triton_available(case, device):
    if device.type != "cuda":
        return False, "triton_grpo_loss is a Triton kernel: CUDA only"
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"liger-kernel not importable: {exc}"
    return True, ""


def _liger_triton(inp: LogprobInputs, device) -> Built:
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    b, t, hdim = inp.batch, inp.seq, inp.hidden.shape[1]
    ids = inp.targets.view(b, t)

    def run():
        # the kernel takes materialized logits [B, T+1, V] and skips the last position
        hp = torch.nn.functional.pad(inp.hidden.view(b, t, hdim), (0, 0, 0, 1))
        with torch.no_grad():
            rhp = torch.nn.functional.pad(inp.ref_hidden.view(b, t, hdim), (0, 0, 0, 1))
            ref = fused_selective_log_softmax(rhp @ inp.ref_weight.T, ids, temperature=1.0)
        loss, _ = triton_grpo_loss(
            hp @ inp.weight.T,
            None,
            ref,
            ids,
            inp.advantages,
            inp.mask,
            temperature=1.0,
            beta=BETA,
            eps_low=0.2,
            eps_high=0.2,
            loss_type=LOSS_TYPE,
            reduce=True,
        )
        loss.backward()

    return Built(
        run, _zero_grads(inp), note="materialized logits + triton_grpo_loss + fused_selective_log_softmax"
    )


# ------------------------------------------------------------------------------------ Cut Cross-Entropy


def _cce_impl(device) -> str:
    return "cce" if device.type == "cuda" else "torch_compile"


def _cce_available(case, device):
    try:
        from cut_cross_entropy import linear_cross_entropy  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"cut-cross-entropy not importable: {exc} (pip install cut-cross-entropy)"
    if case == "entropy":
        return False, "Cut Cross-Entropy has no entropy output"
    return True, ""


def _cce_score(h, w, y, entropy):
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(h, w, y, reduction="none", impl=_cce_impl(h.device))


# ------------------------------------------------------------------------------------------- group ops


def _group_ck(case):
    def build(inp: GroupInputs, device) -> Built:
        from care_kernels import group

        g = inp.group_size
        fns = {
            "group_advantages": lambda: group.group_advantages(inp.rewards, g),
            "answer_likelihood": lambda: group.answer_likelihood(inp.ref_logprobs, inp.answer_mask),
            "care_bonus": lambda: group.care_bonus(inp.accuracy, inp.likelihood, g),
        }
        native = group.native_op(case, device) is not None
        return Built(fns[case], note="native op" if native else "torch reference (native op not built)")

    return build


def _group_ref(case):
    def build(inp: GroupInputs, device) -> Built:
        from care_kernels.reference import group as ref

        g = inp.group_size
        fns = {
            "group_advantages": lambda: ref.group_advantages(inp.rewards, g),
            "answer_likelihood": lambda: ref.answer_likelihood(inp.ref_logprobs, inp.answer_mask),
            "care_bonus": lambda: ref.care_bonus(inp.accuracy, inp.likelihood, g),
        }
        return Built(fns[case])

    return build


def _trl_group_advantages(inp: GroupInputs, device) -> Built:
    """GRPOTrainer's advantage code: view(-1, G) statistics, repeat_interleave back."""
    g = inp.group_size

    def run():
        r = inp.rewards
        mean = r.view(-1, g).mean(dim=1).repeat_interleave(g, dim=0)
        std = r.view(-1, g).std(dim=1).repeat_interleave(g, dim=0)
        return (r - mean) / (std + 1e-4)

    return Built(run, note="TRL GRPOTrainer's inline formula")


def _naive_answer_likelihood(inp: GroupInputs, device) -> Built:
    def run():
        m = inp.answer_mask.float()
        return torch.exp((inp.ref_logprobs * m).sum(-1) / (m.sum(-1) + 1e-6))

    return Built(run, note="the one-line torch expression")


def _loop_care_bonus(inp: GroupInputs, device) -> Built:
    """GRPO-CARE's bonus written as a Python loop over groups (with a host sync per group)."""
    g = inp.group_size

    def run(coef=0.5, cap=0.95, floor=0.1, margin=0.0):
        out = torch.zeros_like(inp.accuracy)
        for s in range(0, inp.accuracy.numel(), g):
            acc, lik = inp.accuracy[s : s + g], inp.likelihood[s : s + g].clamp(max=cap)
            high = (acc > floor) & (acc >= acc.mean())
            if bool(high.any()):
                ok = high & (lik >= lik[high].mean() - margin)
                out[s : s + g] = torch.where(ok, coef * acc, torch.zeros_like(acc))
        return out

    return Built(run, note="Python loop over groups")


# ----------------------------------------------------------------------------------------------- registry


def _register() -> dict[str, Provider]:
    lp_cases = ("forward", "fwd_bwd", "entropy", "dual", "grpo_head")
    reg: list[Provider] = [
        Provider("torch_mm", "torch.mm (bare GEMMs)", "bare", {c: _bare(c) for c in lp_cases}, order=0),
        Provider(
            "torch_mm_x4",
            "torch.mm x4 (fused-head floor)",
            "bare",
            {"grpo_head": _bare("grpo_head", FUSED_HEAD_MATMULS)},
            order=90,
        ),
        Provider(
            "ck_fused",
            "care_kernels FusedLinearGRPOLoss",
            "ours",
            {"grpo_head": _ck_fused},
            _ck_fused_available,
            order=1,
        ),
        Provider(
            "ck_fused_trainer",
            "care_kernels trainer head (reference alone + FusedLinearGRPOLoss with token stats)",
            "ours",
            {"grpo_head": _ck_fused_trainer},
            _ck_fused_available,
            order=9,
        ),
    ]
    for rank, impl in enumerate(("cpp", "triton", "torch")):
        avail = _ck_impl_available(impl)
        reg.append(
            Provider(
                f"ck_{impl}",
                f"care_kernels impl={impl}",
                "ours",
                {c: _ck_logprobs(impl, c) for c in lp_cases},
                avail,
                order=(2, 3, 12)[rank],
            )
        )
        reg.append(
            Provider(
                f"ck_{impl}_x2",
                f"care_kernels impl={impl}, 2 single passes",
                "ours",
                {"dual": _ck_logprobs(impl, "dual", single_x2=True)},
                avail,
                order=60 + rank,
            )
        )
    strategy_labels = {"fused": "fused", "cublas": "in cuBLAS (fp32 slab)", "cublas16": "in cuBLAS (16-bit slab)"}
    for rank, name in enumerate(("fused", "cublas", "cublas16")):
        reg.append(
            Provider(
                f"ck_triton_{name}",
                f"care_kernels impl=triton, logits GEMM {strategy_labels[name]}",
                "ours",
                {c: _ck_triton_strategy(name, c) for c in ("forward", "fwd_bwd", "dual", "grpo_head")},
                _ck_triton_cublas_available if name == "cublas" else _ck_impl_available("triton"),
                order=4 + rank,
            )
        )
    reg += [
        Provider(
            "naive",
            "naive torch (materialized logits)",
            "naive",
            {c: _two_pass_builder(lambda h, w, y, e: _naive_lp(h, w, y, e), c) for c in lp_cases},
            order=70,
        ),
        Provider(
            "trl_chunked",
            "TRL ChunkedLogProbFunction",
            "peer",
            {c: _two_pass_builder(_trl_chunked_score, c) for c in lp_cases},
            _trl_chunked_available,
            order=10,
        ),
        Provider(
            "trl_selective",
            "TRL selective_log_softmax (materialized logits)",
            "peer",
            {
                c: _two_pass_builder(_trl_selective_score, c)
                for c in ("forward", "fwd_bwd", "entropy", "dual")
            },
            _trl_selective_available,
            order=75,
        ),
        Provider(
            "liger",
            "Liger LigerFusedLinearGRPOLoss",
            "peer",
            {"grpo_head": _liger},
            _liger_available,
            order=11,
        ),
        Provider(
            "liger_triton",
            "Liger triton_grpo_loss (materialized logits)",
            "peer",
            {"grpo_head": _liger_triton},
            _liger_triton_available,
            order=76,
        ),
        Provider(
            "cce",
            "Cut Cross-Entropy",
            "peer",
            {
                c: _two_pass_builder(_cce_score, c, "impl=cce on CUDA, torch_compile on CPU")
                for c in ("forward", "fwd_bwd", "dual", "grpo_head")
            },
            _cce_available,
            compiles=True,
            order=80,
        ),
        Provider(
            "ck_group",
            "care_kernels",
            "ours",
            {c: _group_ck(c) for c in ("group_advantages", "answer_likelihood", "care_bonus")},
            order=1,
        ),
        Provider(
            "ck_group_torch",
            "care_kernels torch reference",
            "ours",
            {c: _group_ref(c) for c in ("group_advantages", "answer_likelihood", "care_bonus")},
            order=2,
        ),
        Provider(
            "trl_style",
            "TRL GRPOTrainer formula",
            "peer",
            {"group_advantages": _trl_group_advantages},
            order=10,
        ),
        Provider(
            "naive_group",
            "naive torch",
            "naive",
            {"answer_likelihood": _naive_answer_likelihood, "care_bonus": _loop_care_bonus},
            order=70,
        ),
    ]
    return {p.name: p for p in reg}


PROVIDERS = _register()


def loader_note(provider: str) -> str:
    """Which version of a peer ran, and how it was imported."""
    try:
        if provider == "trl_chunked":
            return trl_chunked()[1]
        if provider == "trl_selective":
            return trl_selective()[2]
        from importlib.metadata import version

        if provider.startswith("liger"):
            return f"liger-kernel {version('liger-kernel')}"
        if provider == "cce":
            return f"cut-cross-entropy {version('cut-cross-entropy')}"
    except Exception:  # noqa: BLE001 - a note, never an error
        return ""
    return ""


def for_case(case: str) -> list[str]:
    """Provider names that implement a case, in run order."""
    return [p.name for p in sorted(PROVIDERS.values(), key=lambda p: p.order) if case in p.builders]


def build(provider: str, case: str, inputs, device) -> Built:
    return PROVIDERS[provider].builders[case](inputs, device)
