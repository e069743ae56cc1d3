#!/usr/bin/env bash
# One command on the GPU machine: install the carried wheels, check the imports, run the GPU tests
# (pytest -m gpu), benchmark the network (real architecture: exact/fast x fp32/bf16) and the post-processing.
# About 5 minutes on an H200; every step prints its elapsed time; logs and JSON go to $OUT (or bench_out/gpu).
#
#   bash benchmarks/gpu/fetch_wheels.sh                 # here first: wheels + golden copy (git-ignored)
#   # device call: carry ["benchmarks/gpu/wheels", "benchmarks/gpu/golden"], timeout_s 600:
#   bash benchmarks/gpu/run_device.sh
#   bash benchmarks/gpu/run_device.sh --dry-run         # anywhere: tiny sizes, CPU if no GPU, cupy parts skip
#
# Options: --dry-run, --target DIR (default /tmp/site), --no-tests, --no-bench, --no-install,
# -- ARGS (passed to python -m benchmarks.gpu.bench_gpu). PYTHON=... picks the interpreter (default python3).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
TARGET=/tmp/site
dry=0; tests=1; bench=1; install=1; bench_args=()
while (($#)); do
  case "$1" in
    --dry-run) dry=1 ;;
    --target) TARGET="$2"; shift ;;
    --no-tests) tests=0 ;;
    --no-bench) bench=0 ;;
    --no-install) install=0 ;;
    --) shift; bench_args=("$@"); break ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
step() { echo; echo "=== [+${SECONDS}s] $*"; }
OUTDIR="${OUT:-$ROOT/bench_out/gpu}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1

if ((install)); then
  step "install $(ls benchmarks/gpu/wheels/*.whl 2>/dev/null | wc -l) wheels into $TARGET"
  compgen -G "benchmarks/gpu/wheels/*.whl" >/dev/null \
    || { echo "no wheels in benchmarks/gpu/wheels: run fetch_wheels.sh here and carry the folder"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" \
    benchmarks/gpu/wheels/*.whl || { echo "pip install failed"; exit 1; }
fi
export PYTHONPATH="$ROOT:$TARGET${PYTHONPATH:+:$PYTHONPATH}"
[[ -d benchmarks/gpu/golden ]] && export CRYOSIAM_GOLDEN="$ROOT/benchmarks/gpu/golden"

step "imports"
"$PY" -m benchmarks.gpu.check_env 2>&1 | tee "$OUTDIR/check_env.log"
rc_env=${PIPESTATUS[0]}
((rc_env == 0)) || { echo "required modules missing: stopping"; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm \
  --format=csv,noheader

rc_tests=0
if ((tests)); then
  step "pytest -m gpu tests/gpu"
  timeout 200 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs --durations=8 \
    --junitxml "$OUTDIR/pytest_gpu.xml" 2>&1 | tee "$OUTDIR/pytest_gpu.log"
  rc_tests=${PIPESTATUS[0]}
fi

rc_bench=0
if ((bench)); then
  extra=(); ((dry)) && extra=(--dry-run)
  step "python -m benchmarks.gpu.bench_gpu ${extra[*]} ${bench_args[*]}"
  timeout 300 "$PY" -m benchmarks.gpu.bench_gpu --out "$OUTDIR" "${extra[@]}" "${bench_args[@]}" 2>&1 \
    | tee "$OUTDIR/bench_gpu.log"
  rc_bench=${PIPESTATUS[0]}
fi

step "done: tests rc=$rc_tests, bench rc=$rc_bench; files in $OUTDIR"
ls -la "$OUTDIR"
((rc_tests == 0 || rc_tests == 5)) && ((rc_bench == 0))
