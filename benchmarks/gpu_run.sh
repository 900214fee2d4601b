#!/usr/bin/env bash
# The GPU run (`make gpu-check OUT=DIR`): one command, a few minutes on an H200, against the lent image as it is
# (torch 2.11, triton 3.6, no package index). Everything it measures and logs goes under OUT_DIR; the short table
# (OUT_DIR/summary.md) is printed last. In order:
#   1. install.log          wheels from .whl/ into a temporary target and the project, only where not importable
#   2. versions.json        python, torch, triton, transformers, Liger-Kernel, CCE, the device, nvidia-smi clocks
#   3. tests.log/tests.xml  the CUDA-relevant tests only (kernels, op, one host sync, float32 accumulation path),
#                           each under a timeout
#   4. ceilings_*.json/.md  copy GB/s, the op's GEMMs at its chunk shapes (dW with beta 0 and 1), epilogue GB/s
#   5. op_*_main.json/.md   bench_op.py at H=4096, V=128256, N=8192, bf16, a third of the rows ignored; then
#      op_*_small.json/.md  N=4096: LM-only and full, chunk auto / 2048 / 4096, against the model's own loss, F.lce
#                           (when this torch has it), Liger (default, accum_dtype=float32), CCE (cce, torch_compile)
#   6. summary.md/.json     steps, tests, ceilings, op rows, the targets met / missed
# A step that fails is recorded (steps.tsv, its log) and the run goes on; a missing optional piece is a line saying
# so. Exit status: 0 when every step exited 0. GPU_RUN_BUDGET_S caps the whole run (default 330 s).
#
#   bash benchmarks/gpu_run.sh OUT_DIR            # on a CUDA machine
#   bash benchmarks/gpu_run.sh --smoke OUT_DIR    # on CPU, tiny shapes, seconds: the plumbing only (the test suite
#                                                 # runs this: tests/test_gpu_run_smoke.py)
# PYTHON picks the interpreter (default .venv/bin/python when it exists, else python3).
set -uo pipefail

smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash benchmarks/gpu_run.sh [--smoke] OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1" || { echo "gpu_run: cannot create the output directory $1" >&2; exit 2; }
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
: > "$out/steps.tsv"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_run: no Python interpreter '$PY' (set PYTHON)" >&2; exit 2; }

if [ "$smoke" = 1 ]; then
  export TRITON_INTERPRET=1
else
  unset TRITON_INTERPRET
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "gpu_run: CUDA is not available to $PY: this run needs an NVIDIA GPU (--smoke runs the plumbing on CPU)" >&2
    exit 1
  }
fi

# The whole run stays under GPU_RUN_BUDGET_S (default 330 s: a lent GPU comes for minutes): each step's own limit is
# cut to what is left, and a step with under 10 s left is skipped with a line saying so.
budget=${GPU_RUN_BUDGET_S:-330}

# step NAME LIMIT_S NOTE COMMAND...: runs COMMAND under a time limit, output to OUT_DIR/NAME.log, one steps.tsv row.
step() {
  local name=$1 limit=$2 note=$3
  shift 3
  local start=$SECONDS left=$((budget - SECONDS))
  if [ "$left" -lt 10 ]; then
    printf '%s\t125\t0\t%s\n' "$name" "skipped: the run's ${budget} s budget is spent" >> "$out/steps.tsv"
    echo "gpu_run: $name skipped: the run's ${budget} s budget is spent"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "gpu_run: $name ..."
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  [ "$rc" -eq 124 ] && note="$note; stopped at the ${limit} s limit"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$note" >> "$out/steps.tsv"
  echo "gpu_run: $name exit $rc in $((SECONDS - start)) s (log $name.log)"
  return 0
}

