#!/usr/bin/env bash
# One-shot check on a GPU machine without network, everything written to $OUT (< 8 minutes on an H100):
#   0. wheels found in .whl/ -> /tmp/ck_site: the peers (trl, liger-kernel, cut-cross-entropy and trl's pure-Python
#      deps) and PyAV (the trainer's GPU test writes and reads synthetic clips with it). Fill .whl/ (git-ignored)
#      on a machine with PyPI, then pass carry [".whl"] to the device tool:
#        pip download --no-deps -d .whl --python-version 3.12 --platform manylinux_2_28_x86_64 --only-binary=:all: \
#          trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets dill multiprocess av==18.1.0
#   1. build + install: pip install --no-build-isolation --no-deps .   (CPU extension + CUDA twins)
#   2. python -m care_kernels.env_report, nvidia-smi
#   3. GPU correctness tests: pytest tests -m gpu (not -x: a module whose imports are missing here must not
#      stop the others; --continue-on-collection-errors), every Triton autotuner config first (a failure there
#      turns warp specialization off for the rest: CARE_KERNELS_WARP_SPECIALIZE=0)
#   4. GPU benchmark sweep: pytest benchmarks/ (bf16, Qwen2.5-VL-7B head) -> bench.json, bench.jsonl
#   5. report.py -> results.tar.gz (benchmarks/results/<gpu>/: README.md tables, PNG plots, records.json)
#   6. a quick non-GPU test subset with the time left
# Each phase has its own timeout; a failing phase does not stop the others. Files in $OUT (8 at most):
#   summary.txt build.log env.txt tests.log bench.log bench.json bench.jsonl results.tar.gz
# Knobs: OUT (default ./gpu_check_out), CK_GPU_CHECK_S (total budget, default 450), PYTHON (default python3).
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
TOTAL_S="${CK_GPU_CHECK_S:-450}"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
RUN_DIR="$(mktemp -d /tmp/ck_gpu_check.XXXXXX)"  # run tests from here, so the installed package is imported
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset TRITON_INTERPRET

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
# cap WANT RESERVE: WANT seconds, or less so that RESERVE seconds remain for the phases after this one
cap() {
  local t=$(( $(left) - $2 ))
  (( t > $1 )) && t=$1
  echo $t
}
# phase NAME TIMEOUT LOG CMD...: run with a timeout, append to LOG, record the outcome in summary.txt
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
  timeout --kill-after=15 "$t" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMEOUT after ${t}s" ;;
    *) status="FAILED (rc=$rc)" ;;
  esac
  echo "$name: $status, $(( $(date +%s) - t0 )) s -> $(basename "$log")" | tee -a "$SUMMARY"
  return $rc
}

echo "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') repo=$REPO budget=${TOTAL_S}s" | tee "$SUMMARY"

