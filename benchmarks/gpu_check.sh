#!/usr/bin/env bash
# One device call on a GPU machine without network (<= ~9 minutes of command time), the key numbers first.
#
#   bash benchmarks/fetch_wheels.sh                  # once, on a machine with PyPI: the peers' wheels -> .whl/
#   device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=570)
#   bash benchmarks/gpu_check.sh --dry-run           # the same phases here at toy sizes (CPU: Triton interpreter)
#
# Phases, in this order; each has a time cap, writes to $OUT as it goes (a killed run keeps what finished) and
# runs in processes of its own (a crash in our kernels cannot take the peers' numbers with it):
#   0  the peers' wheels from .whl/ -> /tmp/ck_site (no build: everything up to (f) runs from this checkout);
#      the GPU and the versions -> summary.txt
#   a  the key numbers with no build and no new-kernel compile: Qwen2.5-VL-7B head, N=16384, bf16
#      a1 the peers, in a process of their own: bare GEMMs (the 5- and 4-GEMM lines), TRL's
#         ChunkedLogProbFunction, Liger's triton_grpo_loss and LigerFusedLinearGRPOLoss (GRPO head); bare GEMMs and
#         TRL for the dual pass and forward+backward
#      a2 our FusedLinearGRPOLoss (cuBLAS GEMMs + the row epilogues; its two-sweep loop), in another
#   b  our autograd GRPO head (impl=triton) and the dual pass vs two single passes, in a new process, with the
#      shipped configs only: those that need no verdict, and those a committed record verified on this GPU's
#      architecture (care_kernels/triton/verified.py), none of the ones (c) has yet to check
#   c  every Triton config on its own, and every code path `auto` times (the logits GEMM strategies, the fused loss's
#      loop variants, with their slab and row passes' configs), against float64, on shapes with tails and the
#      benchmark's shape (verify_configs.py; a worker that crashes or hangs is replaced) -> verified.json
#   d  b's lines again with the configs and paths (c) passed (CARE_KERNELS_VERIFIED_CONFIGS=verified.json), each
#      logits GEMM strategy forced, our forward+backward, our fused loss choosing its loop variant by timing among
#      those, and the head as grpo_care's trainer runs it (the reference alone, then the fused loss with token stats)
#   e  a one-iteration torch.profiler kernel table of our autograd head and our fused loss, with (c)'s configs
#   f  the remaining GPU tests, then the extension build (CPU kernels + CUDA twins) and its GPU tests, with the
#      time left
# Files in $OUT (the device tool brings back 8 at most): summary.txt (key numbers and goals at the top, each
# phase's outcome), log.txt (every phase's output), bench.jsonl (every benchmark record as it finishes),
# picks.jsonl (the autotuner's and the strategies' picks, candidates dropped for failing), verified.json (commit
# it: python -m care_kernels.triton.verified --add verified.json), profile.txt, tests.log, results.tar.gz (report.py
# over bench.jsonl: tables and plots for benchmarks/results/<gpu>/).
# Knobs: OUT (default ./gpu_check_out), CK_GPU_CHECK_S (the budget, default 530 s; 240 with --dry-run), PYTHON
# (default python3).
set -u -o pipefail

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
TOTAL_S="${CK_GPU_CHECK_S:-$(( DRY ? 240 : 530 ))}"
START=$(date +%s)
SUMMARY="$OUT/summary.txt" LOG="$OUT/log.txt" TESTS_LOG="$OUT/tests.log"
BENCH="$OUT/bench.jsonl" PICKS="$OUT/picks.jsonl" VERIFIED="$OUT/verified.json" PROFILE="$OUT/profile.txt"
rm -f "$SUMMARY" "$LOG" "$TESTS_LOG" "$BENCH" "$PICKS" "$VERIFIED" "$PROFILE" "$OUT/results.tar.gz"
SITE=/tmp/ck_site

cd "$REPO" || exit 1
export PYTHONPATH="$REPO:$REPO/python:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export CK_BENCH_JSON=0 CK_BENCH_JSONL="$BENCH" CK_BENCH_PICKS="$PICKS"
export CK_GIT_COMMIT="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || true)"
unset CARE_KERNELS_VERIFIED_CONFIGS CARE_KERNELS_TRITON_CONFIGS CARE_KERNELS_LOGITS_GEMM CARE_KERNELS_WARP_SPECIALIZE
if (( DRY )); then
  # toy sizes on this machine; without a GPU the Triton kernels run under the interpreter
  export CK_BENCH_HEADS=toy CK_BENCH_N=64 CK_BENCH_ROUNDS=1 CK_BENCH_WARMUP=0 CK_BENCH_MEMORY=0 CK_BENCH_INTERPRETER=1
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || export TRITON_INTERPRET=1
  PROFILE_ARGS=(--head toy --n 64)
  VERIFY_ARGS=(--toy --max-per-family 1 --config-timeout-s 60)
