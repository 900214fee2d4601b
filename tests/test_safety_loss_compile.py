"""safety_loss is a torch.library.custom_op: torch.compile traces around it without graph breaks."""
import torch

from helpers import make_inputs
from scft_fast import IGNORE_INDEX, safety_loss


def test_custom_op_passes_torch_library_checks():
    inputs = make_inputs(40, 20, 16, 300, bias=True, cls_bias=True)
    flat = dict(inputs)
    args = (flat["hidden"].requires_grad_(), flat["lm_weight"].requires_grad_(), flat["labels"], flat["lm_bias"],
            flat["transition_labels"], flat["cls_weight"], flat["cls_bias"], flat["cls_index"], flat["cls_labels"],
            None, None, 1.0, 1.0, 0.5, IGNORE_INDEX, 10.0, "torch", 0, True, [True, True, False, False, False])
    torch.library.opcheck(torch.ops.scft_fast.safety_loss.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compiled_model_matches_eager_with_fullgraph():
    torch.manual_seed(0)
    proj = torch.nn.Linear(24, 16)
    inputs = make_inputs(41, 30, 16, 500)

    def step(x):
        hidden = torch.tanh(proj(x))
        out = safety_loss(hidden, inputs["lm_weight"], inputs["labels"],
                          transition_labels=inputs["transition_labels"], cls_weight=inputs["cls_weight"],
                          cls_index=inputs["cls_index"], cls_labels=inputs["cls_labels"], backend="torch")
        return out.loss

    x = torch.randn(30, 24)
    eager = step(x)
    eager_grads = torch.autograd.grad(eager, list(proj.parameters()))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(proj.parameters()))
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
