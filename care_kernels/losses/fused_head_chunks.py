"""The fused GRPO head's chunk loop (FusedLinearGRPOLoss), in the variants it times on a GPU.

Per chunk of n active tokens, a logits buffer [n, V] (the head's 16-bit dtype on a GPU, float32 elsewhere):
- two_sweeps: a statistics sweep over the buffer (row_stats: log-prob, lse), the loss gradient g = d loss /
  d logprob of each token (loss_grad), a gradient sweep that writes dlogits = g (onehot - p) / T over the buffer
  (row_grad_), then dH = dlogits @ W and dW (+)= dlogits^T @ h into an fp32 [V, H] accumulator.
- one_sweep: one launch (row_stats_probs_) writes the statistics and q = (onehot - p) / T over the buffer, each
  row's second read coming from the L2 cache: one sweep of HBM reads fewer per chunk. dlogits = g * q exactly, so
  g enters the GEMMs as row scales: dH = g * (q @ W) (an fp32 product, rounded once), dW (+)= q^T @ (g * h),
  grad_bias (+)= q^T @ g.
- one_sweep_tall: one_sweep over every token in one chunk where the device's free memory allows the [N, V]
  buffer (and the caller did not bound the buffer): dW is then a single GEMM written in the weight's dtype, with
  no fp32 [V, H] accumulator written and read back per chunk (nor allocated).
`run` times the variants it may choose that can run, on the first call of each shape on a GPU (more than 2048
active tokens), and keeps the fastest (CARE_KERNELS_FUSED_HEAD=auto|two_sweeps|one_sweep|one_sweep_tall forces one,
whatever the records say); a variant that fails while timed or when it runs is dropped (logged once), never the
call. `auto` may choose two_sweeps always, and one_sweep and one_sweep_tall only where a committed gpu_check record
verified them for the GPU's architecture, Triton and sources (care_kernels.triton.verified, family "fused head
variant": neither has run on a GPU yet, and timing cannot tell a wrong result; CARE_KERNELS_TRITON_CONFIGS=all
offers every one). Elsewhere (and without Triton): two_sweeps.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from care_kernels.row_epilogue import row_grad_, row_stats, row_stats_probs_

Tensor = torch.Tensor
_LOG = logging.getLogger("care_kernels")
ENV = "CARE_KERNELS_FUSED_HEAD"
VARIANTS = ("two_sweeps", "one_sweep", "one_sweep_tall")
TUNE_FROM_ROWS = 2049  # as the Triton autotuner and logits_gemm: shorter calls are memory-bound and untimed
TALL_MEMORY_FRACTION = 0.5  # one_sweep_tall's buffer + dW may take at most this share of the free device memory

# (shape key) -> the variant `auto` picked, and every candidate's time (ms)
_picks: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}


@dataclass
class HeadGrads:
    """What the chunk loop returns, for the n active tokens in order: logp [n] (and ref_logp, entropy [n] when
    asked) float32; grad_hidden [n, H] in hidden's dtype; grad_weight [V, H] float32 or the weight's dtype;
    grad_bias [V] float32 or None. The loss gradient is folded in (backward only scales by d loss)."""

    logp: Tensor
    ref_logp: Optional[Tensor]
    entropy: Optional[Tensor]
    grad_hidden: Tensor
    grad_weight: Tensor
    grad_bias: Optional[Tensor]


@dataclass
class HeadInputs:
    """The active tokens' hidden [n, H] and targets [n]; the head (weight [V, H], bias [V] or None); the reference
    model's hidden/weight/bias (scored, no gradient) or None; temperature; ignore_index."""

    hidden: Tensor
    targets: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    ref: Optional[tuple[Tensor, Tensor, Optional[Tensor]]]
    temperature: float
    ignore_index: int


def buffer_dtype(weight: Tensor) -> torch.dtype:
    """16-bit logits stay 16-bit on GPU (the epilogues read them with fp32 math); float32 elsewhere."""
    return weight.dtype if weight.is_cuda else torch.float32


