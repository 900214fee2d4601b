"""safety_epilogue_triton against the float64 definition safety_epilogue_ref (and safety_epilogue_torch, its spec).

Without CUDA the kernel runs under TRITON_INTERPRET=1 (set before triton is imported); shapes stay small.

Tolerances:
- Loss sums and float32 gradients: everything is computed in float32 from the same stored logits the float64
  reference reads, so the error is float32 rounding in the log-sum-exp over V <= 5000 terms: rtol 1e-5. The
  per-row statistics (cross-entropies, lse, entropy) are the same kind of float32 sums: rtol = atol 1e-5.
- bfloat16 / float16 gradients are the float32 gradient rounded once to the storage dtype: at most half an ulp
  with round-to-nearest (compiled Triton, and the interpreter's float16 cast), 2^-8 (bf16) / 2^-11 (fp16)
  relative. The interpreter rounds float32 -> bfloat16 toward zero, up to one ulp: 2^-7 relative there.
  atol 1e-6 covers float32 error on near-zero probabilities and float16 subnormals.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from scft_fast import IGNORE_INDEX  # noqa: E402
from scft_fast.kernels.safety_epilogue import safety_epilogue_triton  # noqa: E402
from scft_fast.ops.reference import epilogue_row_stats_ref, safety_epilogue_ref  # noqa: E402
from scft_fast.ops.safety_epilogue import ROW_CORRECT, ROW_STATS, safety_epilogue_torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Storage rounding plus the float32 compute error.
GRAD_RTOL = {
    torch.float32: 1e-5,
    torch.bfloat16: (2.0**-7 if INTERPRETED else 2.0**-8) + 1e-5,
    torch.float16: 2.0**-11 + 1e-5,
}


def _targets(c, V, gen):
    """(lm, tr) (c,) int64 cycling through the row kinds both / LM only / transition only / neither, plus one
    row whose two targets are the same token when c > 4."""
    lm = torch.randint(0, V, (c,), generator=gen)
    tr = torch.randint(0, V, (c,), generator=gen)
    kind = torch.arange(c) % 4
    lm[kind == 2] = IGNORE_INDEX
    tr[kind == 1] = IGNORE_INDEX
    lm[kind == 3] = IGNORE_INDEX
    tr[kind == 3] = IGNORE_INDEX
    if c > 4:
        tr[4] = lm[4]
    return lm.to(DEVICE), tr.to(DEVICE)


def _check(logits, lm, tr, lm_scale, tr_scale, softcap, ignore_index=IGNORE_INDEX):
    """Runs the kernel on a copy of logits and compares sums and gradient with the float64 reference."""
    ref_sums, ref_grad = safety_epilogue_ref(logits, lm, tr, lm_scale, tr_scale, softcap, ignore_index)
    grad = logits.clone()
    sums = safety_epilogue_triton(grad, lm, tr, lm_scale, tr_scale, softcap, ignore_index)
    assert sums.shape == (2,) and sums.dtype == torch.float32
    assert grad.dtype == logits.dtype
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=GRAD_RTOL[logits.dtype], atol=1e-6)
    neither = (lm == ignore_index) & (tr == ignore_index)
    assert (grad[neither] == 0).all(), "a row with neither target must get an all-zero gradient"
    return sums, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("shape_seed", [0, 1, 2])
def test_matches_float64_definition(dtype, softcap, shape_seed):
    gen = torch.Generator().manual_seed(1000 * shape_seed + 17)
    # One fixed edge shape per seed (one partial block; a last block of a single element), one random odd V.
    c, V = [(5, 1000), (4, 4097), (6, 2 * int(torch.randint(500, 2500, (1,), generator=gen)) + 1)][shape_seed]
    logits = (torch.randn(c, V, generator=gen) * 6.0).to(DEVICE, dtype)
    lm, tr = _targets(c, V, gen)
    lm_scale = torch.rand((), generator=gen).to(DEVICE) + 0.25
    tr_scale = torch.rand((), generator=gen).to(DEVICE) + 1.25
    _check(logits, lm, tr, lm_scale, tr_scale, softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_matches_torch_epilogue(dtype, softcap):
    gen = torch.Generator().manual_seed(5)
    c, V = 6, 3333
    logits = (torch.randn(c, V, generator=gen) * 4.0).to(DEVICE, dtype)
    lm, tr = _targets(c, V, gen)
    lm_scale, tr_scale = torch.tensor(0.6, device=DEVICE), torch.tensor(1.7, device=DEVICE)
    grad, torch_grad = logits.clone(), logits.clone()
    sums = safety_epilogue_triton(grad, lm, tr, lm_scale, tr_scale, softcap, IGNORE_INDEX)
    torch_sums = safety_epilogue_torch(torch_grad, lm, tr, lm_scale, tr_scale, softcap, IGNORE_INDEX)
    torch.testing.assert_close(sums, torch_sums, rtol=1e-5, atol=1e-5)
    # Both round the same float32 gradient once (the interpreter toward zero): within one storage ulp.
    torch.testing.assert_close(grad.float(), torch_grad.float(), rtol=2 * GRAD_RTOL[dtype], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 50.0])
def test_extreme_logits_stay_finite(dtype, softcap):
    gen = torch.Generator().manual_seed(7)
    c, V = 5, 2049
    logits = torch.randn(c, V, generator=gen)
    logits[0, :7] = 1e4  # a tie at the maximum
    logits[1] = -1e4 + torch.randn(V, generator=gen)  # a whole row near -1e4
    logits[2] = 1e4 + 100.0 * torch.randn(V, generator=gen)  # a whole row near +1e4
    logits[3, ::3] = -1e4
    logits[4, ::5] = 1e4
    logits = logits.to(DEVICE, dtype)
    lm = torch.tensor([3, 10, 2000, 0, 1], device=DEVICE)  # row 3 targets a -1e4 logit: CE ~ 2e4
    tr = torch.tensor([IGNORE_INDEX, 4, 5, 3, 5], device=DEVICE)
    scale = torch.tensor(1.0, device=DEVICE)
    sums, grad = _check(logits, lm, tr, scale, scale, softcap)
    assert torch.isfinite(sums).all() and torch.isfinite(grad).all()


def test_all_rows_ignored_gives_zeros():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 1500, generator=gen).to(DEVICE, torch.bfloat16)
    ignored = torch.full((4,), IGNORE_INDEX, device=DEVICE)
    scale = torch.tensor(1.0, device=DEVICE)
    sums = safety_epilogue_triton(logits, ignored, ignored, scale, scale, None, IGNORE_INDEX)
    assert sums.tolist() == [0.0, 0.0]
    assert (logits == 0).all()


def test_other_ignore_index_and_row_stride():
    """Rows may be a view with a row stride wider than V; the columns beyond V stay untouched."""
    gen = torch.Generator().manual_seed(13)
    c, V = 5, 1201
    buffer = torch.randn(c, V + 9, generator=gen).to(DEVICE)
    lm, tr = _targets(c, V, gen)
    lm[lm == IGNORE_INDEX], tr[tr == IGNORE_INDEX] = -1, -1
    scale = torch.tensor(0.5, device=DEVICE)
    ref_sums, ref_grad = safety_epilogue_ref(buffer[:, :V], lm, tr, scale, scale, None, -1)
    tail = buffer[:, V:].clone()
    sums = safety_epilogue_triton(buffer[:, :V], lm, tr, scale, scale, None, -1)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffer[:, :V].double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(buffer[:, V:], tail)


def test_empty_chunk():
    logits = torch.empty(0, 1000, device=DEVICE)
    target = torch.empty(0, dtype=torch.int64, device=DEVICE)
    scale = torch.tensor(1.0, device=DEVICE)
    assert safety_epilogue_triton(logits, target, target, scale, scale, None, IGNORE_INDEX).tolist() == [0.0, 0.0]


def test_bad_arguments_are_named():
    logits = torch.randn(3, 1000, device=DEVICE)
    target = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    scale = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="lm_target"):
        safety_epilogue_triton(logits, target.int(), target, scale, scale, None, IGNORE_INDEX)
    with pytest.raises(ValueError, match="tr_target"):
        safety_epilogue_triton(logits, target, target[:2], scale, scale, None, IGNORE_INDEX)
    with pytest.raises(TypeError, match="logits"):
        safety_epilogue_triton(logits.double(), target, target, scale, scale, None, IGNORE_INDEX)
    with pytest.raises(ValueError, match="column stride"):
        safety_epilogue_triton(logits.T, target, target, scale, scale, None, IGNORE_INDEX)
    with pytest.raises(ValueError, match="softcap"):
        safety_epilogue_triton(logits, target, target, scale, scale, 0.0, IGNORE_INDEX)


def _options_chunk(c, V, dtype, seed):
    """Logits with every row kind, one LM target on its row's maximum and one row whose maximum is tied, the target
    on the second of the two (torch.argmax takes the first: not correct)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(c, V, generator=gen) * 4.0
    lm, tr = _targets(c, V, gen)
    logits[0, 3] = logits[0].max() + 1.0
    lm[0] = 3
    logits[1, 7] = logits[1, 9] = logits[1].max() + 1.0
    lm[1] = 9
    return logits.to(DEVICE, dtype), lm, tr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar-scales", "per-row-scales"])
