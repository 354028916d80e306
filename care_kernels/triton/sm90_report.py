"""Compile the shipped Triton kernels for Hopper (sm_90) on any machine and report what the compiler made of them.

    python -m care_kernels.triton.sm90_report     # one line per kernel and autotuner config (--json: JSON)

Triton compiles for a named target without a GPU (ptxas ships with it). A launch specializes every pointer
and integer argument divisible by 16; here each compile gets the hints that a launch at the Qwen2.5-VL-7B head
(N=16384, H=3584, V=152064, all divisible by 16) gets. It checks what no CPU test can run but GPU speed hangs
on: no register spills, the main loop software-pipelined (asynchronous global-to-shared copies with stages
kept in flight), tensor-core `wgmma` for 16-bit operands, and warp specialization where a config asks for it.
Speed itself is only measured on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from care_kernels.triton import cublas_logits, fp32_gemm, row_epilogue
from care_kernels.triton import linear_logprobs as tlp
from care_kernels.triton._backward_kernels import dlogits_kernel, logits_slab_grad_kernel, matmul_accumulate_kernel
from care_kernels.triton._forward_kernels import linear_logprob_stats_kernel, logits_slab_stats_kernel

HOPPER = GPUTarget("cuda", 90, 32)
# Integer arguments that are multiples of 16 at the benchmark shape (the others, e.g. N_CLASS = 2, are not).
_SIZE_ARGS = ("N", "H", "V", "split_cols", "col_begin", "n_cols", "M", "K", "stride_am", "stride_bk", "stride_cm",
              "n_rows", "stride")


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel compiled with one config: `types` maps non-constexpr arguments to Triton type strings."""

    name: str  # kernel and operand dtype, e.g. "forward dual bf16"
    kernel: triton.JITFunction
    types: dict
    constexprs: dict
    config: triton.Config

    @property
    def label(self) -> str:
        return f"{self.name} {tlp.config_label(self.config)}"


@dataclasses.dataclass(frozen=True)
class Report:
    registers: int
    spill_bytes: int  # per thread: stack frame + local memory
    shared_bytes: int
    pipelined: bool  # async global->shared copies (cp.async or TMA) issued ahead of their use
    wgmma: bool  # Hopper tensor-core instructions
    tma: bool  # operand tiles through the tensor memory accelerator
    warp_specialized: bool  # split into producer / consumer warp groups (registers: the count at launch)
    scratch_bytes: int  # global scratch per program (descriptors built in the kernel)


def _types(kernel, element: str, overrides: dict) -> dict:
    """Non-constexpr argument types: pointers `*element` (`*fp32`/`*i64` where overridden), ints i32."""
    types = {}
    for name in kernel.arg_names:
        if name in overrides:
            types[name] = overrides[name]
        elif name.endswith("_ptr"):
            types[name] = "*" + element
        else:
            types[name] = "i32"
    return types


def _forward_cases(element: str, configs: list[triton.Config]) -> list[Case]:
    """Single and dual forwards, without and with a bias; TMA configs get descriptor arguments of their tiles,
    the others None."""
    ieee = element == "fp32"
    overrides = dict(part_ptr="*fp32", ref_part_ptr="*fp32", tgt_ptr="*i64", scale2="fp32")
    cases = []
    for dual, bias in [(False, False), (True, False), (False, True), (True, True)]:
        flags = dict(HAS_BIAS=bias, WITH_ENTROPY=True, EVEN_K=True, UPCAST=False, IEEE=ieee, DUAL=dual,
                     REF_HAS_BIAS=bias, REF_EVEN_K=True, REF_UPCAST=False, REF_IEEE=ieee,
                     GROUP_M=tlp._GROUP_M)  # fmt: skip
        name = f"forward{' dual' if dual else ''} {element}{' bias' if bias else ''}"
        for c in configs:
            if bias and tlp.spills_with_bias(c):
                continue  # the autotuner prunes these when a model has a bias (linear_logprobs._prune_configs)
            bm, bn, bk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            blocks = dict(h_desc=bm, w_desc=bn, ref_h_desc=bm, ref_w_desc=bn)
            if c.kwargs["USE_TMA"]:
                descriptors = {n: f"tensordesc<{element}[{rows}, {bk}]>" for n, rows in blocks.items()}
                types = _types(linear_logprob_stats_kernel, element, {**overrides, **descriptors})
                cases.append(Case(name, linear_logprob_stats_kernel, types, flags, c))
            else:
                types = _types(linear_logprob_stats_kernel, element, overrides)
                no_descriptors = dict.fromkeys(blocks)
                cases.append(Case(name, linear_logprob_stats_kernel, types, {**flags, **no_descriptors}, c))
    return cases


