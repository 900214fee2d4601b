"""pytest-benchmark version of bench_train.py: a few steps of each of its three modes (hf, fused-lm, full: Trainer
subclasses on `scft-fast train`'s set-up, bench_train.train_mode), at a tiny shape, in this process.

    pytest benchmarks/test_bench_train.py --benchmark-only      # about 30 s on 2 idle cores

Shape: a random-initialized Llama, H=64, 2 layers, V=4096 (the embedded tokenizer's ~3k ids stay in range),
float32 on CPU, 2 sequences packed into one row per step, 4 steps per call. The timed call is the whole run (model
load, data tokenization, the steps; one untimed warm-up call first), so the modes differ by their steps only;
extra_info holds the median step time after the first step, tokens per step and LM+RTO targets per step. To compare
the modes use bench_train.py: fresh processes, a 32k vocabulary, interleaved repetitions.
"""
import math
import os
import statistics
from types import SimpleNamespace

import pytest
import torch

from bench_train import MODES, train_mode, user_flags
from harness import save_random_llama

SHAPE = SimpleNamespace(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=4096, seed=0)
RUN = SimpleNamespace(steps=4, micro_batch_size=2, seed=0, backend="auto", rto_keep=None, packing=True, bf16=False)
WARMUP, ROUNDS = 1, 2
THREE_MODES = [m for m in MODES if m != "rto-rows"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("bench_train_model"))
    save_random_llama(SHAPE, directory)
    return directory


@pytest.mark.parametrize("mode", THREE_MODES)
def test_train_steps(benchmark, model_dir, tmp_path, mode):
    results = []

    def run():
        results.append(train_mode(mode, user_flags(model_dir, os.path.join(tmp_path, f"run{len(results)}"), RUN)))

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    rows = results[-1]["rows"]
    assert len(rows) == RUN.steps and all(math.isfinite(r["loss"]) for r in rows), rows
    timed = rows[WARMUP:]
    benchmark.extra_info.update(
        mode=mode, H=SHAPE.hidden, layers=SHAPE.layers, V=SHAPE.vocab, packed_sequences=RUN.micro_batch_size,
        steps=RUN.steps, dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu",
        median_step_s=statistics.median(r["step_time_s"] for r in timed),
        tokens_per_step=statistics.median(r["tokens"] for r in timed),
        loss_targets_per_step=statistics.median(r["loss_targets"] for r in timed))