else
  unset TRITON_INTERPRET
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU here; run it on a GPU machine, or use --dry-run" >&2
    exit 2
  fi
  export CK_BENCH_HEADS=qwen2.5-vl-7b CK_BENCH_N=16384
  PROFILE_ARGS=(--head qwen2.5-vl-7b --n 16384)
  VERIFY_ARGS=()
fi

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
# cap WANT RESERVE: WANT seconds, or less so that RESERVE seconds (of the default 530 s budget, scaled to this
# run's) remain for the phases after this one
cap() {
  local t=$(( $(left) - $2 * TOTAL_S / 530 ))
  (( t > $1 )) && t=$1
  echo $t
}
# phase NAME TIMEOUT LOG CMD...: run CMD with a time limit, its output appended to LOG; the outcome to summary.txt
phase() {
  local name=$1 t=$2 log=$3
  shift 3
  if (( t < 10 )); then
    echo "$name: SKIPPED (no time left)" | tee -a "$SUMMARY"
    return 99
  fi
  local t0 rc status
  t0=$(date +%s)
  echo "=== $name: timeout ${t}s: $*" >> "$log"
  timeout --kill-after=10 "$t" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMEOUT after ${t}s" ;;
    *) status="FAILED (rc=$rc)" ;;
  esac
  echo "$name: $status, $(( $(date +%s) - t0 )) s" | tee -a "$SUMMARY"
  return $rc
}
# bench NAME TIMEOUT TAG PROVIDERS CASES [VAR=VALUE ...]: one benchmark phase (pytest benchmarks/, its own process)
bench() {
  local name=$1 t=$2 tag=$3 providers=$4 cases=$5
  shift 5
  phase "$name" "$t" "$LOG" env "$@" CK_BENCH_TAG="$tag" CK_BENCH_PROVIDERS="$providers" CK_BENCH_CASES="$cases" \
    CK_BENCH_BUDGET_S=$(( t - 15 )) "$PY" -m pytest benchmarks/test_bench_grpo_head.py benchmarks/test_bench_dual.py \
    benchmarks/test_bench_logprobs.py -q -p no:cacheprovider -rs --benchmark-columns=min,median,max,rounds
}
key_numbers() { "$PY" benchmarks/key_numbers.py "$BENCH" --picks "$PICKS" 2>&1; }

{
  echo "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')$( (( DRY )) && echo ' DRY RUN (toy sizes)') budget ${TOTAL_S}s commit ${CK_GIT_COMMIT:-?}"
  (( DRY )) || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
  "$PY" - <<'EOF' 2>&1
import platform, torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
cap = ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else "-"
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}; "
      f"{gpu}, compute capability {cap}")
EOF
} | tee "$SUMMARY"

# 0. the peers' wheels
if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
  if (( DRY )); then
    echo "wheels: $(ls "$REPO"/.whl/*.whl | wc -l) in .whl/ (dry run: not installed)" | tee -a "$SUMMARY"
  else
    # one by one: a wheel that does not fit this Python leaves the others in
    phase "wheels" "$(cap 60 400)" "$LOG" bash -c \
      'rc=0; for w in "$1"/.whl/*.whl; do "$2" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
         --upgrade --target "$3" "$w" && echo "installed $(basename "$w")" || { echo "NOT installed $(basename "$w")"; rc=1; }; \
       done; exit $rc' _ "$REPO" "$PY" "$SITE"
    grep -E "^NOT installed" "$LOG" | sed 's/^/  /' | tee -a "$SUMMARY"
  fi
else
  echo "wheels: none in .whl/ (bash benchmarks/fetch_wheels.sh, then carry [\".whl\"]): TRL and Liger are skipped" \
    | tee -a "$SUMMARY"
fi
"$PY" -c "
import importlib.metadata as m
for d in ('trl', 'liger-kernel'):
    try: print(f'  {d} {m.version(d)}')
    except m.PackageNotFoundError: print(f'  {d}: not installed')
" 2>&1 | tee -a "$SUMMARY"

