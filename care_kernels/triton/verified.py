"""Which Triton configs and code paths may run by default on a GPU: those never run on hardware wait for its verdict.

    python -m care_kernels.triton.verified                 # what is on for the visible GPU, and why
    python -m care_kernels.triton.verified --add FILE      # merge a gpu_check record (FILE) into the package's

A config whose code path has run on a GPU before (the nested loop with pointer loads: what every list starts
with) is always a candidate. The others (flat loop, TMA loads, persistent programs, warp specialization, a
register cap, gathered target logits) compile for Hopper without spills (sm90_report) but may still fault, hang or
compute wrong results on hardware, and an autotuner cannot recover from a fault that corrupts the CUDA context.
They are candidates on a GPU only where a verification record says they were run there and gave the right answers.

The same holds for the code paths `auto` chooses between by timing (timing cannot tell a wrong result):
- family "logits GEMM strategy" (logits_gemm): "fused" (the Triton kernels) always; "cublas" (an fp32 logits slab)
  and "cublas16" (a 16-bit one) only where verified;
- family "fused head variant" (fused_head_chunks): "two_sweeps" always; "one_sweep" and "one_sweep_tall" only
  where verified.
The always-on ones are those the H200 runs of 2026-11-28 ran (benchmarks/results/nvidia-h200: the fused kernels,
and FusedLinearGRPOLoss's two-sweep loop); the others came later. Forcing one (CARE_KERNELS_LOGITS_GEMM,
logits_gemm.use, CARE_KERNELS_FUSED_HEAD) runs it whatever the records say.

The records. `benchmarks/gpu_check.sh` phase (c) runs every config of every list on a GPU against a float64
reference (shapes with tails, and the benchmark's shape) and writes `$OUT/verified.json`; a developer commits
it into `verified_configs.json` beside this file (package data: installed with the package) with `--add`.
Format (version 1):

    {"format": 1, "records": [{
        "arch": "sm_90",                  # the GPU architecture the configs ran on (torch's compute capability)
        "device": "NVIDIA H200", "triton": "3.6.0", "torch": "2.11.0+cu130", "date": "...", "commit": "...",
        "kernel_fingerprint": "...",      # fingerprint("configs") of the kernels that ran
        "fingerprints": {"configs": "...", "logits GEMM strategy": "...", "fused head variant": "..."},
        "passed": {"forward 16-bit": ["128x128x64 w8 s3 flat tma r128", ...], "dlogits 16-bit": [...], ...,
                   "logits GEMM strategy": ["cublas16", ...], "fused head variant": ["one_sweep", ...]},
        "failed": {"forward 16-bit": {"<label>": "<what went wrong>"}, ...}}]}

A record counts for a family on a GPU when its arch is the GPU's, its Triton has the installed Triton's major.minor
version (code generation, warp specialization above all, changes between releases) and its fingerprint of the
family's sources (SOURCES: the kernels and the launchers that run them) is that of the installed ones (an edit
voids the verdicts on what it touches; comments and docstrings do not count). A label listed as failed by any
counting record stays off.

Environment:
    CARE_KERNELS_TRITON_CONFIGS=verified (default) | all | baseline
        all: every config, strategy and head variant is a candidate (what gpu_check's verification runs);
        baseline: only the always-on ones.
    CARE_KERNELS_VERIFIED_CONFIGS=FILE[:FILE...]
        more record files, e.g. the $OUT/verified.json a gpu_check run just wrote (its timing phase uses it).
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import io
import json
import os
import sys
import tokenize
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
RECORDS_FILE = HERE / "verified_configs.json"
MODE_ENV = "CARE_KERNELS_TRITON_CONFIGS"
EXTRA_ENV = "CARE_KERNELS_VERIFIED_CONFIGS"
FORMAT = 1
MODES = ("verified", "all", "baseline")
# The config lists the launchers gate (linear_logprobs): the 16-bit lists (TMA-capable or not) are one family.
FAMILIES = ("forward 16-bit", "forward fp32", "dlogits 16-bit", "dlogits fp32")
# The code paths chosen by timing, by label (see the module docstring), and the ones that ran on a GPU before.
STRATEGY_FAMILY = "logits GEMM strategy"
HEAD_FAMILY = "fused head variant"
PATHS = {STRATEGY_FAMILY: ("fused", "cublas", "cublas16"), HEAD_FAMILY: ("two_sweeps", "one_sweep", "one_sweep_tall")}
ALWAYS_ON = {STRATEGY_FAMILY: ("fused",), HEAD_FAMILY: ("two_sweeps",)}
# The sources (relative to the package) whose code runs in a verified config or path, by group: an edit to one
# voids the records of its groups. The configs' kernels, with their launcher; each strategy's slab passes, chunk
# loops and GEMMs; the head variants' chunk loops, row passes and GEMMs.
CONFIGS = "configs"
SOURCES = {
    CONFIGS: ("triton/_forward_kernels.py", "triton/_backward_kernels.py", "triton/tma.py",
              "triton/linear_logprobs.py"),
    STRATEGY_FAMILY: ("triton/cublas_logits.py", "triton/fp32_gemm.py", "triton/_forward_kernels.py",
                      "triton/_backward_kernels.py", "triton/linear_logprobs.py"),
    HEAD_FAMILY: ("losses/fused_head_chunks.py", "row_epilogue.py", "triton/row_epilogue.py", "triton/fp32_gemm.py"),
}  # fmt: skip
PACKAGE = Path(__file__).resolve().parent.parent


def group_of(family: str) -> str:
    """The source group (SOURCES) whose fingerprint a family's verdicts carry: the config lists' "configs", a code
    path family's own; the slab and row passes' configs belong to the paths that run them."""
    if family in FAMILIES:
        return CONFIGS
    if family.startswith("slab"):
        return STRATEGY_FAMILY
    if family == "row pass":
        return HEAD_FAMILY
    return family


def config_label(config: triton.Config) -> str:
    """Short name of a config, e.g. '128x128x64 w8 s3 flat tma r128' (tile, warps, stages, variant, cap);
    'persistent x2': two persistent programs per SM; 'ws': warp-specialized. Unique within a list."""
    c = config.kwargs
    tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c)
    if "BLOCK" in c:  # a row pass: lanes per step, programs per SM
        tile = f"{c['BLOCK']} x{c.get('PROGRAMS_PER_SM', 1)}/SM"
    label = f"{tile} w{config.num_warps} s{config.num_stages}"
    if "FLAT_LOOP" in c:
        label += " flat" if c["FLAT_LOOP"] else " nested"
    if c.get("PERSISTENT"):
        label += f" persistent x{c['PROGRAMS_PER_SM']}"
    label += " tma" if c.get("USE_TMA") else ""
    label += " ws" if c.get("WARP_SPECIALIZE") else ""
    label += " gather" if c.get("GATHER_TARGET") else ""
    return label + (f" r{config.maxnreg}" if config.maxnreg else "")


def needs_verification(config: triton.Config) -> bool:
    """Whether the config's code path is one no GPU had run when it was written: a flat loop, TMA loads,
    persistent programs, warp specialization, a register cap, gathered target logits."""
    c = config.kwargs
    return bool(c.get("FLAT_LOOP") or c.get("USE_TMA") or c.get("PERSISTENT") or c.get("WARP_SPECIALIZE")
                or c.get("GATHER_TARGET") or config.maxnreg)  # fmt: skip


def mode() -> str:
    value = os.environ.get(MODE_ENV, "verified").strip().lower() or "verified"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: pass one of {', '.join(MODES)}")
    return value


# ----------------------------------------------------------------------------------------- identities


def _code_only(source: str) -> str:
    """The source without comments, docstrings and blank lines (what the fingerprint covers)."""
    lines = source.splitlines()
    # (start line, start byte, end line, end byte), 1-based lines: ast gives UTF-8 byte offsets, tokenize characters
    cut: list[tuple[int, int, int, int]] = []
    byte = lambda line, col: len(lines[line - 1][:col].encode())  # noqa: E731
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            cut.append((tok.start[0], byte(*tok.start), tok.end[0], byte(*tok.end)))
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                cut.append((value.lineno, value.col_offset, value.end_lineno, value.end_col_offset))
    encoded = [line.encode() for line in lines]
    for line0, col0, line1, col1 in sorted(cut, reverse=True):
        first, last = encoded[line0 - 1], encoded[line1 - 1]
        if line0 == line1:
            encoded[line0 - 1] = first[:col0] + first[col1:]
        else:
            encoded[line0 - 1 : line1] = [first[:col0] + last[col1:]]
    kept = (line.decode().rstrip() for line in encoded)
    return "\n".join(line for line in kept if line.strip())


@functools.cache
def fingerprint(group: str = CONFIGS) -> str:
    """sha256 of the code (comments and docstrings left out) of a source group (SOURCES). An installation without
    those sources (bytecode only) gets a fingerprint no record has: nothing that needs a verdict is on there."""
    digest = hashlib.sha256()
    for name in SOURCES[group]:
        try:
            code = _code_only((PACKAGE / name).read_text())
        except OSError:
            return f"unavailable: {name} not found"
        digest.update(name.encode() + b"\0" + code.encode() + b"\0")
    return digest.hexdigest()


def kernel_fingerprint() -> str:
    """The configs' fingerprint (a record's "kernel_fingerprint")."""
    return fingerprint(CONFIGS)


def fingerprints() -> dict[str, str]:
    """Every source group's fingerprint (a record's "fingerprints")."""
    return {group: fingerprint(group) for group in SOURCES}


def record_fingerprint(record: dict, group: str) -> str | None:
    """The fingerprint a record carries for a source group (records without "fingerprints": the configs' only)."""
    found = record.get("fingerprints")
    if isinstance(found, dict) and group in found:
        return found[group]
    return record.get("kernel_fingerprint") if group == CONFIGS else None


def device_arch(device: torch.device) -> str | None:
    """'sm_90' for an NVIDIA GPU of compute capability 9.0, the gfx name on ROCm; None off a GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.version.hip is not None:
        return str(torch.cuda.get_device_properties(index).gcnArchName).split(":")[0]
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def _minor_version(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


# ----------------------------------------------------------------------------------------- records


def record_files() -> list[Path]:
    extra = [Path(p) for p in os.environ.get(EXTRA_ENV, "").split(os.pathsep) if p.strip()]
    return [RECORDS_FILE, *extra]


@functools.lru_cache(maxsize=32)
def _read(path: str, mtime_ns: int) -> tuple[dict, ...]:
    del mtime_ns  # part of the cache key only: a rewritten file is read again
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not a verification record file ({exc}); fix or remove it (or {EXTRA_ENV})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("records"), list):
        raise ValueError(f"{path}: not a format-{FORMAT} verification record file; fix or remove it (or {EXTRA_ENV})")
    return tuple(r for r in data["records"] if isinstance(r, dict))


def load_records(paths: list[Path] | None = None) -> list[dict]:
    """Every record of the package's file and the CARE_KERNELS_VERIFIED_CONFIGS files (missing files skipped)."""
    records: list[dict] = []
    for path in paths if paths is not None else record_files():
        try:
            records += _read(str(path), path.stat().st_mtime_ns)
        except FileNotFoundError:
            continue
    return records


def counting_records(arch: str, records: list[dict] | None = None, family: str = FAMILIES[0]) -> list[dict]:
    """The records that count for `family` (its source group's) on a GPU of this arch with the installed Triton
    and sources."""
    records = load_records() if records is None else records
    if not records:  # (no fingerprint to compute)
        return []
    group = group_of(family)
    want = (arch, _minor_version(triton.__version__), fingerprint(group))
    identity = lambda r: (r.get("arch"), _minor_version(str(r.get("triton", ""))), record_fingerprint(r, group))  # noqa: E731
    return [r for r in records if identity(r) == want]


def verified_labels(family: str, arch: str | None) -> frozenset[str]:
    """Labels of `family` (configs, or code paths) the counting records for `arch` passed and none failed."""
    if arch is None:
        return frozenset()
    passed: set[str] = set()
    failed: set[str] = set()
    for record in counting_records(arch, family=family):
        passed.update(record.get("passed", {}).get(family, ()))
        failed.update(record.get("failed", {}).get(family, {}))
    return frozenset(passed - failed)


def allowed(family: str, config: triton.Config, device: torch.device) -> bool:
    """Whether `config` of `family` may be an autotuner candidate on `device` (see the module docstring)."""
    if not needs_verification(config):
        return True
    chosen = mode()
    if chosen != "verified":
        return chosen == "all"
    return config_label(config) in verified_labels(family, device_arch(device))


def path_allowed(family: str, name: str, device: torch.device | None) -> bool:
    """Whether `auto` may choose code path `name` of `family` (STRATEGY_FAMILY, HEAD_FAMILY) on `device`: an
    always-on one, or (CARE_KERNELS_TRITON_CONFIGS=verified, the default) one a counting record passed for the
    device's arch and none failed (none off a GPU: device None or not CUDA); all of them under `all`, the always-on
    ones alone under `baseline`."""
    if name in ALWAYS_ON[family]:
        return True
    chosen = mode()
    if chosen != "verified":
        return chosen == "all"
    return device is not None and name in verified_labels(family, device_arch(device))


def make_record(passed: dict[str, list[str]], failed: dict[str, dict[str, str]], device: torch.device,
                **about) -> dict:  # fmt: skip
    """A record of one verification run on `device` (about: date, commit, ... as strings)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {
        "arch": device_arch(device), "device": torch.cuda.get_device_name(index), "triton": triton.__version__,
        "torch": torch.__version__, "kernel_fingerprint": kernel_fingerprint(), "fingerprints": fingerprints(), **about,
        "passed": {k: sorted(v) for k, v in passed.items()}, "failed": failed,
    }  # fmt: skip


def merge(into: Path, new_records: list[dict]) -> list[dict]:
    """Add records to a record file; one from the same arch, device, Triton and kernels is replaced."""
    same = lambda a, b: all(a.get(k) == b.get(k) for k in ("arch", "device", "triton", "kernel_fingerprint",  # noqa: E731
                                                             "fingerprints"))  # fmt: skip
    try:
        kept = list(json.loads(into.read_text())["records"])
    except FileNotFoundError:
        kept = []
    for record in new_records:
        kept = [r for r in kept if not same(r, record)] + [record]
    into.write_text(json.dumps({"format": FORMAT, "records": kept}, indent=1) + "\n")
    return kept


# ----------------------------------------------------------------------------------------- command line


def _status(arch: str | None) -> str:
    from care_kernels.triton import linear_logprobs as tlp

    sources = ", ".join(f"{group} {value[:12]}" for group, value in fingerprints().items())
    lines = [f"triton {triton.__version__}, sources: {sources}; arch {arch or '(no GPU)'}, "
             f"{MODE_ENV}={mode()}, records: {', '.join(str(p) for p in record_files())}"]  # fmt: skip
    if arch is not None:
        lines.append(f"{len(counting_records(arch))} of {len(load_records())} records count here")
    def state(always_on: bool, verified: bool) -> str:
        if always_on:
            return "on (always)"
        if mode() != "verified":
            return "on" if mode() == "all" else "off"
        return "on (verified)" if verified else "off (no record for this GPU)"

    for family, configs in tlp.config_families().items():
        lines.append(f"{family}:")
        verified = verified_labels(family, arch)
        for config in configs:
            label = config_label(config)
            lines.append(f"  {label:<40} {state(not needs_verification(config), label in verified)}")
    for family, names in PATHS.items():
        lines.append(f"{family}:")
        verified = verified_labels(family, arch)
        for name in names:
            lines.append(f"  {name:<40} {state(name in ALWAYS_ON[family], name in verified)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--add", nargs="+", type=Path, metavar="FILE", help="merge these record files' records")
    parser.add_argument("--into", type=Path, default=RECORDS_FILE, help="the record file --add writes")
    parser.add_argument("--arch", help="show the status for this arch (e.g. sm_90) instead of the visible GPU's")
    args = parser.parse_args(argv)
    if args.add:
        records = [r for path in args.add for r in json.loads(path.read_text())["records"]]
        kept = merge(args.into, records)
        print(f"{args.into}: {len(kept)} records ({len(records)} added or replaced)")
        return 0
    arch = args.arch or (device_arch(torch.device("cuda")) if torch.cuda.is_available() else None)
    print(_status(arch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
