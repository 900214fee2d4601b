"""Peak memory of the op benchmark's rows (bench_op.py): CUDA in this process, CPU in fresh subprocesses.

CUDA: torch.cuda.max_memory_allocated over one call, minus what was allocated before it. CPU: peak RSS growth
over one call in a fresh subprocess (VmHWM - VmRSS after resetting the high-water mark through
/proc/self/clear_refs), after a warm-up of the same row at a tiny shape so that library loading and one-time
builds are excluded. The subprocess is ``bench_op.py ... --memory-rows KEYS``, which prints 'MEMORY_RESULT {json}'.
"""
from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys

import torch

from harness import REPO, proc_status_kib, reset_peak_rss
from op_rows import Inputs, Row, build_rows, clear_grads, make_inputs, problem_from_args

BENCH_OP = REPO / "benchmarks" / "bench_op.py"

MMAP_THRESHOLD = 128 << 10
CPU_MEMORY_METHOD = ("peak RSS growth over one fwd+bwd in a fresh subprocess: VmHWM - VmRSS (/proc/self/status), "
                     "the high-water mark reset through /proc/self/clear_refs first; includes the gradients it "
                     "returns (hidden, lm_weight); after a warm-up of the same row at a tiny shape; glibc "
                     f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} so that freed blocks leave RSS at once")
CUDA_MEMORY_METHOD = ("torch.cuda.max_memory_allocated over one fwd+bwd minus memory_allocated before it; includes "
                      "the gradients it returns (hidden, lm_weight)")


def measure_memory_in_process(args, row_keys: list[str]) -> dict[str, int]:
    """The body of the CPU memory subprocess: one call per row, in this process (fresh for the first row).
    Returns peak bytes per row key."""
    tiny = problem_from_args(args, rows=64, hidden=32, vocab=512)
    tiny_x = make_inputs(tiny)
    tiny_rows = {r.key: r for r in build_rows(tiny, tiny_x, args.backends, args.chunk_sizes)[0]}
    for key in row_keys:
        tiny_rows[key].step()
    del tiny_rows, tiny_x
    p = problem_from_args(args)
    x = make_inputs(p)
    rows = {r.key: r for r in build_rows(p, x, args.backends, args.chunk_sizes)[0]}
    peaks = {}
    for key in row_keys:
        clear_grads(x)
        gc.collect()
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS through /proc/self/clear_refs: no exact CPU memory figure")
        base_kib = proc_status_kib("VmRSS")
        rows[key].step()
        peaks[key] = (proc_status_kib("VmHWM") - base_kib) * 1024
    return peaks


def measure_memory(rows: list[Row], x: Inputs, args, progress: bool) -> None:
    """CUDA: in this process. CPU: one fresh subprocess per row (with --quick, one subprocess for all rows:
    then a row may reuse pages an earlier row freed, so its figure is a lower bound)."""
    device = torch.device(args.device)
    todo = [r for r in rows if r.error is None and r.family != "gemm"]
    if device.type == "cpu" and args.quick and todo:
        peaks = _memory_subprocess(args, [r.key for r in todo])
        for row in todo:
            if isinstance(peaks, str):
                row.error = peaks
            else:
                row.peak_bytes = peaks[row.key]
        return
    iterator = todo
    if progress:
        try:
            from tqdm import tqdm
            iterator = tqdm(todo, desc="peak memory", unit="row", dynamic_ncols=True)
        except ImportError:
            pass
    for row in iterator:
        if device.type == "cuda":
            clear_grads(x)
            gc.collect()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            row.step()
            torch.cuda.synchronize()
            row.peak_bytes = torch.cuda.max_memory_allocated() - base
            clear_grads(x)
            continue
        peaks = _memory_subprocess(args, [row.key])
        if isinstance(peaks, str):
            row.error = peaks
        else:
            row.peak_bytes = peaks[row.key]


def _memory_subprocess(args, keys: list[str]) -> dict[str, int] | str:
    """Peak bytes per row key from a fresh interpreter, or the error text."""
    cmd = [sys.executable, str(BENCH_OP), *args.child_argv, "--memory-rows", ",".join(keys)]
    # A fixed mmap threshold turns off glibc's sliding one, under which freed blocks up to 32 MiB stay in the
    # heap and in RSS depending on the order of frees: measured, the same row read 175 or 207 MiB from run to
    # run without it and the same figure to 4 KiB with it.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    found = re.search(r"^MEMORY_RESULT (.*)$", proc.stdout, re.M)
    if proc.returncode != 0 or not found:
        error = f"memory subprocess failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}"
        print(f"ERROR in rows {keys}: {error}", file=sys.stderr)
        return error
    return json.loads(found.group(1))