def test_options_match_float64_definition(dtype, softcap, per_row):
    """Label smoothing, the z-loss and per-row scales in the gradient; row_stats with the token stats."""
    c, V = 9, 2049
    logits, lm, tr = _options_chunk(c, V, dtype, seed=21)
    gen = torch.Generator().manual_seed(22)
    shape = (c,) if per_row else ()
    lm_scale, tr_scale, z_scale = ((torch.rand(shape, generator=gen) + 0.25).to(DEVICE) for _ in range(3))
    ref_sums, ref_grad = safety_epilogue_ref(logits, lm, tr, lm_scale, tr_scale, softcap, IGNORE_INDEX, 0.1,
                                             z_scale * 1e-2)
    ref_stats = epilogue_row_stats_ref(logits, lm, tr, softcap, IGNORE_INDEX, 0.1)
    grad, stats = logits.clone(), torch.full((c, ROW_STATS), -7.0, device=DEVICE)
    sums = safety_epilogue_triton(grad, lm, tr, lm_scale, tr_scale, softcap, IGNORE_INDEX, 0.1, z_scale * 1e-2,
                                  stats, True)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=GRAD_RTOL[dtype], atol=1e-6)
    torch.testing.assert_close(stats.double(), ref_stats, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert stats[:, ROW_CORRECT].tolist()[:2] == [1.0, 0.0]


def test_without_gradient_the_losses_and_row_stats_are_the_same():
    logits, lm, tr = _options_chunk(6, 1500, torch.float32, seed=23)
    scale = torch.tensor(0.5, device=DEVICE)
    results = []
    for compute_grad in (True, False):
        stats = torch.empty(6, ROW_STATS, device=DEVICE)
        sums = safety_epilogue_triton(logits.clone(), lm, tr, scale, scale, 20.0, IGNORE_INDEX, 0.05, None, stats,
                                      True, compute_grad)
        results.append((sums, stats))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1].nan_to_num(), results[1][1].nan_to_num())
