#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the peers' wheels for the GPU machine's Python, on a machine with PyPI.
#
#   bash benchmarks/fetch_wheels.sh             # the key peers: trl (+ the deps its full import needs), liger-kernel
#   bash benchmarks/fetch_wheels.sh --with-av   # also PyAV (34 MiB: the trainer's GPU test writes clips with it)
#
# The GPU machine (the device tool's nvidia-h100-x1 / nvidia-h200) has no network; its image already holds torch,
# triton, transformers, accelerate, pyarrow, pytest, pytest-benchmark, matplotlib... (KINDS.md). Pass the wheels
# with carry [".whl"]; benchmarks/gpu_check.sh installs them to /tmp/ck_site one by one (a wheel that does not
# fit leaves the others in). The carry limit is 64 MiB for the whole working tree, wheels included: this script
# refuses to leave more than WHEEL_MIB (default 56) in .whl/.
# Target: CPython 3.12 (the image's python3), manylinux x86_64. Pure-Python wheels fit any Python.
# Cut Cross-Entropy is left out: no gpu_check phase runs it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$REPO/.whl"
PY="${PYTHON:-python3}"
LIMIT_MIB="${WHEEL_MIB:-56}"
PYVER="${WHEEL_PYTHON:-3.12}"

PEERS=(trl==1.16.0 liger-kernel==0.8.5)
# trl's own imports (trl/__init__ -> trl.trainer) need these; the image lacks them. The benchmarks load trl's
# kernels without them when they do not import (providers.py), so they only widen what runs.
TRL_DEPS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
EXTRA=()
for arg in "$@"; do
  case "$arg" in
    --with-av) EXTRA+=(av==18.1.0) ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

mkdir -p "$DEST"
grep -qxF "/.whl/" "$REPO/.gitignore" 2>/dev/null || echo "note: add /.whl/ to .gitignore (or .git/info/exclude)" >&2
rm -f "$DEST"/*.whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${PEERS[@]}" "${TRL_DEPS[@]}" "${EXTRA[@]}"

mib=$(( $(du -cb "$DEST"/*.whl | tail -1 | cut -f1) / 1048576 ))
ls -la "$DEST"
echo "$mib MiB in $DEST"
if (( mib > LIMIT_MIB )); then
  echo "more than $LIMIT_MIB MiB: the working tree must stay under the device tool's 64 MiB; drop --with-av" >&2
  exit 1
fi
