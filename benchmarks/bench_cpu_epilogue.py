"""The per-chunk epilogue alone on CPU: safety_epilogue_torch (vectorized passes) vs safety_epilogue_cpu (C++).

One logits chunk (c, V), seeded N(0, 2^2) logits; rows alternate LM target / LM + transition target, as in
a DeRTa batch after skipped rows are compacted away. Each repetition copies the pristine chunk into the
buffer (not timed) and times one call of each epilogue, in alternating order, so that a load spike on a
shared machine hits both alike; the table shows medians.

    python benchmarks/bench_cpu_epilogue.py                  # c=256 (the op's chunk at N=4096, H=512), V=32000
    python benchmarks/bench_cpu_epilogue.py --rows 1024 --reps 9
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from harness import command_line, cpu_name, rotations, time_call
from scft_fast import IGNORE_INDEX
from scft_fast.ops.cpu_extension import load_cpu_extension, safety_epilogue_cpu
from scft_fast.ops.safety_epilogue import safety_epilogue_torch


def time_epilogues(rows: int, vocab: int, dtype: torch.dtype, softcap: float | None, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    pristine = (torch.randn(rows, vocab, generator=gen) * 2.0).to(dtype)
    lm_target = torch.randint(0, vocab, (rows,), generator=gen)
    tr_target = torch.full((rows,), IGNORE_INDEX)
    tr_target[1::2] = 17  # the refusal token
    scale = torch.tensor(1.0 / rows)
    buffer = torch.empty_like(pristine)
    epilogues = {"torch": safety_epilogue_torch, "cpu": safety_epilogue_cpu}
    times = {name: [] for name in epilogues}
    cpu = torch.device("cpu")
    for rep, order in enumerate(rotations(list(epilogues), reps + 1)):  # the first repetition warms up, dropped
        for name in order:
            buffer.copy_(pristine)
            elapsed = time_call(lambda: epilogues[name](buffer, lm_target, tr_target, scale, scale, softcap,
                                                        IGNORE_INDEX), cpu)
            if rep > 0:
                times[name].append(elapsed)
    return {name: statistics.median(samples) for name, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="rows per chunk (c)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (V)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (median reported)")
    args = parser.parse_args()
    if load_cpu_extension() is None:
        sys.exit("the C++ CPU epilogue could not be built here (see the warning above)")

    print(f"command: {command_line(__file__, sys.argv[1:])}")
    print(f"device:  {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"chunk:   ({args.rows}, {args.vocab}) logits, median of {args.reps} repetitions\n")
    print("| dtype    | softcap | torch (ms) | cpu (ms) | speedup | cpu ns/element |")
    print("|----------|---------|-----------:|---------:|--------:|---------------:|")
    for dtype in (torch.float32, torch.bfloat16):
        for softcap in (None, 30.0):
            median = time_epilogues(args.rows, args.vocab, dtype, softcap, args.reps)
            per_element = median["cpu"] / (args.rows * args.vocab) * 1e9
            print(f"| {str(dtype).removeprefix('torch.'):8} | {str(softcap):7} | {median['torch'] * 1e3:10.1f} "
                  f"| {median['cpu'] * 1e3:8.1f} | {median['torch'] / median['cpu']:6.2f}x | {per_element:14.2f} |")


if __name__ == "__main__":
    main()