# 0. peer wheels carried in .whl/ (the machine has no network)
if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
  # one by one: a wheel for another Python version must not keep the others out
  phase "wheels" "$(cap 60 380)" "$OUT/build.log" bash -c \
    'rc=0; for w in "$1"/.whl/*.whl; do "$2" -m pip install -q --no-index --no-deps --upgrade --target /tmp/ck_site "$w" \
       && echo "installed $(basename "$w")" || { echo "could not install $(basename "$w")"; rc=1; }; done; exit $rc' \
    _ "$REPO" "$PY"
  grep -E "^(installed|could not install)" "$OUT/build.log" | sed 's/^/  /' | tee -a "$SUMMARY"
  export PYTHONPATH="/tmp/ck_site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "wheels: none in .whl/ (TRL, Liger and Cut Cross-Entropy benchmarks and the trainer's GPU test will be skipped)" \
    | tee -a "$SUMMARY"
fi

# 1. build and install (the CUDA twins need nvcc; the build falls back to a pure-Python install on failure)
cd "$REPO" || exit 1
PIP_EXTRA=()
if ! phase "build" "$(cap 240 200)" "$OUT/build.log" "$PY" -m pip install -v --no-build-isolation --no-deps .; then
  if grep -q "externally-managed-environment" "$OUT/build.log"; then
    PIP_EXTRA=(--break-system-packages)
    phase "build (--break-system-packages)" "$(cap 240 200)" "$OUT/build.log" \
      "$PY" -m pip install -v --no-build-isolation --no-deps "${PIP_EXTRA[@]}" .
  fi
fi
if ! (cd "$RUN_DIR" && "$PY" -c "import care_kernels") >> "$OUT/build.log" 2>&1; then
  CARE_KERNELS_SKIP_BUILD=1 phase "install without the extension" "$(cap 90 180)" "$OUT/build.log" \
    "$PY" -m pip install --no-build-isolation --no-deps "${PIP_EXTRA[@]}" .
fi
cd "$RUN_DIR" || exit 1

# 2. environment
{
  nvidia-smi 2>&1 | head -20
  "$PY" - <<'EOF'
import torch, care_kernels
from care_kernels import backends
print("care_kernels", care_kernels.__version__, "from", care_kernels.__file__)
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
print("triton:", backends.triton_status(), "cpp:", backends.cpp_status())
EOF
} > "$OUT/env.txt" 2>&1
phase "env_report" "$(cap 60 180)" "$OUT/env.txt" "$PY" -m care_kernels.env_report

# 3. GPU correctness tests. First every autotuner config on its own (warp-specialized ones included): if that
#    phase fails, hangs or is skipped (for any config: conservative), the rest of the run goes on without warp
#    specialization, so the sweep still measures.
if ! phase "gpu tests: every Triton config" "$(cap 150 300)" "$OUT/tests.log" "$PY" -m pytest "$REPO/tests" -m gpu -q \
    -p no:cacheprovider -k "every_forward_config or every_dlogits_config" --continue-on-collection-errors; then
  export CARE_KERNELS_WARP_SPECIALIZE=0
  echo "  -> CARE_KERNELS_WARP_SPECIALIZE=0 for the rest of this run" | tee -a "$SUMMARY"
fi
grep -E "passed|failed|error" "$OUT/tests.log" | tail -1 | sed 's/^/  /' | tee -a "$SUMMARY"
phase "gpu tests" "$(cap 170 170)" "$OUT/tests.log" "$PY" -m pytest "$REPO/tests" -m gpu -q -p no:cacheprovider --maxfail=25 \
  -k "not every_forward_config and not every_dlogits_config" --continue-on-collection-errors
grep -E "passed|failed|error" "$OUT/tests.log" | tail -1 | sed 's/^/  /' | tee -a "$SUMMARY"

# 4. benchmark sweep; its own budget stops it early enough to write the JSON (bench.jsonl survives a kill)
BENCH_T=$(cap 230 40)
rm -f "$OUT/bench.jsonl"
CK_BENCH_BUDGET_S=$(( BENCH_T - 30 )) CK_BENCH_JSONL="$OUT/bench.jsonl" \
  phase "benchmarks" "$BENCH_T" "$OUT/bench.log" "$PY" -m pytest "$REPO/benchmarks" -q -p no:cacheprovider \
  --benchmark-json "$OUT/bench.json" --benchmark-columns=min,median,max,rounds
grep -E "passed|failed|error" "$OUT/bench.log" | tail -1 | sed 's/^/  /' | tee -a "$SUMMARY"
# the Triton autotuner's picks (tile, loop shape, warps, stages per kernel and key), from bench.json
"$PY" - "$OUT/bench.json" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
try:
    picks = json.load(open(sys.argv[1]))["care_kernels_bench"]["triton_autotuned"]
except (OSError, ValueError, KeyError) as exc:
    sys.exit(f"autotuned: none recorded ({type(exc).__name__})")
print(f"autotuned: {len(picks)} picks (every candidate's median ms, fastest first)")
for p in picks:
    print(f"  {p['kernel']}: {dict(zip(p['key_args'], p['key']))} {p['key'][len(p['key_args']):]} -> {p['label']}")
    for label, ms in sorted(p["timings_ms"].items(), key=lambda item: item[1]):
        print(f"      {ms:9.3f} ms  {label}")
EOF

# 5. report
REPORT_IN="$OUT/bench.json"
[[ -s "$REPORT_IN" ]] || REPORT_IN="$OUT/bench.jsonl"
if [[ -s "$REPORT_IN" ]]; then
  phase "report" "$(cap 60 20)" "$OUT/bench.log" "$PY" "$REPO/benchmarks/report.py" "$REPORT_IN" \
    --out-root "$OUT/results"
  for readme in "$OUT"/results/*/README.md; do
    [[ -f "$readme" ]] && sed -n '/^## GRPO loss head/,/^<details>/p' "$readme" | head -20 >> "$SUMMARY"
  done
  tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
else
  echo "report: SKIPPED (no benchmark results)" | tee -a "$SUMMARY"
fi

# 6. a quick non-GPU subset with what is left
phase "cpu-side tests (subset)" "$(cap 90 10)" "$OUT/tests.log" "$PY" -m pytest "$REPO/tests" -q -p no:cacheprovider \
  -m "not gpu and not slow" --maxfail=25 --continue-on-collection-errors
grep -E "passed|failed|error" "$OUT/tests.log" | tail -1 | sed 's/^/  /' | tee -a "$SUMMARY"

echo "total $(( $(date +%s) - START )) s; files in $OUT:" | tee -a "$SUMMARY"
ls -la "$OUT" | tail -n +2 | tee -a "$SUMMARY"
rm -rf "$RUN_DIR"
exit 0