# a. the key numbers: the peers, then our fused loss, each in its own process
bench "a1 peers: bare GEMMs, TRL, Liger" "$(cap 150 330)" "" \
  torch_mm,torch_mm_x4,trl_chunked,liger_triton,liger grpo_head,dual,fwd_bwd
bench "a2 ours: FusedLinearGRPOLoss" "$(cap 80 270)" "" ck_fused grpo_head CARE_KERNELS_FUSED_HEAD=two_sweeps
{ echo "--- key numbers after (a)"; key_numbers; } | tee -a "$SUMMARY"

# b. our autograd head and the dual pass, with the shipped configs only
bench "b ours: autograd head, dual vs two singles (shipped configs)" "$(cap 150 200)" b-shipped \
  ck_triton,ck_triton_x2 grpo_head,dual

# c. every config and timed code path against float64
T=$(cap 180 110)
phase "c every Triton config and code path vs float64" "$T" "$LOG" "$PY" benchmarks/verify_configs.py \
  --out "$VERIFIED" --budget-s $(( T - 20 )) "${VERIFY_ARGS[@]}"
grep -E "^verified:|^ *failed |^held back:" "$LOG" | sed 's/^/  /' | tee -a "$SUMMARY"

# d. the same lines with the configs (c) passed, each strategy forced, and forward+backward
if [[ -s "$VERIFIED" ]]; then
  export CARE_KERNELS_VERIFIED_CONFIGS="$VERIFIED"
fi
bench "d ours: with the configs (c) passed" "$(cap 150 60)" d-verified \
  ck_triton,ck_triton_x2,ck_triton_fused,ck_triton_cublas,ck_triton_cublas16,ck_fused,ck_fused_trainer \
  grpo_head,dual,fwd_bwd

# e. where the time goes: one iteration of each head under torch.profiler
phase "e profiler kernel tables" "$(cap 60 20)" "$PROFILE" "$PY" benchmarks/profile_head.py "${PROFILE_ARGS[@]}"

KEY_TXT="$(mktemp /tmp/ck_key_numbers.XXXXXX)"
{ echo "--- key numbers (all phases)"; key_numbers; } > "$KEY_TXT"

# f. the remaining GPU tests, then the extension and its GPU tests, with the time left
unset CARE_KERNELS_VERIFIED_CONFIGS
if (( DRY )); then
  phase "f1 GPU tests (dry run: one file)" "$(cap 60 10)" "$TESTS_LOG" "$PY" -m pytest tests/test_row_epilogue.py -m gpu \
    -q -p no:cacheprovider -rs
  echo "f2 extension build: SKIPPED (dry run: python setup.py build_ext --inplace takes minutes)" | tee -a "$SUMMARY"
else
  phase "f1 GPU tests" "$(cap 200 80)" "$TESTS_LOG" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider -rs \
    --maxfail=25 --continue-on-collection-errors \
    -k "not every_forward_config and not every_dlogits_config and not every_slab_config and not native_cuda"
  grep -E "passed|failed|error" "$TESTS_LOG" | tail -1 | sed 's/^/  /' | tee -a "$SUMMARY"
  if MAX_JOBS=$(nproc) phase "f2 extension build" "$(cap 240 40)" "$LOG" "$PY" setup.py build_ext --inplace; then
    phase "f3 the extension's tests" "$(cap 60 5)" "$TESTS_LOG" "$PY" -m pytest tests/test_ext_loading.py \
      "tests/test_group_ops.py::test_native_cuda_matches_reference" -q -p no:cacheprovider -rs
    grep -E "passed|failed|error" "$TESTS_LOG" | tail -1 | sed 's/^/  /' | tee -a "$SUMMARY"
  fi
fi

# the report's tables and plots, then the key numbers on top of the summary
if [[ -s "$BENCH" ]] && (( $(left) > 5 )); then
  timeout 60 "$PY" benchmarks/report.py "$BENCH" --out-root "$OUT/results" >> "$LOG" 2>&1 \
    && tar -czf "$OUT/results.tar.gz" -C "$OUT" results
  rm -rf "$OUT/results"
fi
echo "total $(( $(date +%s) - START )) s of ${TOTAL_S}; files: $(cd "$OUT" && ls | tr '\n' ' ')" >> "$SUMMARY"
cat "$KEY_TXT" "$SUMMARY" > "$KEY_TXT.all" && mv "$KEY_TXT.all" "$SUMMARY"
rm -f "$KEY_TXT"
exit 0
