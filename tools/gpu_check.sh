#!/usr/bin/env bash
# fastlt on a GPU machine where torch is already installed (no venv, no downloads): builds the extension for the
# local GPU with all cores, then runs `fastlt doctor`, `pytest -m gpu` and `fastlt bench ops losses --device cuda`.
# Writes every log and summary.json (the figures) to OUT_DIR. About 5-10 minutes on one GPU.
#
#     make gpu-check DIR=gpu-check          # or: PYTHON=python3.12 bash tools/gpu_check.sh gpu-check
#
# The package is installed into OUT_DIR/site (pip --target, --no-deps --no-build-isolation), never into the
# environment; tests and benchmarks run with PYTHONPATH=OUT_DIR/site from OUT_DIR.
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR   (PYTHON=... picks the interpreter that has torch; default python3)" >&2; }
if [[ $# -ne 1 || "$1" == -* ]]; then
  usage
  [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && exit 0
  exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "gpu_check: cannot create $1" >&2; exit 2; }
PY=${PYTHON:-python3}
SUMMARY=("$PY" "$REPO/tools/gpu_check_summary.py" "$OUT")
STARTED=$(date +%s)

step() {  # step NAME COMMAND...: runs COMMAND with its output in OUT/NAME.log, records exit code and seconds
  local name=$1; shift
  local start=$(date +%s)
  echo "== $name: $*" | tee -a "$OUT/steps.txt"
  "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  echo "$name $code $(( $(date +%s) - start ))" >> "$OUT/steps.tsv"
  echo "   exit $code after $(( $(date +%s) - start )) s (log: $OUT/$name.log)" | tee -a "$OUT/steps.txt"
  return $code
}

: > "$OUT/steps.tsv"; : > "$OUT/steps.txt"
step environment "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "CUDA", torch.version.cuda); print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); sys.exit(0 if torch.cuda.is_available() else 3)'
if [[ $? -ne 0 ]]; then
  echo "gpu_check: torch sees no CUDA GPU with $PY (see $OUT/environment.log)" >&2
  "${SUMMARY[@]}"
  exit 3
fi
nvidia-smi > "$OUT/nvidia-smi.log" 2>&1 || true

# The local GPU's arch only (torch reads it from the device when TORCH_CUDA_ARCH_LIST is unset), every core.
export MAX_JOBS=${MAX_JOBS:-$(nproc)} FASTLT_BUILD_CUDA=1
# Triton compiles for the GPU here; "0" (not unset) also keeps tests/conftest.py from turning its interpreter on.
export TRITON_INTERPRET=0
rm -rf "$OUT/site"
(cd "$REPO" && step build "$PY" -m pip install -v --no-deps --no-build-isolation --target "$OUT/site" .)
BUILD=$?
if [[ $BUILD -eq 0 ]]; then
  cd "$OUT"  # not the source folder: its fastlt/ (no compiled module) would shadow OUT/site
  export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
  step doctor "$PY" -m fastlt.doctor --json "$OUT/doctor.json"
  step pytest_gpu "$PY" -m pytest -q -ra -p no:cacheprovider -m gpu --rootdir "$REPO" -c "$REPO/pyproject.toml" \
    --junitxml "$OUT/pytest_gpu.xml" "$REPO/tests"
  step bench "$PY" -m fastlt.cli bench ops losses --device cuda --json "$OUT/bench.json"
fi
"${SUMMARY[@]}"
echo "gpu_check: done in $(( $(date +%s) - STARTED )) s; summary: $OUT/summary.json"
awk '$2 != 0 { failed = 1 } END { exit failed }' "$OUT/steps.tsv"
