"""pytest-benchmark version of bench_train.py: `scft_fast.training.train` for a few steps in each of its three
modes (hf, fused-lm, full), at a tiny shape, in this process.

    pytest benchmarks/test_bench_train.py --benchmark-only      # about 15 s on 2 idle cores

Shape: a random-initialized Llama, H=64, 2 layers, V=4096 (the embedded tokenizer's ~2.4k ids stay in range),
float32 on CPU, packed rows of <= 256 tokens, 4 steps per call. The timed call is the whole train() (model
load, data tokenization, the steps, the final save; one untimed warm-up call first), so the modes differ by
their steps only; extra_info holds the loop's own median step time after the first step, tokens per step and
LM+RTO targets per step. To compare the modes use bench_train.py: fresh processes, a 32k vocabulary,
interleaved repetitions.
"""
import json
import math
import os
import statistics
from types import SimpleNamespace

import pytest
import torch

from bench_train import LOSS_HOOKS, MODES
from harness import save_random_llama

SHAPE = SimpleNamespace(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=4096, seed=0)
MAX_TOKENS, STEPS, WARMUP, ROUNDS = 256, 4, 1, 2
THREE_MODES = [m for m in MODES if m != "rto-rows"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("bench_train_model"))
    save_random_llama(SHAPE, directory)
    return directory


@pytest.mark.parametrize("mode", THREE_MODES)
def test_train_steps(benchmark, model_dir, tmp_path, mode):
    from scft_fast.training import train
    from scft_fast.training.config import DataSpec, ModelSpec, OptimSpec, TrainConfig

    output_dirs = []

    def config():
        output_dir = os.path.join(tmp_path, f"run{len(output_dirs)}")
        output_dirs.append(output_dir)
        return (TrainConfig(
            model=ModelSpec(name_or_path=model_dir),
            data=DataSpec(packing=True, max_tokens=MAX_TOKENS, eval_samples=0),
            optim=OptimSpec(warmup_steps=0, schedule="constant"), output_dir=output_dir, max_steps=STEPS,
            seed=SHAPE.seed, save_every=0, progress=False, summary=False),), {}

    benchmark.pedantic(lambda c: train(c, loss_hook=LOSS_HOOKS[mode]), setup=config, rounds=ROUNDS,
                       warmup_rounds=1)
    with open(os.path.join(output_dirs[-1], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == STEPS and all(math.isfinite(r["loss"]) for r in rows), rows
    timed = rows[WARMUP:]
    benchmark.extra_info.update(
        mode=mode, H=SHAPE.hidden, layers=SHAPE.layers, V=SHAPE.vocab, max_tokens=MAX_TOKENS, steps=STEPS,
        dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu", median_step_s=statistics.median(r["step_time_s"] for r in timed),
        tokens_per_step=statistics.median(r["tokens"] for r in timed),
        loss_targets_per_step=statistics.median(r["lm_tokens"] + r["rto_tokens"] for r in timed))