def _dlogits_cases(element: str, configs: list[triton.Config]) -> list[Case]:
    overrides = dict(tgt_ptr="*i64", lse_ptr="*fp32", ent_ptr="*fp32", glp_ptr="*fp32", gent_ptr="*fp32",
                     scale2="fp32", inv_temp="fp32")  # fmt: skip
    flags = dict(HAS_BIAS=True, HAS_GRAD_ENTROPY=True, EVEN_K=True, UPCAST=False, IEEE=element == "fp32",
                 GROUP_M=tlp._GROUP_M)  # fmt: skip
    cases = []
    for c in configs:
        bm, bn, bk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        if c.kwargs["USE_TMA"]:
            descriptors = dict(h_desc=f"tensordesc<{element}[{bm}, {bk}]>", w_desc=f"tensordesc<{element}[{bn}, {bk}]>")
            types = _types(dlogits_kernel, element, {**overrides, **descriptors})
            cases.append(Case(f"dlogits {element}", dlogits_kernel, types, flags, c))
        else:
            types = _types(dlogits_kernel, element, overrides)
            no_descriptors = {"h_desc": None, "w_desc": None}
            cases.append(Case(f"dlogits {element}", dlogits_kernel, types, {**flags, **no_descriptors}, c))
    return cases


def shipped_cases() -> list[Case]:
    """Every GPU config the launchers can pick, for bf16 (and fp32 where a list exists)."""
    matmul_flags = dict(ACCUMULATE=True, EVEN_K=True, UPCAST=False, GROUP_M=tlp._GROUP_M)
    matmul_types = _types(matmul_accumulate_kernel, "bf16", dict(c_ptr="*fp32"))
    return [
        *_forward_cases("bf16", tlp._FWD_CONFIGS_16_TMA),  # a superset of _FWD_CONFIGS_16
        *_forward_cases("fp32", tlp._FWD_CONFIGS_32),
        *_dlogits_cases("bf16", tlp._BWD_CONFIGS_16_TMA),  # a superset of _BWD_CONFIGS_16
        *_dlogits_cases("fp32", tlp._BWD_CONFIGS_32),
        Case("matmul-accumulate bf16", matmul_accumulate_kernel, matmul_types, matmul_flags,
             fp32_gemm.MATMUL_CONFIG_16),
        *_slab_stats_cases(),
        *_row_cases(),
    ]


def _row_cases() -> list[Case]:
    """The fused GRPO head's one-sweep row pass over its bf16 logits buffer (stats, then the probabilities written
    in place), every autotuner config, with and without the entropy."""
    types = _types(row_epilogue._row_stats_probs_kernel, "fp32", dict(z_ptr="*bf16", tgt_ptr="*i64", inv_t="fp32"))
    return [Case(f"row probs bf16{' entropy' if entropy else ''}", row_epilogue._row_stats_probs_kernel, types,
                 dict(WITH_ENTROPY=entropy), c)
            for entropy in (False, True) for c in row_epilogue.PROBS_CONFIGS]  # fmt: skip


def _slab_stats_cases() -> list[Case]:
    """The cuBLAS strategies' passes over their slab (bf16 bias), every autotuner config: the forward's fold
    (a streaming reduction) and the backward's dlogits (elementwise, bf16 out); no GEMM. fp32 slab: `cublas`;
    bf16 slab, the dlogits written over it: `cublas16`."""
    cases = []
    for slab in ("fp32", "bf16"):
        types = _types(logits_slab_stats_kernel, "fp32", dict(z_ptr=f"*{slab}", b_ptr="*bf16", tgt_ptr="*i64",
                                                               scale2="fp32"))  # fmt: skip
        grad_overrides = dict(z_ptr=f"*{slab}", b_ptr="*bf16", tgt_ptr="*i64", dz_ptr="*bf16", scale2="fp32",
                              inv_temp="fp32")  # fmt: skip
        grad_types = _types(logits_slab_grad_kernel, "fp32", grad_overrides)
        cases += [Case(f"slab stats {slab}{' bias' if bias else ''}", logits_slab_stats_kernel, types,
                       dict(HAS_BIAS=bias, WITH_ENTROPY=True), c)
                  for bias in (False, True) for c in cublas_logits.FOLD_CONFIGS]  # fmt: skip
        cases += [Case(f"slab dlogits {slab}", logits_slab_grad_kernel, grad_types,
                       dict(HAS_BIAS=True, HAS_GRAD_ENTROPY=True), c) for c in cublas_logits.GRAD_CONFIGS]  # fmt: skip
    return cases


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack + local bytes per thread) from cuobjdump, which ships with Triton's NVIDIA backend."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out.stdout)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out.stdout}{out.stderr}")
    regs, stack, local = map(int, match.groups())
    return regs, stack + local


