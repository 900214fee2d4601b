"""pytest-benchmark versions of bench_op.py's rows, forward + backward at a small CPU shape.

    pytest benchmarks/ --benchmark-only                    # about a minute on 2 idle cores
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json

Shape: N=1024, H=128, V=8192, float32, a third of the rows ignored (N_loss = 683), the full run with a quarter
of the loss rows on RTO and S = 4 pooled rows, C = 2: bench_op.py's inputs at a tenth of its CPU shape.
Each row also checks that it computes the naive row's loss (the full row: its own float64 reference), so a
fast wrong row fails instead of posting a time. extra_info records the shape, dtype and achieved TFLOP/s
(6 * N_loss * H * V over the median).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from bench_op import Problem, available_backends, build_rows, make_inputs
from scft_fast.ops.reference import safety_loss_ref

PROBLEM = Problem(rows=1024, hidden=128, vocab=8192, dtype=torch.float32, device=torch.device("cpu"),
                  prompt_frac=1 / 3, transition_frac=0.25, seq_len=256, classes=2, seed=0)
AVAILABLE_BACKENDS = available_backends(PROBLEM.device)
ROW_KEYS = ["gemm", "naive", "lce_ref", "lce_auto", "lce_aspect",
            *(f"scft_{kind}:{b}:auto" for b in AVAILABLE_BACKENDS for kind in ("lm", "full"))]
ROUNDS = 3


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(PROBLEM)


@pytest.fixture(scope="module")
def rows(inputs):
    return {row.key: row for row in build_rows(PROBLEM, inputs, AVAILABLE_BACKENDS, [])[0]}


def _full_loss_float64(x) -> float:
    """loss = (lm_sum + tr_sum) / (n_lm + n_tr) + mean cls cross-entropy: the op's float64 reference."""
    ref = safety_loss_ref(x.hidden.detach(), x.lm_weight.detach(), x.full_labels,
                          transition_labels=x.transition_labels, cls_weight=x.cls_weight.detach(),
                          cls_bias=x.cls_bias.detach(), cls_index=x.cls_index, cls_labels=x.cls_labels)
    return float(ref["loss"])


@pytest.mark.parametrize("key", ROW_KEYS)
def test_fwd_bwd(benchmark, rows, inputs, key):
    row = rows[key]

    def clear_grads():
        for t in inputs.params():
            t.grad = None

    loss = benchmark.pedantic(row.step, setup=clear_grads, rounds=ROUNDS, warmup_rounds=1)
    flops = 6.0 * inputs.n_loss * PROBLEM.hidden * PROBLEM.vocab
    benchmark.extra_info.update(
        N=PROBLEM.rows, H=PROBLEM.hidden, V=PROBLEM.vocab, N_loss=inputs.n_loss, dtype="float32",
        gflop_per_call=flops / 1e9, tflops_median=flops / benchmark.stats.stats.median / 1e12,
        torch_threads=torch.get_num_threads())
    if row.family == "gemm":
        return
    if row.family == "scft_full":
        expected = _full_loss_float64(inputs)
    else:
        expected = float(F.cross_entropy(inputs.hidden.detach() @ inputs.lm_weight.detach().T, inputs.labels))
    assert math.isclose(float(loss), expected, rel_tol=1e-4), f"{key}: loss {float(loss)} != {expected}"
