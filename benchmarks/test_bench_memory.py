"""pytest-benchmark version of bench_memory.py: per-rank peak RSS by phase of `scft-fast train` as users run it, on
one process and on 2 gloo ranks under ZeRO-3 (`torchrun ... -m scft_fast.cli.train --deepspeed
training/zero3.json`), at bench_memory's --quick shape.

    pytest benchmarks/test_bench_memory.py --benchmark-only      # about a minute on 2 idle cores

Shape: a random-initialized Llama, H=128, 2 layers, V=4096 (bench_memory.SHAPES["quick"]), a local checkpoint
directory as --model, float32 on CPU, micro-batch 2 of <= 64 tokens, 2 steps. The timed call is one run of the
user's command observed from the outside (bench_memory.launch: start-up, data, build, initialize, steps, export;
one round, no warm-up: every call starts from nothing anyway); extra_info holds each rank's peak RSS per phase in
MiB. The figures against the targets come from bench_memory.py at the 156M shape.
"""
import argparse

import pytest

from bench_memory import PHASES, RUNS, SHAPES, figures, launch, parse_args
from harness import save_random_llama

ARGV = ["--quick", "--steps", "2", "--max-length", "64"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("bench_memory_model"))
    save_random_llama(argparse.Namespace(seed=0, **SHAPES["quick"]), directory)
    return directory


@pytest.mark.parametrize("run", ["1 process", "ZeRO-3"])
def test_memory_phases(benchmark, model_dir, run):
    observed = benchmark.pedantic(launch, args=(run, model_dir, parse_args(ARGV)), rounds=1, iterations=1)
    rows = figures({run: observed})[run]
    assert len(rows) == RUNS[run][1] and not observed["transformers_loader"]
    assert all(row[phase] > 0 for row in rows for phase in PHASES), rows
    benchmark.extra_info.update(
        run=run, command=observed["command"], shape=SHAPES["quick"], dtype="float32", device="cpu", steps=2,
        micro_batch_size=2, max_length=64,
        peak_mib_per_rank=[{phase: row[phase] for phase in (*PHASES, "build_alloc", "peak")} for row in rows])
