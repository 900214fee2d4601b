"""pytest-benchmark versions of bench_op_options.py's rows, forward + backward at a small CPU shape.

    pytest benchmarks/test_bench_op_options.py --benchmark-only

Shape: N=1024, H=128, V=8192, float32, a third of the rows ignored, a quarter of the loss rows on RTO (bench_op.py's
inputs at a tenth of its CPU shape), no head. Each row also checks its loss against the float64 reference with the
same options (summed for reduction="none"), so a fast wrong row fails instead of posting a time; compare a row's
median with the default row's for the cost of its option.
"""
import math

import pytest
import torch

from bench_op_options import OPTIONS
from op_rows import Problem, available_backends, make_inputs
from scft_fast import safety_loss
from scft_fast.ops.reference import safety_loss_ref

PROBLEM = Problem(rows=1024, hidden=128, vocab=8192, dtype=torch.float32, device=torch.device("cpu"),
                  prompt_frac=1 / 3, transition_frac=0.25, seq_len=256, classes=2, seed=0)
ROUNDS = 3


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(PROBLEM)


@pytest.mark.parametrize("backend", available_backends(PROBLEM.device))
@pytest.mark.parametrize("name", list(OPTIONS))
def test_fwd_bwd(benchmark, inputs, backend, name):
    options = OPTIONS[name]
    upstream = torch.rand(PROBLEM.rows, generator=torch.Generator().manual_seed(1)) + 0.5

    def step():
        for t in inputs.params():
            t.grad = None
        loss = safety_loss(inputs.hidden, inputs.lm_weight, inputs.full_labels,
                           transition_labels=inputs.transition_labels, backend=backend, **options).loss
        loss.backward(upstream if loss.dim() else None)
        return loss.detach().sum()

    loss = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info.update(N=PROBLEM.rows, H=PROBLEM.hidden, V=PROBLEM.vocab, N_loss=inputs.n_loss,
                                dtype="float32", options=options, torch_threads=torch.get_num_threads())
    ref_options = {k: v for k, v in options.items() if not k.startswith("return_")}
    expected = safety_loss_ref(inputs.hidden.detach(), inputs.lm_weight.detach(), inputs.full_labels,
                               transition_labels=inputs.transition_labels, **ref_options)["loss"].sum()
    assert math.isclose(float(loss), float(expected), rel_tol=1e-4), f"{name}: {float(loss)} != {float(expected)}"