def _pipelined(ttgir: str) -> bool:
    """Software-pipelined main loop: cp.async copies waited on with groups still in flight, or TMA copies
    completing on multi-buffered mbarriers (issued inside the loop for a later iteration)."""
    if "async_copy_global_to_local" in ttgir:
        return re.search(r"async_wait .*\{num = [1-9]", ttgir) is not None
    loop = ttgir[ttgir.find("scf.for"):]
    return "async_tma_copy_global_to_local" in loop and re.search(r"memdesc<[2-9]x1xi64", ttgir) is not None


def compile_case(case: Case, target: GPUTarget = HOPPER) -> Report:
    """Compile `case` for `target` with launch-time specialization and read the result."""
    kernel, config = case.kernel, case.config
    constexprs = {**case.constexprs, **config.kwargs}
    signature = {name: "constexpr" if name in constexprs else case.types[name] for name in kernel.arg_names}
    index = {name: (i,) for i, name in enumerate(kernel.arg_names)}
    divisible = [n for n, t in signature.items() if t.startswith("*") or (t == "i32" and n in _SIZE_ARGS)]
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={index[n]: v for n, v in constexprs.items()},
        attrs={index[n]: [["tt.divisibility", 16]] for n in divisible},
    )
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg:
        options["maxnreg"] = config.maxnreg
    compiled = triton.compile(source, target=target, options=options)
    ttgir = compiled.asm["ttgir"]
    registers, spill_bytes = _resource_usage(compiled.asm["cubin"])
    return Report(
        registers=registers,
        spill_bytes=spill_bytes,
        shared_bytes=compiled.metadata.shared,
        pipelined=_pipelined(ttgir),
        wgmma="ttng.warp_group_dot " in ttgir,
        tma="async_tma_copy_global_to_local" in ttgir,
        warp_specialized="ttg.warp_specialize" in ttgir,
        scratch_bytes=compiled.metadata.global_scratch_size,
    )


def _with_stages(config: triton.Config, stages: int) -> triton.Config:
    return triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=stages, maxnreg=config.maxnreg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object {label: report} instead of a table")
    parser.add_argument("--only", help="only the kernels whose name starts with this, e.g. 'forward bf16'")
    parser.add_argument("--stages", type=int, help="override every config's num_stages (to see its effect)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    cases = [c for c in shipped_cases() if args.only is None or c.name.startswith(args.only)]
    if args.stages is not None:
        cases = [dataclasses.replace(c, config=_with_stages(c.config, args.stages)) for c in cases]
    reports = {case.label: compile_case(case) for case in cases}
    if args.json:
        kernels = {case.label: case.name for case in cases}
        print(json.dumps({label: {"kernel": kernels[label], **dataclasses.asdict(r)} for label, r in reports.items()}))
        return 0
    print(f"triton {triton.__version__}, target sm_{HOPPER.arch}")
    print(f"{'kernel and config':<57} {'regs':>4} {'spill B':>7} {'shared KiB':>10} {'pipelined':>9} {'wgmma':>5} "
          f"{'tma':>3} {'ws':>3}")  # fmt: skip
    for label, r in reports.items():
        yes = lambda flag: "yes" if flag else "no"  # noqa: E731
        print(f"{label:<57} {r.registers:>4} {r.spill_bytes:>7} {r.shared_bytes / 1024:>10.0f} "
              f"{yes(r.pipelined) if r.pipelined else 'NO':>9} {yes(r.wgmma):>5} {yes(r.tma):>3} "
              f"{yes(r.warp_specialized):>3}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
