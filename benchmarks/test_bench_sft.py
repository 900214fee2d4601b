"""pytest-benchmark version of bench_sft.py: a few plain-SFT steps through each trainer / loss it compares, at a
tiny shape, in this process.

    pytest benchmarks/test_bench_sft.py --benchmark-only

Shape: a random-initialized Llama, H=64, 2 layers, V=4096, float32 on CPU, 2 sequences x 128 tokens per step,
4 steps per call. The timed call is trainer.train() (one untimed warm-up call first; a fresh trainer, model
loaded from one directory, for every call); extra_info holds the median step time after the first step and
the final loss. To compare the modes use bench_sft.py: fresh processes, a 32k vocabulary, 1024-token sequences.
"""
import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from bench_sft import MODES, build_trainer, step_clock
from harness import save_random_llama

SHAPE = SimpleNamespace(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=4096, seq_len=128,
                        batch_size=2, steps=4, prompt_frac=0.25, bf16=False, seed=0)
ROUNDS = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("bench_sft_model"))
    save_random_llama(SHAPE, directory)
    return directory


@pytest.mark.parametrize("mode", MODES)
def test_sft_steps(benchmark, model_dir, tmp_path, mode):
    runs = []

    def setup():
        clock = step_clock()
        runs.append((build_trainer(mode, model_dir, SHAPE, str(tmp_path / f"run{len(runs)}"), [clock]), clock))
        return (), {}

    benchmark.pedantic(lambda: runs[-1][0].train(), setup=setup, rounds=ROUNDS, warmup_rounds=1)
    trainer, clock = runs[-1]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == SHAPE.steps and all(math.isfinite(x) for x in losses), losses
    benchmark.extra_info.update(
        mode=mode, H=SHAPE.hidden, layers=SHAPE.layers, V=SHAPE.vocab, batch=SHAPE.batch_size,
        seq_len=SHAPE.seq_len, steps=SHAPE.steps, dtype="float32",
        device="cuda" if torch.cuda.is_available() else "cpu", median_step_s=statistics.median(clock.times[1:]),
        final_loss=losses[-1])
