#!/usr/bin/env bash
# GPU check (`make gpu-check`): on a CUDA machine, the whole test suite with real Triton (TRITON_INTERPRET
# unset), then the op benchmark at the GPU shape of issue 2 (bf16, N=8192, H=4096, V=128256) with a chunk-size
# sweep. Writes under benchmarks/results/ (device name and UTC date in the names):
#   gpu_tests_<device>_<date>.log     the pytest log, headed by device, driver, torch, triton and commit
#   op_<device>_<date>.json / .md     the benchmark table, targets PASS/MISS (bench_op.py writes them)
# Exits 1 without CUDA (before running anything), and non-zero when the tests or a benchmark row failed; the
# benchmark runs even after failed tests so that both are on record. Arguments go to bench_op.py.
# Liger-Kernel and Cut Cross-Entropy rows run when they import; given a .whl/ folder of wheels
# (../shared/device/prepare-wheels.sh) and no such import, the wheels are installed into a temporary
# target first (no index is reached). PYTHON picks the interpreter (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || fail "no Python interpreter '$PY' (set PYTHON)"

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || fail "CUDA is not available to $PY (torch.cuda.is_available() is False): this check needs an NVIDIA GPU"

if [ -d .whl ] && ! "$PY" -c 'import liger_kernel, cut_cross_entropy' >/dev/null 2>&1; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
    || fail "installing the wheels in .whl/ into $site"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c 'import scft_fast.kernels' >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || fail "installing scft_fast (pip install -e .)"
fi

stamp=$(date -u +%Y%m%dT%H%MZ)
device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')
slug=$(printf '%s' "$device" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
mkdir -p benchmarks/results
log=benchmarks/results/gpu_tests_${slug}_${stamp}.log
{
  echo "# gpu_check: pytest tests with real Triton"
  echo "# date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "# device: $device"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
    | sed 's/^/# nvidia-smi: /'
  "$PY" -c 'import torch, triton; print(f"# torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")'
  echo "# TRITON_INTERPRET=${TRITON_INTERPRET:-<unset>}"
} | tee "$log"

pytest_args=(tests)
if ! "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then
  # pytest.ini's addopts names --timeout, which only pytest-timeout understands.
  echo "# pytest-timeout is not installed: running without pytest.ini's addopts" | tee -a "$log"
  pytest_args+=(-o addopts= -q)
fi
# -P: the repository root must not go on sys.path, or its kernels/ folder would pose as the `kernels`
# library that transformers looks for.
"$PY" -P -m pytest "${pytest_args[@]}" 2>&1 | tee -a "$log"
tests_rc=${PIPESTATUS[0]}

"$PY" benchmarks/bench_op.py --device cuda --dtype bfloat16 --rows 8192 --hidden 4096 --vocab 128256 \
  --chunk-sizes 512,1024,2048,4096 --out-dir benchmarks/results --no-progress "$@"
bench_rc=$?

echo "gpu_check: tests exit $tests_rc (log $log), benchmark exit $bench_rc (benchmarks/results/op_${slug}_*)"
[ "$tests_rc" -eq 0 ] || fail "the test suite (exit $tests_rc), see $log"
[ "$bench_rc" -eq 0 ] || fail "the benchmark (exit $bench_rc)"
