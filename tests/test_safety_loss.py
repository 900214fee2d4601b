"""safety_loss against the float64 reference on naive logits, for every backend.

Tolerances: float32 inputs are compared with rtol = atol = 2e-5 (relative to each tensor's largest
reference entry for atol). The op accumulates every term in float32 over V <= 5000 logits; a
log-sum-exp of that length carries ~1e-6 relative error, the three GEMMs a few ulps times sqrt(H),
so 2e-5 leaves a margin of ~10x and still catches any wrong term (those are O(1e-2) or worse).
bfloat16 inputs are compared with the reference computed from the *same* bf16-rounded inputs in
float64: the remaining error is the bf16 rounding of the logits (2^-8 relative) and of the
returned gradients, so loss rtol = 1e-2 and gradients atol = 2e-2 x max |reference|.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import available_backends, check, close, device_for, make_inputs, run_both
from scft_fast import IGNORE_INDEX, safety_loss
from scft_fast.ops.reference import safety_loss_ref

AVAILABLE_BACKENDS = available_backends()


# (seed, N, H, V): V from 1000 to 5000 and never a multiple of a block size; H odd or not a power of 2.
SHAPES = [(0, 29, 32, 1000), (1, 40, 48, 2047), (2, 33, 97, 3001), (3, 21, 160, 4999)]


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("seed,n,h,v", SHAPES)
def test_matches_float64_reference(backend, seed, n, h, v):
    device = device_for(backend)
    bias, softcap = seed % 2 == 1, (None if seed % 3 == 0 else 7.5)
    inputs = make_inputs(seed, n, h, v, c=2 + seed, bias=bias, cls_bias=not bias, device=device)
    options = dict(softcap=softcap, lm_coef=0.8, transition_coef=1.7, cls_coef=0.3, chunk_size=8)
    check(*run_both(inputs, backend, grad_scale=1.0, **options))


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("terms", ["lm", "lm+transition", "lm+cls", "transition+cls"])
def test_each_term_alone_and_default_chunking(backend, terms):
    inputs = make_inputs(11, 37, 64, 1531, c=3, s=5, transition="transition" in terms, head="cls" in terms,
                         device=device_for(backend))
    if not terms.startswith("lm"):
        inputs["labels"] = torch.full_like(inputs["labels"], IGNORE_INDEX)
    check(*run_both(inputs, backend))


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_upstream_gradient_is_applied(backend):
    """loss.backward() with a scaled upstream gradient (what AMP's GradScaler does)."""
    inputs = make_inputs(5, 30, 40, 1200, device=device_for(backend), bias=True, cls_bias=True)
    check(*run_both(inputs, backend, grad_scale=1024.0), atol_rel=2e-5)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_num_items_and_num_cls_override_the_normalizers(backend):
    inputs = make_inputs(6, 30, 40, 1100, device=device_for(backend))
    for num_items in (17, torch.tensor(55)):
        out, grads, ref, ref_grads = run_both(inputs, backend, num_items=num_items)
        check(out, grads, ref, ref_grads)
    for num_cls in (7, torch.tensor(2)):
        check(*run_both(inputs, backend, num_items=33, num_cls=num_cls))
    out = safety_loss(**inputs, num_items=0, backend=backend)
    cls_only = safety_loss_ref(**{k: t.double() if t.is_floating_point() else t for k, t in inputs.items()})
    close(out.loss, cls_only["cls_loss"], 2e-5, 2e-5, "num_items=0 leaves only the cls term")


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype):
    inputs = make_inputs(7, 32, 64, 2100, dtype=dtype, device=device_for(backend), bias=True)
    out, grads, ref, ref_grads = run_both(inputs, backend, softcap=20.0)
    for name, g in grads.items():
        assert g.dtype == dtype, name
    close(out.loss, ref["loss"], 1e-2, 1e-2, "loss")
    for name, g in grads.items():
        close(g.float(), ref_grads[name], 2e-2, 2e-2, f"grad {name}")


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extreme_logits_stay_finite(backend, dtype):
    inputs = make_inputs(8, 24, 32, 1000, dtype=torch.float32, device=device_for(backend))
    inputs["hidden"] = inputs["hidden"] * 300.0  # logits of order +-1e3..1e4
    inputs = {k: t.to(dtype) if t.is_floating_point() else t for k, t in inputs.items()}
    out, grads, ref, ref_grads = run_both(inputs, backend)
    assert torch.isfinite(out.loss)
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
    rtol = 2e-5 if dtype == torch.float32 else 2e-2
    close(out.loss, ref["loss"], rtol, rtol, "loss")


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"),
                    reason=f"torch {torch.__version__} has no F.linear_cross_entropy (newer than 2.11)")
@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_lm_only_matches_torch_linear_cross_entropy(backend):
    inputs = make_inputs(9, 48, 64, 3000, transition=False, head=False, device=device_for(backend))
    h = inputs["hidden"].clone().requires_grad_()
    w = inputs["lm_weight"].clone().requires_grad_()
    ours = safety_loss(h, w, inputs["labels"], backend=backend).loss
    gh, gw = torch.autograd.grad(ours, [h, w])
    theirs = F.linear_cross_entropy(h, w, inputs["labels"], ignore_index=IGNORE_INDEX)
    th, tw = torch.autograd.grad(theirs, [h, w])
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(gh, th, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(gw, tw, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_batched_input_is_flattened(backend):
    inputs = make_inputs(10, 24, 32, 1000, device=device_for(backend))
    flat = safety_loss(**inputs, backend=backend)
    batched = dict(inputs, hidden=inputs["hidden"].reshape(3, 8, 32), labels=inputs["labels"].reshape(3, 8),
                   transition_labels=inputs["transition_labels"].reshape(3, 8))
    torch.testing.assert_close(safety_loss(**batched, backend=backend).loss, flat.loss)


def test_non_contiguous_inputs_are_accepted():
    inputs = make_inputs(12, 30, 40, 1000)
    wide = torch.randn(30, 80)
    wide[:, ::2] = inputs["hidden"]
    weight_t = inputs["lm_weight"].T.contiguous().T  # same values, column-major storage
    out = safety_loss(**dict(inputs, hidden=wide[:, ::2], lm_weight=weight_t), backend="torch")
    torch.testing.assert_close(out.loss, safety_loss(**inputs, backend="torch").loss)
