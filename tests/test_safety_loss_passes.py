"""What the op's backward does with the gradients it precomputed in forward, counted op by op.

A TorchDispatchMode records every aten call made during ``loss.backward()``: the backward of a bfloat16 call must
touch the (V, H) weight gradient exactly once (the scaling by the upstream gradient fused with the float32 ->
bfloat16 cast), and autograd must materialize no zero tensor for the op's outputs that receive no gradient.
The loss is a tensor of its own: Trainer's in-place ``loss *= world_size`` after the call scales the gradients.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DIFF, available_backends, device_for, make_inputs, run_both
from scft_fast import safety_loss

AVAILABLE_BACKENDS = available_backends()


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []  # (op name, output shapes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.calls.append((str(func), [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)]))
        return out


def test_backward_touches_the_weight_gradient_once_and_materializes_no_zeros():
    v, h = 600, 24
    inputs = make_inputs(50, 30, h, v, bias=True, cls_bias=True, dtype=torch.bfloat16)
    leaves = {k: t.detach().clone().requires_grad_(k in DIFF) for k, t in inputs.items()}
    out = safety_loss(**leaves, backend="torch")
    record = _Record()
    with record:
        (out.loss * 1.5).backward()
    # Allocations and aliases move no data; every other call with a (V, H) output is a pass over grad_W.
    moves_no_data = ("aten.detach", "aten.empty", "aten.alias", "aten.view", "aten._unsafe_view")
    on_weight = [name for name, shapes in record.calls if (v, h) in shapes and not name.startswith(moves_no_data)]
    assert on_weight == ["aten.mul.out"], record.calls
    assert not [name for name, _ in record.calls if "zero" in name or "fill" in name], record.calls
    assert leaves["lm_weight"].grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_loss_scaled_in_place_after_the_call_scales_the_gradients(backend):
    inputs = make_inputs(51, 26, 32, 700, bias=True, cls_bias=True, device=device_for(backend))
    out, grads, ref, ref_grads = run_both(inputs, backend, grad_scale=3.0)
    leaves = {k: t.detach().clone().requires_grad_(k in DIFF) for k, t in inputs.items()}
    scaled = safety_loss(**leaves, backend=backend)
    scaled.loss *= 3  # what transformers.Trainer does with `loss *= world_size`
    scaled.loss.backward()
    torch.testing.assert_close(scaled.loss, out.loss * 3, rtol=1e-6, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(leaves[name].grad, g, rtol=1e-6, atol=1e-7)
        expected = ref_grads[name].to(g.dtype).to(g.device)
        scale = max(expected.abs().max().item(), 1e-12)
        torch.testing.assert_close(leaves[name].grad, expected, rtol=2e-5, atol=2e-5 * scale)