install() {
  if [ "$smoke" = 1 ]; then
    echo "smoke mode: nothing installed, $PY is used as it is"
    return 0
  fi
  # -P: as the benchmark scripts see it, without the repository root (and its source scft_fast/) on sys.path.
  if "$PY" -P -c 'import liger_kernel, cut_cross_entropy' >/dev/null 2>&1; then
    echo "Liger-Kernel and Cut Cross-Entropy import already"
  elif ls .whl/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
      && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" && echo "wheels in .whl/ installed into $site" \
      || echo "installing the wheels in .whl/ failed: their rows will be skipped"
  else
    echo "no .whl/ folder (../shared/device/prepare-wheels.sh fills it): the Liger and CCE rows will be skipped"
  fi
  if "$PY" -P -c 'import scft_fast.kernels' >/dev/null 2>&1; then
    echo "scft_fast imports already"
  elif "$PY" -m pip install -q --no-deps --no-build-isolation -e .; then
    echo "scft_fast installed (pip install --no-deps --no-build-isolation -e .)"
  else
    # The layout setup.py declares (kernels/ installed as scft_fast.kernels), without setuptools.
    pkg=$(mktemp -d)
    cp -r scft_fast "$pkg/scft_fast" && cp -r kernels "$pkg/scft_fast/kernels"
    export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip install -e . failed: scft_fast copied to $pkg with kernels/ as scft_fast.kernels"
  fi
}
# In this shell, not a step's subshell: PYTHONPATH must reach the later steps.
start=$SECONDS
install > "$out/install.log" 2>&1
printf 'install\t0\t%s\t%s\n' "$((SECONDS - start))" "$(tail -n 1 "$out/install.log")" >> "$out/steps.tsv"
cat "$out/install.log"

step versions 60 "libraries, device, clocks" "$PY" benchmarks/gpu_run.py versions "$out"

tests=(tests/test_kernels_safety_epilogue.py tests/test_kernels_cls_head.py tests/test_kernels_compile.py
       tests/test_safety_loss.py tests/test_safety_loss_edge_cases.py tests/test_safety_loss_passes.py
       tests/test_safety_loss_accumulation.py tests/test_safety_loss_compile.py)
pytest_args=(-o addopts= -q -p no:cacheprovider -rfEs --junitxml="$out/tests.xml")
if "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then
  pytest_args+=(--timeout=120)
  tests_note="per-test timeout 120 s"
else
  tests_note="pytest-timeout missing: no per-test timeout"
fi
if [ "$smoke" = 1 ]; then
  # Every file collected (imports checked), a few fast tests run: the plumbing, not the kernels.
  pytest_args+=(-k "accumulat or touches_the_weight_gradient")
  tests_note="$tests_note; smoke: a -k subset"
fi
# -P: the repository root must not go on sys.path, or its kernels/ folder would pose as the `kernels` library that
# transformers looks for.
step tests 180 "$tests_note" "$PY" -P -m pytest "${tests[@]}" "${pytest_args[@]}"

if [ "$smoke" = 1 ]; then
  ceilings=(--device cpu --quick --backend torch --reps 3 --warmup 1)
  op=(--device cpu --quick --dtype float32 --hidden 32 --vocab 512 --backends torch --chunk-sizes 32,64 --reps 2
      --warmup 0 --only gemm,naive,lce_ref,scft_)
  shapes=("main 96 60" "small 48 60 --no-memory")
else
  ceilings=(--device cuda)
  op=(--device cuda --dtype bfloat16 --hidden 4096 --vocab 128256 --backends triton --chunk-sizes 2048,4096
      --reps 30 --warmup 3)
  # tag, N, time limit (s), extra bench_op.py flags. The limits leave room for first calls that compile or autotune
  # (Triton JIT, CCE's autotuned kernels, torch.compile for CCE's torch_compile rows), in each process again.
  shapes=("main 8192 180" "small 4096 120")
fi
step ceilings 90 "copy, GEMMs at the chunk shapes, epilogue" "$PY" benchmarks/bench_ceilings.py "${ceilings[@]}" \
  --out-dir "$out"
for shape in "${shapes[@]}"; do
  read -r tag rows limit extra <<< "$shape"
  # shellcheck disable=SC2086  # $extra: zero or more flags
  step "op_$tag" "$limit" "bench_op.py, N=$rows" "$PY" benchmarks/bench_op.py "${op[@]}" --rows "$rows" --tag "$tag" \
    --out-dir "$out" --no-progress $extra
done
step versions_end 30 "clocks at the end" "$PY" benchmarks/gpu_run.py versions "$out" --end

summary=(summary "$out")
[ "$smoke" = 1 ] && summary+=(--smoke)
"$PY" benchmarks/gpu_run.py "${summary[@]}"
