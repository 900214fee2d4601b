"""The C++ CPU epilogue (csrc/safety_epilogue.cpp) against a float64 reference and safety_epilogue_torch.

Tolerances, on gradients of size up to a + b (about 2) and on per-row cross-entropies of size about log V:
- float32: the kernel's exp and tanh are Cephes polynomials (about 1 ulp), the row sum is float32 in 8 lanes;
  measured worst error 1.3e-6 relative: relative 5e-6 and absolute 1e-7 on the gradient (1e-5 against
  safety_epilogue_torch, which has errors of its own), 1e-5 relative on the sums.
- bfloat16 / float16 storage: the gradient is rounded once to 8 (11) significant bits, at most 2^-8 (2^-11)
  relative, plus float32 noise: 2^-7 (2^-10). Against safety_epilogue_torch, which rounds a float32 value that
  may differ in the last bits, one ulp more: 2^-6 (2^-9). float16 also flushes weights under its 6e-8 subnormal
  spacing, covered by the absolute 1e-7.
- The per-row statistics (cross-entropies, lse, entropy) are float32 sums like the losses: rtol = atol 1e-5.
"""
from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

from scft_fast import IGNORE_INDEX
from scft_fast.ops import cpu_extension
from scft_fast.ops.cpu_extension import load_cpu_extension, safety_epilogue_cpu
from scft_fast.ops.reference import epilogue_row_stats_ref, safety_epilogue_ref
from scft_fast.ops.safety_epilogue import ROW_CORRECT, ROW_STATS, safety_epilogue_torch

GRAD_TOL = {  # storage dtype -> (rtol, atol) of the gradient against the float64 reference
    torch.float32: (5e-6, 1e-7),
    torch.bfloat16: (2.0**-7, 1e-7),
    torch.float16: (2.0**-10, 1e-7),
}


@pytest.fixture(scope="module")
def extension():
    """One build (or cache hit) per test session; every later load in the process is free."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = load_cpu_extension()
    if module is None:  # like every backend that exists but does not load: fail, with the reason
        pytest.fail("the C++ CPU epilogue did not load: " + "; ".join(str(w.message) for w in caught))
    print(f"\nC++ CPU epilogue loaded in {time.perf_counter() - start:.1f} s from {module.__file__}")
    return module


def make_chunk(rows: int, vocab: int, dtype: torch.dtype, seed: int, scale: float = 4.0, offset: float = 0.0):
    """Random logits and targets covering every row kind: LM only, transition only, both (equal or not), neither."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * scale + offset).to(dtype)
    lm_target = torch.randint(0, vocab, (rows,), generator=gen)
    tr_target = torch.randint(0, vocab, (rows,), generator=gen)
    kind = torch.arange(rows) % 5  # 0: LM only, 1: transition only, 2: both, 3: both on one token, 4: neither
    lm_target[(kind == 1) | (kind == 4)] = IGNORE_INDEX
    tr_target[(kind == 0) | (kind == 4)] = IGNORE_INDEX
    tr_target[kind == 3] = lm_target[kind == 3]
    return logits, lm_target, tr_target


def run(fn, logits, lm_target, tr_target, lm_scale, tr_scale, softcap):
    grad = logits.clone()
    sums = fn(grad, lm_target, tr_target, torch.tensor(lm_scale), torch.tensor(tr_scale), softcap, IGNORE_INDEX)
    return sums, grad


def epilogue_ref(logits, lm_target, tr_target, lm_scale, tr_scale, softcap):
    """The float64 definition, called like ``run``: (sums (2,), grad (c, V)), both float64."""
    return safety_epilogue_ref(logits, lm_target, tr_target, torch.tensor(lm_scale), torch.tensor(tr_scale), softcap,
                               IGNORE_INDEX)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("rows, vocab", [(1, 1000), (7, 1537), (33, 3001), (10, 5000)])
