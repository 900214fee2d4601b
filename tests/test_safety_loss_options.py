"""safety_loss's options (reduction, label_smoothing, z_loss, return_lse, return_token_stats) against the float64
reference, for every backend: each alone and combined, over ignored rows, rows with both targets, softcap, bias and
several chunks; bf16; any upstream gradient for reduction="none"; the defaults bit for bit; bad values.

Tolerances are test_safety_loss.py's: float32 rtol = atol 2e-5 (atol relative to each tensor's largest reference
entry), bfloat16 against the reference on the same bf16-rounded inputs with loss rtol 1e-2 and gradients atol
2e-2 x max |reference|. The token accuracy is a count: it must be exact (the inputs keep each row's top two logits
far apart, so float32 and float64 agree on every argmax).
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import DIFF, available_backends, close, device_for, make_inputs
from scft_fast import IGNORE_INDEX, safety_loss
from scft_fast.ops.reference import safety_loss_ref
from scft_fast.ops.safety_epilogue import safety_epilogue_torch

AVAILABLE_BACKENDS = available_backends()
SOFTCAP = 7.5


def with_correct_labels(inputs, softcap):
    """Half of the LM-target rows relabeled with their argmax (so the token accuracy is far from 0), the top logit
    of those rows raised by 1 so that no rounding can change which one is the maximum."""
    h = inputs["hidden"].double()
    z = h @ inputs["lm_weight"].double().T
    if "lm_bias" in inputs:
        z = z + inputs["lm_bias"].double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    labels = inputs["labels"].clone()
    rows = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)[::2]
    top = z[rows].argmax(dim=1)
    labels[rows] = top
    if "lm_bias" not in inputs:
        inputs["lm_bias"] = torch.zeros(inputs["lm_weight"].shape[0], dtype=inputs["lm_weight"].dtype)
    bias = inputs["lm_bias"].clone()
    bias[top] += 1.0
    return dict(inputs, labels=labels, lm_bias=bias)


def run_options(inputs, backend, upstream=None, **options):
    """(out, grads, ref, ref_grads) with the same upstream gradient (a scalar, or (N,) for reduction="none")."""
    ours_in = {k: t.detach().clone().requires_grad_(k in DIFF) for k, t in inputs.items()}
    out = safety_loss(**ours_in, backend=backend, **options)
    names = [k for k in DIFF if k in ours_in]
    if upstream is None:
        upstream = torch.ones_like(out.loss)
    grads = torch.autograd.grad(out.loss, [ours_in[k] for k in names], upstream.to(out.loss.device))
    ref_in = {k: (t.detach().cpu().double().requires_grad_(k in DIFF) if t.is_floating_point() else t.cpu())
              for k, t in inputs.items()}
    ref_options = {k: v for k, v in options.items() if k not in ("chunk_size", "return_lse", "return_token_stats")}
    ref = safety_loss_ref(**ref_in, **ref_options)
    ref_grads = torch.autograd.grad(ref["loss"], [ref_in[k] for k in names], upstream.double().cpu(),
                                    allow_unused=True)
    ref_grads = [torch.zeros_like(ref_in[k]) if g is None else g for k, g in zip(names, ref_grads)]
    return out, dict(zip(names, grads)), ref, dict(zip(names, ref_grads))


def check_options(out, grads, ref, ref_grads, options, rtol=2e-5, atol_rel=2e-5):
    assert out.loss.dtype == torch.float32
    assert out.loss.shape == ((out.lse.shape if out.lse is not None else ref["loss"].shape)
                              if options.get("reduction") == "none" else ())
    close(out.loss, ref["loss"], rtol, atol_rel, "loss")
    close(out.lm_loss, ref["lm_loss"], rtol, atol_rel, "lm_loss")
    close(out.transition_loss, ref["transition_loss"], rtol, atol_rel, "transition_loss")
    close(out.cls_loss, ref["cls_loss"], rtol, atol_rel, "cls_loss")
    assert int(out.n_lm) == ref["n_lm"] and int(out.n_tr) == ref["n_tr"]
    for name, g in grads.items():
        close(g, ref_grads[name], rtol, atol_rel, f"grad {name}")
    if options.get("z_loss"):
        close(out.z_loss, ref["z_loss"], rtol, atol_rel, "z_loss")
    else:
        assert out.z_loss is None
    if options.get("return_lse"):
        assert out.lse.shape == ref["lse"].shape and out.lse.dtype == torch.float32
        assert torch.equal(out.lse.isnan().cpu(), ref["lse"].isnan()), "lse is NaN exactly on rows without a target"
        close(out.lse.nan_to_num(), ref["lse"].nan_to_num(), rtol, atol_rel, "lse")
    else:
        assert out.lse is None
    if options.get("return_token_stats"):
        assert out.token_accuracy.item() == pytest.approx(ref["token_accuracy"].item(), abs=1e-6)
        assert 0.0 < out.token_accuracy.item() < 1.0
        close(out.entropy, ref["entropy"], rtol, atol_rel, "entropy")
    else:
        assert out.token_accuracy is None and out.entropy is None


OPTION_SETS = {
    "sum": dict(reduction="sum"),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "lse+token_stats": dict(return_lse=True, return_token_stats=True),
    "all_with_sum": dict(reduction="sum", label_smoothing=0.2, z_loss=1e-2, return_lse=True, return_token_stats=True),
    "all_with_mean": dict(label_smoothing=0.05, z_loss=1e-4, return_lse=True, return_token_stats=True,
                          num_items=41),
}
NONE_SETS = {
    "none": dict(reduction="none"),
    "none+all": dict(reduction="none", label_smoothing=0.1, z_loss=1e-2, return_lse=True, return_token_stats=True),
}


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("chunk_size", [8, None], ids=["chunks-of-8", "auto"])
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_options_match_float64_reference(backend, chunk_size, name):
    options = OPTION_SETS[name]
    inputs = with_correct_labels(make_inputs(60, 37, 48, 1531, c=3, s=5, cls_bias=True), SOFTCAP)
    inputs = {k: t.to(device_for(backend)) for k, t in inputs.items()}
    out, grads, ref, ref_grads = run_options(inputs, backend, softcap=SOFTCAP, chunk_size=chunk_size,
                                             lm_coef=0.8, transition_coef=1.7, cls_coef=0.3, **options)
    check_options(out, grads, ref, ref_grads, options)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("softcap", [None, SOFTCAP], ids=["plain", "softcap"])
@pytest.mark.parametrize("name", sorted(NONE_SETS))
def test_reduction_none_takes_any_upstream_gradient(backend, softcap, name):
    """Per-row losses and the gradients of sum_i g_i loss_i for a random g: negative, zero, and nonzero on rows
    without a target (which have no gradient to give)."""
    options = NONE_SETS[name]
    inputs = with_correct_labels(make_inputs(61, 40, 32, 1200, head=False), softcap)
    inputs = {k: t.to(device_for(backend)) for k, t in inputs.items()}
    upstream = torch.randn(40, generator=torch.Generator().manual_seed(62))
    upstream[::5] = 0.0
    out, grads, ref, ref_grads = run_options(inputs, backend, upstream=upstream, softcap=softcap, chunk_size=8,
                                             lm_coef=0.8, transition_coef=1.7, **options)
    check_options(out, grads, ref, ref_grads, options)
    no_target = (inputs["labels"] == IGNORE_INDEX) & (inputs["transition_labels"] == IGNORE_INDEX)
    assert no_target.any() and torch.equal(out.loss[no_target], torch.zeros_like(out.loss[no_target]))


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_reduction_none_summed_is_reduction_sum_and_backward_can_repeat(backend):
    inputs = make_inputs(63, 30, 32, 1000, head=False, bias=True, device=device_for(backend))
    leaves = {k: t.detach().clone().requires_grad_(k in DIFF) for k, t in inputs.items()}
    per_row = safety_loss(**leaves, backend=backend, reduction="none", z_loss=1e-3)
    summed = safety_loss(**leaves, backend=backend, reduction="sum", z_loss=1e-3)
    close(per_row.loss.sum(), summed.loss.detach(), 2e-5, 2e-5, "sum of the rows")
    names = [k for k in DIFF if k in leaves]
    first = torch.autograd.grad(per_row.loss.sum(), [leaves[k] for k in names], retain_graph=True)
    again = torch.autograd.grad(per_row.loss.sum(), [leaves[k] for k in names])  # recomputed: may run twice
    expected = torch.autograd.grad(summed.loss, [leaves[k] for k in names])
    for name, a, b, e in zip(names, first, again, expected):
        assert torch.equal(a, b), name
        close(a, e, 2e-5, 2e-5, f"grad {name}")


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_options_in_bfloat16(backend, reduction):
    options = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, return_lse=True)
    inputs = make_inputs(64, 32, 64, 2100, dtype=torch.bfloat16, bias=True, head=reduction != "none",
                         device=device_for(backend))
    upstream = torch.randn(32, generator=torch.Generator().manual_seed(65)) if reduction == "none" else None
    out, grads, ref, ref_grads = run_options(inputs, backend, upstream=upstream, softcap=20.0, **options)
    for name, g in grads.items():
        assert g.dtype == torch.bfloat16, name
    close(out.loss, ref["loss"], 1e-2, 1e-2, "loss")
    close(out.lse.nan_to_num(), ref["lse"].nan_to_num(), 1e-2, 1e-2, "lse")
    close(out.z_loss, ref["z_loss"], 1e-2, 1e-2, "z_loss")
    for name, g in grads.items():
        close(g.float(), ref_grads[name], 2e-2, 2e-2, f"grad {name}")


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_neutral_options_leave_the_defaults_bit_for_bit(backend):
    """The default values spelled out, and the outputs that only report (lse, token stats), change no bit of the
    loss, the statistics or a gradient: they ride along in the same sweeps."""
    inputs = make_inputs(66, 37, 48, 1531, c=3, s=5, bias=True, cls_bias=True, device=device_for(backend))

    def call(**options):
        leaves = {k: t.detach().clone().requires_grad_(k in DIFF) for k, t in inputs.items()}
        out = safety_loss(**leaves, backend=backend, softcap=SOFTCAP, chunk_size=8, **options)
        out.loss.backward()
        return out, {k: leaves[k].grad for k in DIFF if k in leaves}

    base, base_grads = call()
    for options in (dict(reduction="mean", label_smoothing=0.0, z_loss=0.0, return_lse=False,
                         return_token_stats=False), dict(return_lse=True, return_token_stats=True)):
        out, grads = call(**options)
        for field in ("loss", "lm_loss", "transition_loss", "cls_loss", "cls_logits", "n_lm", "n_tr", "n_cls"):
            assert torch.equal(getattr(out, field), getattr(base, field)), (options, field)
        for name, g in grads.items():
            assert torch.equal(g, base_grads[name]), (options, name)


def test_the_new_fields_are_none_unless_asked():
    out = safety_loss(**make_inputs(67, 12, 16, 100), backend="torch")
    assert out.z_loss is None and out.lse is None and out.token_accuracy is None and out.entropy is None
    assert out.n_lm.dtype == out.n_tr.dtype == out.n_cls.dtype == torch.int64


def test_label_smoothing_is_torch_cross_entropy():
    """The op and the reference against F.cross_entropy(label_smoothing=) on the naive soft-capped logits."""
    inputs = make_inputs(68, 30, 24, 700, transition=False, head=False, bias=True)
    z = inputs["hidden"].double() @ inputs["lm_weight"].double().T + inputs["lm_bias"].double()
    z = SOFTCAP * torch.tanh(z / SOFTCAP)
    expected = F.cross_entropy(z, inputs["labels"], ignore_index=IGNORE_INDEX, label_smoothing=0.3)
    ref = safety_loss_ref(**inputs, softcap=SOFTCAP, label_smoothing=0.3)["loss"]
    torch.testing.assert_close(ref, expected)
    ours = safety_loss(**inputs, softcap=SOFTCAP, label_smoothing=0.3, backend="torch").loss
    torch.testing.assert_close(ours.double(), expected, rtol=2e-5, atol=2e-5)


def test_torch_epilogue_options_match_the_reference():
    """The torch twin (the spec) for per-row scales, label smoothing and the z-loss; the Triton and C++ twins have
    the same test in their files."""
    from scft_fast.ops.reference import epilogue_row_stats_ref, safety_epilogue_ref
    from scft_fast.ops.safety_epilogue import ROW_STATS

    gen = torch.Generator().manual_seed(69)
    logits = torch.randn(8, 1001, generator=gen) * 4.0
    lm = torch.randint(0, 1001, (8,), generator=gen)
    tr = torch.full((8,), IGNORE_INDEX)
    tr[::2] = 11
    lm[1::4] = IGNORE_INDEX
    lm[3], tr[3] = IGNORE_INDEX, IGNORE_INDEX
    scales = [torch.rand(8, generator=gen) + 0.25 for _ in range(3)]
    ref_sums, ref_grad = safety_epilogue_ref(logits, lm, tr, scales[0], scales[1], 20.0, IGNORE_INDEX, 0.1,
                                             scales[2] * 1e-2)
    grad, stats = logits.clone(), torch.empty(8, ROW_STATS)
    sums = safety_epilogue_torch(grad, lm, tr, scales[0], scales[1], 20.0, IGNORE_INDEX, 0.1, scales[2] * 1e-2,
                                 stats, True)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.double(), epilogue_row_stats_ref(logits, lm, tr, 20.0, IGNORE_INDEX, 0.1),
                               rtol=1e-5, atol=1e-5, equal_nan=True)


def _bad(**changes):
    inputs = make_inputs(70, 12, 16, 100, c=3, s=3)
    inputs.update(changes)
    return {k: v for k, v in inputs.items() if v is not None}


@pytest.mark.parametrize("changes,error,pattern", [
    (dict(reduction="avg"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    (dict(reduction="none"), ValueError, r"reduction='none' gives one loss per row and the classification head"),
    (dict(reduction="sum", num_items=10, cls_weight=None, cls_index=None, cls_labels=None), ValueError,
     r"num_items normalizes the token terms and reduction='sum' does not normalize them"),
    (dict(reduction="none", num_items=10, cls_weight=None, cls_index=None, cls_labels=None), ValueError,
     r"num_items normalizes the token terms and reduction='none'"),
    (dict(label_smoothing=1.0), ValueError, r"label_smoothing must be a number in \[0, 1\), got 1.0"),
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be a number in \[0, 1\), got -0.1"),
    (dict(label_smoothing=float("nan")), ValueError, r"label_smoothing must be a number in \[0, 1\), got nan"),
    (dict(label_smoothing=True), ValueError, r"label_smoothing must be a number in \[0, 1\), got True"),
    (dict(z_loss=-1e-4), ValueError, r"z_loss must be a finite number >= 0, got -0.0001"),
    (dict(z_loss=float("inf")), ValueError, r"z_loss must be a finite number >= 0, got inf"),
    (dict(z_loss="1e-4"), ValueError, r"z_loss must be a finite number >= 0, got '1e-4'"),
    (dict(return_lse=1), TypeError, r"return_lse must be True or False, got 1"),
    (dict(return_token_stats="yes"), TypeError, r"return_token_stats must be True or False, got 'yes'"),
])
def test_bad_option_values_are_named(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        safety_loss(**_bad(**changes))


def test_reduction_none_passes_torch_library_checks_and_compiles():
    # Every row has a target: opcheck compares outputs without equal_nan, and lse is NaN on a row without one.
    inputs = make_inputs(71, 20, 16, 300, bias=True, head=False, ignored_share=0.0)
    args = (inputs["hidden"].requires_grad_(), inputs["lm_weight"].requires_grad_(), inputs["labels"],
            inputs["lm_bias"], inputs["transition_labels"], None, None, None, None, None, None, 1.0, 1.0, 1.0,
            IGNORE_INDEX, 10.0, "torch", 0, True, [True, True, False, False, False], "none", 0.1, 1e-3, True, True)
    torch.library.opcheck(torch.ops.scft_fast.safety_loss.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))

    proj = torch.nn.Linear(24, 16)
    weights = torch.rand(20)

    def step(x):
        out = safety_loss(torch.tanh(proj(x)), inputs["lm_weight"].detach(), inputs["labels"],
                          transition_labels=inputs["transition_labels"], reduction="none", backend="torch")
        return (out.loss * weights).sum()

    x = torch.randn(20, 24)
    eager = step(x)
    eager_grads = torch.autograd.grad(eager, list(proj.parameters()))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(x)
    torch.testing.assert_close(loss, eager)
    for g, e in zip(torch.autograd.grad(loss, list(proj.parameters())), eager_grads):
        torch.testing.assert_close(g, e)
