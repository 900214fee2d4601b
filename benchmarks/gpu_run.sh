#!/usr/bin/env bash
# The GPU run (`make gpu-check OUT=DIR`): one command of a few minutes on a lent GPU, against the lent image as it is
# (torch 2.11, triton 3.6, no package index), that returns every figure it can within GPU_RUN_BUDGET_S (default
# 400 s). Everything it measures and logs goes under OUT_DIR; the short table (OUT_DIR/summary.md) is printed last.
# The steps, their limits and the budget logic are benchmarks/gpu_run.py (its docstring); this script picks the
# interpreter and checks the device.
#
#   bash benchmarks/gpu_run.sh OUT_DIR [OPTIONS]           # on a CUDA machine
#   bash benchmarks/gpu_run.sh --smoke OUT_DIR [OPTIONS]   # on CPU, tiny shapes, under a minute: every code path
#                                                          # (tests/test_gpu_run_smoke.py runs it)
# OPTIONS go to `gpu_run.py run`: --only STEP,..., --limit STEP=SECONDS, --step-args STEP="ARGS".
# PYTHON picks the interpreter (default .venv/bin/python when it exists, else python3). Exit status: 0 when every
# step finished without error, 1 when one failed or was cut, 2 on a usage error.
set -uo pipefail

smoke=()
if [ "${1:-}" = "--smoke" ]; then smoke=(--smoke); shift; fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash benchmarks/gpu_run.sh [--smoke] OUT_DIR [--only STEP,...] [--limit STEP=SECONDS] [--step-args STEP=ARGS]" >&2
  exit 2
fi
mkdir -p "$1" || { echo "gpu_run: cannot create the output directory $1" >&2; exit 2; }
out=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_run: no Python interpreter '$PY' (set PYTHON)" >&2; exit 2; }

if [ ${#smoke[@]} -eq 0 ]; then
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "gpu_run: CUDA is not available to $PY: this run needs an NVIDIA GPU (--smoke runs the plumbing on CPU)" >&2
    exit 1
  }
fi
exec "$PY" benchmarks/gpu_run.py run "$out" --python "$PY" "${smoke[@]}" "$@"