def test_matches_reference(extension, dtype, softcap, rows, vocab):
    logits, lm_target, tr_target = make_chunk(rows, vocab, dtype, seed=rows * vocab)
    sums, grad = run(safety_epilogue_cpu, logits, lm_target, tr_target, 0.37, 1.9, softcap)
    ref_sums, ref_grad = epilogue_ref(logits, lm_target, tr_target, 0.37, 1.9, softcap)
    assert sums.dtype == torch.float32 and sums.shape == (2,) and grad.dtype == dtype
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)
    skipped = (lm_target == IGNORE_INDEX) & (tr_target == IGNORE_INDEX)
    assert torch.equal(grad[skipped], torch.zeros_like(grad[skipped]))

    torch_sums, torch_grad = run(safety_epilogue_torch, logits, lm_target, tr_target, 0.37, 1.9, softcap)
    torch.testing.assert_close(sums, torch_sums, rtol=1e-5, atol=1e-5)
    rtol_torch = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}[dtype]
    torch.testing.assert_close(grad.float(), torch_grad.float(), rtol=rtol_torch, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "scale, offset", [(300.0, 0.0), (4.0, 3e4), (4.0, -3e4)], ids=["spiky", "large", "very-negative"]
)
def test_extreme_logits(extension, dtype, scale, offset):
    """Softmax weights that underflow to 0, and logits far from 0 (the max is subtracted before exp)."""
    logits, lm_target, tr_target = make_chunk(20, 2003, dtype, seed=7, scale=scale, offset=offset)
    sums, grad = run(safety_epilogue_cpu, logits, lm_target, tr_target, 1.0, 0.5, None)
    ref_sums, ref_grad = epilogue_ref(logits, lm_target, tr_target, 1.0, 0.5, None)
    assert torch.isfinite(sums).all() and torch.isfinite(grad).all()
    # lse = m + log(s) is float32 (the contract): it is off by up to an ulp of |m|, once per valid row.
    rows = ((lm_target != IGNORE_INDEX).sum() + (tr_target != IGNORE_INDEX).sum()).item()
    atol = rows * 2 * torch.finfo(torch.float32).eps * logits.float().abs().max().item()
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=atol)
    rtol, grad_atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=grad_atol)


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
def test_nan_propagates_like_torch(extension, softcap):
    """A NaN logit makes its row's loss and gradient NaN, as in safety_epilogue_torch; other rows are untouched."""
    logits, lm_target, tr_target = make_chunk(5, 1000, torch.float32, seed=11)
    logits[0, 123] = float("nan")
    sums, grad = run(safety_epilogue_cpu, logits, lm_target, tr_target, 1.0, 1.0, softcap)
    torch_sums, torch_grad = run(safety_epilogue_torch, logits, lm_target, tr_target, 1.0, 1.0, softcap)
    assert torch.isnan(sums[0]) and torch.isnan(torch_sums[0]) and grad[0].isnan().all()
    torch.testing.assert_close(grad[1:], torch_grad[1:], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar-scales", "per-row-scales"])
def test_options_match_reference(extension, dtype, softcap, per_row):
    """Label smoothing, the z-loss and per-row scales in the gradient; row_stats with the token stats, where row 0's
    LM target is its row's maximum and row 2's maximum is tied, its target the second of the two (torch.argmax,
    and so the kernel, takes the first)."""
    logits, lm_target, tr_target = make_chunk(12, 2003, dtype, seed=5)
    logits = logits.float()
    logits[0, 3] = logits[0].max() + 1.0
    lm_target[0] = 3
    logits[2, 7] = logits[2, 1500] = logits[2].max() + 1.0
    lm_target[2] = 1500
    logits = logits.to(dtype)
    gen = torch.Generator().manual_seed(6)
    shape = (12,) if per_row else ()
    lm_scale, tr_scale, z_scale = (torch.rand(shape, generator=gen) + 0.25 for _ in range(3))
    z_scale = z_scale * 1e-2
    ref_sums, ref_grad = safety_epilogue_ref(logits, lm_target, tr_target, lm_scale, tr_scale, softcap, IGNORE_INDEX,
                                             0.1, z_scale)
    grad, stats = logits.clone(), torch.full((12, ROW_STATS), -7.0)
    sums = safety_epilogue_cpu(grad, lm_target, tr_target, lm_scale, tr_scale, softcap, IGNORE_INDEX, 0.1, z_scale,
                               stats, True)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
    # atol 1e-6: the tied target entry is a softmax weight of about 1 minus a target weight of about 1 (a few ulps
    # of 1 survive the cancellation), as in test_kernels_safety_epilogue.py.
    torch.testing.assert_close(grad.double(), ref_grad, rtol=GRAD_TOL[dtype][0], atol=1e-6)
    ref_stats = epilogue_row_stats_ref(logits, lm_target, tr_target, softcap, IGNORE_INDEX, 0.1)
    torch.testing.assert_close(stats.double(), ref_stats, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert stats[0, ROW_CORRECT] == 1.0 and stats[2, ROW_CORRECT] == 0.0

    torch_grad, torch_stats = logits.clone(), torch.empty(12, ROW_STATS)
    torch_sums = safety_epilogue_torch(torch_grad, lm_target, tr_target, lm_scale, tr_scale, softcap, IGNORE_INDEX,
                                       0.1, z_scale, torch_stats, True)
    torch.testing.assert_close(sums, torch_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats, torch_stats, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_without_gradient_the_losses_and_row_stats_are_the_same(extension):
    logits, lm_target, tr_target = make_chunk(10, 1500, torch.float32, seed=8)
    scale = torch.tensor(0.5)
    results = []
    for compute_grad in (True, False):
        stats = torch.empty(10, ROW_STATS)
        sums = safety_epilogue_cpu(logits.clone(), lm_target, tr_target, scale, scale, 20.0, IGNORE_INDEX, 0.05, None,
                                   stats, True, compute_grad)
        results.append((sums, stats))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1].nan_to_num(), results[1][1].nan_to_num())


def test_every_row_skipped(extension):
    logits = torch.randn(6, 1000)
    target = torch.full((6,), IGNORE_INDEX)
    sums, grad = run(safety_epilogue_cpu, logits, target, target, 1.0, 1.0, 30.0)
    assert torch.equal(sums, torch.zeros(2)) and torch.equal(grad, torch.zeros_like(grad))


def test_empty_chunk(extension):
    empty = torch.empty(0, dtype=torch.long)
    sums, grad = run(safety_epilogue_cpu, torch.empty(0, 1000), empty, empty, 1.0, 1.0, None)
    assert torch.equal(sums, torch.zeros(2)) and grad.shape == (0, 1000)


def test_independent_of_thread_count(extension):
    """Rows are independent and the sums are added in row order: bitwise the same on 1 and on all threads."""
    logits, lm_target, tr_target = make_chunk(16, 4099, torch.float32, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(safety_epilogue_cpu, logits, lm_target, tr_target, 0.5, 0.5, 30.0)
    finally:
        torch.set_num_threads(threads)
    many = run(safety_epilogue_cpu, logits, lm_target, tr_target, 0.5, 0.5, 30.0)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_target_out_of_range_is_refused(extension):
    logits, lm_target, tr_target = make_chunk(5, 1000, torch.float32, seed=1)
    lm_target[2] = 1000
    with pytest.raises(RuntimeError, match=r"lm_target\[2\] = 1000"):
        run(safety_epilogue_cpu, logits, lm_target, tr_target, 1.0, 1.0, None)


def test_second_load_is_a_cache_hit(extension):
    if extension.__name__ == "scft_fast._C":
        pytest.skip("the prebuilt scft_fast._C is in use: no just-in-time build to hit")
    built = sorted(p for p in (cpu_extension.cache_dir() / cpu_extension.build_key()).iterdir() if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in built}
    module = cpu_extension._build_just_in_time()
    assert module.build_key == extension.build_key == cpu_extension.build_key()
    assert {p: p.stat().st_mtime_ns for p in built} == stamps, "the second load rebuilt the extension"


def test_missing_compiler_warns_once_and_falls_back(monkeypatch):
    def no_prebuilt():
        raise ImportError("no scft_fast._C")

    monkeypatch.setattr(cpu_extension, "_import_prebuilt", no_prebuilt)
    monkeypatch.setattr(cpu_extension, "_loaded", False)
    monkeypatch.setattr(cpu_extension, "_module", None)
    monkeypatch.setenv("CXX", os.path.join(os.sep, "nonexistent", "c++"))
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler") as caught:
        assert load_cpu_extension() is None
        assert load_cpu_extension() is None  # the second call: the cached outcome, no second warning
    assert len(caught) == 1
    with pytest.raises(RuntimeError, match="backend='torch'"):
        run(safety_epilogue_cpu, torch.randn(2, 1000), torch.zeros(2, dtype=torch.long),
            torch.zeros(2, dtype=torch.long), 1.0, 1.0, None)


def test_the_build_key_covers_what_the_build_depends_on(tmp_path):
    """Two checkouts of the same source get two build directories (ninja's build file names the source's path:
    sharing one, each checkout's first use would rebuild the other's); a changed source gets another key too."""
    copy = tmp_path / "csrc" / "safety_epilogue.cpp"
    copy.parent.mkdir()
    copy.write_bytes(cpu_extension.SOURCE.read_bytes())
    assert cpu_extension.build_key(copy) != cpu_extension.build_key()
    same = cpu_extension.build_key(copy)
    copy.write_bytes(cpu_extension.SOURCE.read_bytes() + b"\n")
    assert cpu_extension.build_key(copy) != same