def chunk_rows(n: int, vocab: int, dtype: torch.dtype, buffer_bytes: int) -> int:
    """Rows per chunk: equal chunks (a short last one runs its GEMMs well below the peak) whose buffer fits
    buffer_bytes (at least one row)."""
    max_rows = max(1, min(n, buffer_bytes // (torch.finfo(dtype).bits // 8 * vocab)))
    chunks = max(1, math.ceil(n / max_rows))
    return max(1, math.ceil(n / chunks))


def _logits_chunk(out: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """out[:n] = h @ weight.T + bias, the matmul in the weight's dtype, stored in the buffer's dtype."""
    buf = out[: h.shape[0]]
    if weight.dtype == buf.dtype:
        torch.mm(h, weight.T, out=buf)
    else:
        buf.copy_(h @ weight.T)
    if bias is not None:
        buf += bias.to(buf.dtype)
    return buf


def _accumulate_grad_weight(grad_weight: Tensor, dlogits: Tensor, h: Tensor, first: bool) -> None:
    """grad_weight (fp32) = dlogits.T @ h (first chunk: whatever grad_weight held is ignored) or += it, with fp32
    accumulation. Writing the first chunk saves zero-filling a [V, H] fp32 buffer."""
    if dlogits.dtype == torch.float32:
        grad_weight.addmm_(dlogits.T, h.float() if h.dtype != torch.float32 else h, beta=0 if first else 1)
    elif dlogits.is_cuda:
        from care_kernels.triton.fp32_gemm import addmm_fp32_

        addmm_fp32_(grad_weight, dlogits.T, h, accumulate=not first)
    elif first:
        grad_weight.copy_(dlogits.T @ h)
    else:
        grad_weight += (dlogits.T @ h).float()


def _outputs(inp: HeadInputs, rows: int, with_entropy: bool):
    n, hdim = inp.hidden.shape
    vocab = inp.weight.shape[0]
    dev = inp.hidden.device
    zeros = lambda: torch.zeros(n, dtype=torch.float32, device=dev)  # noqa: E731
    return dict(
        buf=torch.empty(rows, vocab, dtype=buffer_dtype(inp.weight), device=dev),
        logp=zeros(), ref_logp=zeros() if inp.ref is not None else None, entropy=zeros() if with_entropy else None,
        grad_hidden=torch.empty_like(inp.hidden),
        grad_bias=None if inp.bias is None else torch.zeros(vocab, dtype=torch.float32, device=inp.weight.device),
    )  # fmt: skip


def _score_reference(inp: HeadInputs, buf: Tensor, sel: slice, ref_logp: Tensor) -> None:
    ref_h, ref_w, ref_b = inp.ref
    z = _logits_chunk(buf, ref_h[sel], ref_w, ref_b)
    ref_logp[sel] = row_stats(z, inp.targets[sel], inp.temperature, inp.ignore_index)[0]


def two_sweeps(inp: HeadInputs, loss_grad: Callable, rows: int, with_entropy: bool) -> HeadGrads:
    """The chunk loop with a statistics sweep and a gradient sweep per chunk (see the module docstring)."""
    n, hdim = inp.hidden.shape
    out = _outputs(inp, rows, with_entropy)
    # Filled by the first chunk's dW GEMM; zero only when no token is active.
    grad_weight = (torch.empty if n else torch.zeros)(inp.weight.shape, dtype=torch.float32, device=inp.weight.device)
    for r0 in range(0, n, rows):
        sel = slice(r0, min(r0 + rows, n))
        y = inp.targets[sel]
        if inp.ref is not None:
            _score_reference(inp, out["buf"], sel, out["ref_logp"])
        z = _logits_chunk(out["buf"], inp.hidden[sel], inp.weight, inp.bias)
        stats = row_stats(z, y, inp.temperature, inp.ignore_index, with_entropy=with_entropy)
        out["logp"][sel] = stats[0]
        if with_entropy:
            out["entropy"][sel] = stats[2]
        g = loss_grad(out["logp"], out["ref_logp"], sel)
        dlogits = row_grad_(z, y, stats[1], g, inp.temperature, inp.ignore_index)
        if out["grad_bias"] is not None:
            out["grad_bias"] += dlogits.sum(dim=0, dtype=torch.float32)
        if dlogits.dtype != inp.weight.dtype:  # float32 buffer of a 16-bit CPU head: GEMMs in the head's dtype
            dlogits = dlogits.to(inp.weight.dtype)
        torch.mm(dlogits, inp.weight, out=out["grad_hidden"][sel])
        _accumulate_grad_weight(grad_weight, dlogits, inp.hidden[sel], first=r0 == 0)
    return HeadGrads(out["logp"], out["ref_logp"], out["entropy"], out["grad_hidden"], grad_weight, out["grad_bias"])


def one_sweep(inp: HeadInputs, loss_grad: Callable, rows: int, with_entropy: bool) -> HeadGrads:
    """The chunk loop with one sweep per chunk and the loss gradient as row scales of the GEMMs (see the module
    docstring). With one chunk for all tokens, dW is written straight in the weight's dtype."""
    n, hdim = inp.hidden.shape
    out = _outputs(inp, rows, with_entropy)
    single = rows >= n
    dtype = inp.weight.dtype
    if single:  # one GEMM over every token: fp32 accumulation inside it, rounded once
        grad_weight = (torch.empty if n else torch.zeros)(inp.weight.shape, dtype=dtype, device=inp.weight.device)
    else:
        grad_weight = (torch.empty if n else torch.zeros)(inp.weight.shape, dtype=torch.float32,
                                                          device=inp.weight.device)  # fmt: skip
    for r0 in range(0, n, rows):
        sel = slice(r0, min(r0 + rows, n))
        if inp.ref is not None:
            _score_reference(inp, out["buf"], sel, out["ref_logp"])
        z = _logits_chunk(out["buf"], inp.hidden[sel], inp.weight, inp.bias)
        logp, _, entropy = row_stats_probs_(z, inp.targets[sel], inp.temperature, inp.ignore_index,
                                            with_entropy=with_entropy)  # fmt: skip
        out["logp"][sel] = logp
        if with_entropy:
            out["entropy"][sel] = entropy
        # rows with an ignored target get no gradient (row_grad_ zeroes them; here q holds -p / T there)
        g = torch.where(inp.targets[sel] != inp.ignore_index, loss_grad(out["logp"], out["ref_logp"], sel).float(), 0.0)
        q = z if z.dtype == dtype else z.to(dtype)  # (onehot - p) / T
        h = inp.hidden[sel]
        # dH = g * (q @ W): the product in fp32, scaled, rounded once to the hidden's dtype
        if q.dtype == torch.float32:
            product = q @ inp.weight
        elif q.is_cuda:
            from care_kernels.triton.fp32_gemm import addmm_fp32_

            product = torch.empty(q.shape[0], hdim, dtype=torch.float32, device=q.device)
            addmm_fp32_(product, q, inp.weight, accumulate=False)
        else:
            product = (q @ inp.weight).float()
        out["grad_hidden"][sel] = product.mul_(g[:, None])
        gh = (h.float() * g[:, None]).to(h.dtype)  # g * h, rounded once
        if single:
            torch.mm(q.T, gh, out=grad_weight)
        else:
            _accumulate_grad_weight(grad_weight, q, gh, first=r0 == 0)
        if out["grad_bias"] is not None:  # q^T g, accumulated in fp32 without an fp32 copy of q
            if q.dtype == torch.float32:
                out["grad_bias"] += g @ q
            elif q.is_cuda:
                from care_kernels.triton.fp32_gemm import addmm_fp32_

                addmm_fp32_(out["grad_bias"].view(1, -1), g.to(q.dtype)[None, :], q, accumulate=True)
            else:
                out["grad_bias"] += (g.to(q.dtype)[None, :] @ q).float()[0]
    return HeadGrads(out["logp"], out["ref_logp"], out["entropy"], out["grad_hidden"], grad_weight, out["grad_bias"])


def tall_fits(inp: HeadInputs) -> bool:
    """Whether one chunk of every token ([N, V] buffer, and dW in the weight's dtype) fits TALL_MEMORY_FRACTION of
    the device's free memory."""
    if not inp.hidden.is_cuda:
        return False
    n, vocab = inp.hidden.shape[0], inp.weight.shape[0]
    size = torch.finfo(buffer_dtype(inp.weight)).bits // 8
    need = n * vocab * size + inp.weight.numel() * inp.weight.element_size()
    free, _ = torch.cuda.mem_get_info(inp.hidden.device)
    return need <= TALL_MEMORY_FRACTION * free


def requested() -> str:
    name = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if name not in ("auto", *VARIANTS):
        raise ValueError(f"{ENV}={name!r}: pass one of 'auto', {', '.join(repr(v) for v in VARIANTS)}")
    return name


def candidates(inp: HeadInputs, loss_grad: Callable, buffer_bytes: int, bounded: bool,
               with_entropy: bool) -> dict[str, Callable[[], HeadGrads]]:  # fmt: skip
    """The variants that can run on these inputs: {name: a thunk running the whole loop}, two_sweeps first.
    bounded: the caller gave the buffer's size (no taller buffer then)."""
    n, vocab = inp.hidden.shape[0], inp.weight.shape[0]
    rows = chunk_rows(n, vocab, buffer_dtype(inp.weight), buffer_bytes)
    found = {"two_sweeps": lambda: two_sweeps(inp, loss_grad, rows, with_entropy)}
    if inp.hidden.is_cuda:
        found["one_sweep"] = lambda: one_sweep(inp, loss_grad, rows, with_entropy)
        if not bounded and rows < n and tall_fits(inp):
            found["one_sweep_tall"] = lambda: one_sweep(inp, loss_grad, n, with_entropy)
    return found


def offered(found: dict[str, Callable[[], HeadGrads]], device: torch.device) -> dict[str, Callable[[], HeadGrads]]:
    """The variants `auto` may choose on `device`: two_sweeps, and those verified there (verified.path_allowed;
    none without Triton, whose version the records are keyed by)."""
    if len(found) == 1:
        return found
    try:
        from care_kernels.triton import verified
    except ImportError:  # no Triton: nothing is verified
        return {"two_sweeps": found["two_sweeps"]}
    return {name: thunk for name, thunk in found.items()
            if name == "two_sweeps" or verified.path_allowed(verified.HEAD_FAMILY, name, device)}  # fmt: skip


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _note_dropped(where: str, variant: str, exc: BaseException) -> None:
    """tuning.note_dropped (logged once, listed by tuning.dropped()), or a plain warning without Triton."""
    try:
        from care_kernels.triton import tuning
    except ImportError:
        _LOG.warning("care_kernels: %s: variant %s failed and is dropped (%s: %s)", where, variant,
                     type(exc).__name__, exc)  # fmt: skip
        return
    tuning.note_dropped(where, variant, exc)


def run(inp: HeadInputs, loss_grad: Callable[[Tensor, Optional[Tensor], slice], Tensor], *, buffer_bytes: int,
        bounded: bool, with_entropy: bool = False) -> HeadGrads:  # fmt: skip
    """The head's gradients (and log-probs) for the active tokens, by the variant chosen for this shape.

    loss_grad(logp [n], ref_logp [n] or None, rows) -> d loss / d logp [len(rows)] for the tokens in `rows`, from
    the log-probs computed so far (those of `rows` included; the per-token loss is separable). It may be called
    several times per token (timing runs the loop once per variant).
    """
    found = candidates(inp, loss_grad, buffer_bytes, bounded, with_entropy)
    want = requested()
    n = inp.hidden.shape[0]
    key = ("fused_head", inp.hidden.shape[1], inp.weight.shape[0], n.bit_length(), str(inp.weight.dtype),
           inp.ref is not None, inp.bias is not None, str(inp.hidden.device), buffer_bytes, bounded,
           with_entropy)  # fmt: skip
    where = f"fused GRPO head variant, shape {key[1:4]}"
    pool = found if want != "auto" else offered(found, inp.hidden.device)
    if want != "auto":
        name = want if want in found else "two_sweeps"
    elif _picks.get(key) in pool:
        name = _picks[key]
    elif len(pool) > 1 and n >= TUNE_FROM_ROWS and not _capturing():
        from care_kernels.triton.logits_gemm import _median_ms

        timings = {}
        for cand, thunk in pool.items():
            try:
                timings[cand] = _median_ms(thunk)
            except Exception as exc:  # noqa: BLE001 - a failing variant is dropped, never the call
                _note_dropped(where, cand, exc)
                timings[cand] = math.inf
        _timings[key] = timings
        name = _picks[key] = min(timings, key=timings.__getitem__)
    else:
        name = "two_sweeps"
    try:
        return found[name]()
    except Exception as exc:
        if name == "two_sweeps" or _capturing():
            raise
        _note_dropped(where, name, exc)
        if not isinstance(exc, torch.OutOfMemoryError):
            _picks[key] = "two_sweeps"
        return found["two_sweeps"]()


def picks() -> list[dict]:
    """The variants `auto` picked in this process (benchmarks record them), as logits_gemm.picks()."""
    args = ["H", "V", "N_BITS", "dtype", "REF", "HAS_BIAS", "device", "buffer_bytes", "bounded", "WITH_ENTROPY"]
    return [{"kernel": "fused head variant", "key_args": args, "key": [str(k) for k in key[1:]], "config": {},
             "label": pick, "timings_ms": dict(_timings.get(key, {}))} for key, pick in _picks.items()]  # fmt: skip


def reset() -> None:
    _picks.clear()
    _timings.clear()
