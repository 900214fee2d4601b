"""cls_head_triton against the float64 definition cls_head_ref (autograd) and cls_head_torch, its spec.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (set before triton is imported); shapes stay small.

Tolerances: every output is float32 computed from the same stored inputs (bf16 inputs upcast exactly) that the
float64 reference reads, so only float32 rounding of H <= 300 term dot products and a C-way softmax remains,
whatever the input dtype: rtol 1e-5, atol 1e-5 (atol for gradients that cancel to ~0).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from scft_fast import IGNORE_INDEX  # noqa: E402
from scft_fast.kernels.cls_head import cls_head_triton  # noqa: E402
from scft_fast.ops.cls_head import cls_head_torch  # noqa: E402
from scft_fast.ops.reference import cls_head_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(N, H, C, S, dtype, bias, gen, hidden_std=1.0):
    hidden = (torch.randn(N, H, generator=gen) * hidden_std).to(DEVICE, dtype)
    cls_weight = (torch.randn(C, H, generator=gen) / H**0.5).to(DEVICE, dtype)
    cls_bias = torch.randn(C, generator=gen).to(DEVICE, dtype) if bias else None
    cls_index = torch.randint(0, N, (S,), generator=gen)
    cls_index[-1] = cls_index[0]  # a duplicate: its gradients must add
    cls_labels = torch.randint(0, C, (S,), generator=gen)
    cls_labels[1] = IGNORE_INDEX
    return hidden, cls_index.to(DEVICE), cls_labels.to(DEVICE), cls_weight, cls_bias


def _check(hidden, cls_index, cls_labels, cls_weight, cls_bias, cls_scale, ignore_index=IGNORE_INDEX, tol=TOL):
    out = cls_head_triton(hidden, cls_index, cls_labels, cls_weight, cls_bias, cls_scale, ignore_index, True)
    ref = cls_head_ref(hidden, cls_index, cls_labels, cls_weight, cls_bias, cls_scale, ignore_index)
    names = ("ce", "cls_logits", "grad_pooled", "grad_cls_weight", "grad_cls_bias")
    for name, got, want in zip(names, out, ref):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, name=name: f"{name}: {m}")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,H,C,S", [(13, 32, 2, 4), (9, 97, 5, 6), (21, 160, 16, 7), (8, 300, 3, 5)])
def test_matches_float64_definition(dtype, bias, N, H, C, S):
    gen = torch.Generator().manual_seed(N * H + C)
    hidden, cls_index, cls_labels, cls_weight, cls_bias = _inputs(N, H, C, S, dtype, bias, gen)
    cls_scale = torch.rand((), generator=gen).to(DEVICE) + 0.1
    _check(hidden, cls_index, cls_labels, cls_weight, cls_bias, cls_scale)


@pytest.mark.parametrize("bias", [True, False])
def test_matches_cls_head_torch(bias):
    gen = torch.Generator().manual_seed(3)
    hidden, cls_index, cls_labels, cls_weight, cls_bias = _inputs(11, 75, 4, 6, torch.float32, bias, gen)
    cls_scale = torch.tensor(0.4, device=DEVICE)
    for compute_grad in (True, False):
        args = (hidden, cls_index, cls_labels, cls_weight, cls_bias, cls_scale, IGNORE_INDEX, compute_grad)
        out, want = cls_head_triton(*args), cls_head_torch(*args)
        for got, expected in zip(out, want):
            assert (got is None) == (expected is None)
            if expected is not None:
                torch.testing.assert_close(got, expected, **TOL)


def test_duplicate_rows_add():
    """Three copies of one row with the same label: three times the weight gradient of one copy."""
    gen = torch.Generator().manual_seed(4)
    hidden, _, _, cls_weight, cls_bias = _inputs(6, 41, 3, 3, torch.float32, True, gen)
    scale = torch.tensor(1.0, device=DEVICE)
    one = cls_head_triton(hidden, torch.tensor([2], device=DEVICE), torch.tensor([1], device=DEVICE),
                          cls_weight, cls_bias, scale, IGNORE_INDEX, True)
    three = cls_head_triton(hidden, torch.tensor([2, 2, 2], device=DEVICE), torch.tensor([1, 1, 1], device=DEVICE),
                            cls_weight, cls_bias, scale, IGNORE_INDEX, True)
    torch.testing.assert_close(three[3], 3 * one[3], **TOL)
    torch.testing.assert_close(three[4], 3 * one[4], **TOL)


def test_strided_inputs_and_other_ignore_index():
    gen = torch.Generator().manual_seed(5)
    N, H, C = 10, 53, 6
    hidden = torch.randn(H, N, generator=gen).to(DEVICE).T  # (N, H) with strides (1, N)
    cls_weight = (torch.randn(H, C, generator=gen) / H**0.5).to(DEVICE).T
    cls_bias = torch.randn(2 * C, generator=gen).to(DEVICE)[::2]
    cls_index = torch.tensor([9, 0, 4, 4, 7, 1, 3, 0], device=DEVICE)[::2]
    cls_labels = torch.tensor([5, 0, -1, 0, 2, 1, 0, 0], device=DEVICE)[::2]
    _check(hidden, cls_index, cls_labels, cls_weight, cls_bias, torch.tensor(0.3, device=DEVICE), ignore_index=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extreme_logits_stay_finite(dtype):
    gen = torch.Generator().manual_seed(6)
    hidden, cls_index, cls_labels, cls_weight, cls_bias = _inputs(7, 64, 4, 5, dtype, True, gen, hidden_std=2e3)
    # A float32 dot product's rounding error scales with the sum of its |terms| (~1e4 here), not its result.
    terms = (hidden[cls_index].double().abs() @ cls_weight.double().abs().T).max().item()
    tol = dict(rtol=1e-5, atol=1e-5 * terms)
    out = _check(hidden, cls_index, cls_labels, cls_weight, cls_bias, torch.tensor(1.0, device=DEVICE), tol=tol)
    assert out[1].abs().max() > 1e3, "the test needs logits far from 0"
    assert all(torch.isfinite(t).all() for t in out)


def test_no_labeled_row_and_no_row():
    gen = torch.Generator().manual_seed(8)
    hidden, cls_index, cls_labels, cls_weight, cls_bias = _inputs(5, 33, 2, 4, torch.float32, True, gen)
    scale = torch.tensor(1.0, device=DEVICE)
    ce, _, grad_pooled, grad_weight, grad_bias = cls_head_triton(
        hidden, cls_index, torch.full_like(cls_labels, IGNORE_INDEX), cls_weight, cls_bias, scale, IGNORE_INDEX, True)
    for t in (ce, grad_pooled, grad_weight, grad_bias):
        assert (t == 0).all()
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    ce, logits, grad_pooled, grad_weight, grad_bias = cls_head_triton(
        hidden, empty, empty, cls_weight, cls_bias, scale, IGNORE_INDEX, True)
    assert ce.shape == (0,) and logits.shape == (0, 2) and grad_pooled.shape == (0, 33)
    assert (grad_weight == 0).all() and (grad_bias == 0).all()


def test_bad_arguments_are_named():
    hidden = torch.randn(4, 32, device=DEVICE)
    index = torch.tensor([0, 3], device=DEVICE)
    scale = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="C=17"):
        cls_head_triton(hidden, index, index, torch.randn(17, 32, device=DEVICE), None, scale, IGNORE_INDEX, True)
    with pytest.raises(ValueError, match="cls_weight"):
        cls_head_triton(hidden, index, index, torch.randn(2, 31, device=DEVICE), None, scale, IGNORE_INDEX, True)
    with pytest.raises(ValueError, match="cls_labels"):
        cls_head_triton(hidden, index, index[:1], torch.randn(2, 32, device=DEVICE), None, scale, IGNORE_INDEX, True)
    with pytest.raises(ValueError, match="cls_bias"):
        cls_head_triton(hidden, index, index, torch.randn(2, 32, device=DEVICE), torch.randn(3, device=DEVICE),
                        scale, IGNORE_INDEX, True)
