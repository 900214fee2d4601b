"""What the tests share (fixtures live in conftest.py):

- the backends of safety_loss the tests run on, on this machine, and their device;
- random inputs with every kind of row for the op, one call of the op beside its float64 reference on the same
  inputs, and the comparison of the two (tolerances are stated in test_safety_loss.py);
- DeRTa's reference files, read in place from ../shared/data/derta (never copied into the repository);
- an exported model's weights, from one file or from its shards; whether a ZeRO-3 optimizer shares the model's
  partitions as its master weights.
"""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from scft_fast import IGNORE_INDEX, SafetyLossOutput, safety_loss
from scft_fast.ops.reference import safety_loss_ref


def available_backends() -> list[str]:
    """torch always; triton and cpu as soon as their code exists in the package. A backend whose code
    exists but does not load is *not* skipped: its tests then fail, as they should."""
    names = ["torch"]
    if importlib.util.find_spec("triton") is not None and importlib.util.find_spec("scft_fast.kernels.safety_epilogue"):
        names.append("triton")
    if not torch.cuda.is_available() and importlib.util.find_spec("scft_fast.ops.cpu_extension") is not None:
        names.append("cpu")
    return names


def device_for(backend: str) -> torch.device:
    if backend == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def make_inputs(seed, n, h, v, c=2, s=4, dtype=torch.float32, device="cpu", bias=False, cls_bias=False,
                transition=True, head=True, ignored_share=0.35):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (1.0 / h ** 0.5) * 3.0
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored_share] = IGNORE_INDEX
    kw = {}
    if bias:
        kw["lm_bias"] = torch.randn(v, generator=g)
    if transition:
        tr = torch.full((n,), IGNORE_INDEX)
        rto = torch.rand(n, generator=g) < 0.3
        tr[rto] = int(torch.randint(0, v, (1,), generator=g))
        labels[rto & (torch.rand(n, generator=g) < 0.5)] = IGNORE_INDEX  # some rows carry only the transition term
        kw["transition_labels"] = tr
    if head:
        kw["cls_weight"] = torch.randn(c, h, generator=g) * 0.2
        kw["cls_index"] = torch.randint(0, max(n, 1), (s,), generator=g) if n else torch.zeros(0, dtype=torch.long)
        cls_labels = torch.randint(0, c, (s,), generator=g)
        if s > 2:
            cls_labels[1] = IGNORE_INDEX
        kw["cls_labels"] = cls_labels
        if cls_bias:
            kw["cls_bias"] = torch.randn(c, generator=g)
    out = dict(hidden=hidden, lm_weight=weight, labels=labels, **kw)
    return {k: (t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)) for k, t in out.items()}


DIFF = ("hidden", "lm_weight", "lm_bias", "cls_weight", "cls_bias")


def run_both(inputs, backend, grad_scale=1.0, **options):
    """(our output, our grads, reference dict, reference grads) for the same inputs."""
    ours_in = {k: (t.detach().clone().requires_grad_(k in DIFF)) for k, t in inputs.items()}
    out = safety_loss(**ours_in, backend=backend, **options)
    names = [k for k in DIFF if k in ours_in]
    grads = torch.autograd.grad(out.loss * grad_scale, [ours_in[k] for k in names])
    ref_in = {k: (t.detach().cpu().double().requires_grad_(k in DIFF) if t.is_floating_point() else t.cpu())
              for k, t in inputs.items()}
    ref = safety_loss_ref(**ref_in, **{k: v for k, v in options.items() if k != "chunk_size"})
    ref_grads = torch.autograd.grad(ref["loss"] * grad_scale, [ref_in[k] for k in names], allow_unused=True)
    # A parameter the reference never touched (no labeled pooled row, say) has a zero gradient.
    ref_grads = [torch.zeros_like(ref_in[k]) if g is None else g for k, g in zip(names, ref_grads)]
    return out, dict(zip(names, grads)), ref, dict(zip(names, ref_grads))


def close(actual, expected, rtol, atol_rel, what):
    expected = expected.detach().double()
    atol = atol_rel * max(expected.abs().max().item(), 1e-12) if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().cpu().double(), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def check(out, grads, ref, ref_grads, rtol=2e-5, atol_rel=2e-5):
    assert isinstance(out, SafetyLossOutput)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    close(out.loss, ref["loss"], rtol, atol_rel, "loss")
    close(out.lm_loss, ref["lm_loss"], rtol, atol_rel, "lm_loss")
    close(out.transition_loss, ref["transition_loss"], rtol, atol_rel, "transition_loss")
    close(out.cls_loss, ref["cls_loss"], rtol, atol_rel, "cls_loss")
    assert int(out.n_lm) == ref["n_lm"] and int(out.n_tr) == ref["n_tr"]
    if ref["cls_logits"] is not None:
        close(out.cls_logits, ref["cls_logits"], rtol, atol_rel, "cls_logits")
    for name, g in grads.items():
        close(g, ref_grads[name], rtol, atol_rel, f"grad {name}")


DERTA = Path(__file__).resolve().parents[2] / "shared" / "data" / "derta"
needs_derta = pytest.mark.skipif(not DERTA.is_dir(), reason=f"DeRTa's reference files are not at {DERTA}")


def load_export(model_dir) -> dict[str, torch.Tensor]:
    """The exported weights, from model.safetensors or from the shards its index lists."""
    from safetensors.torch import load_file

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(os.path.join(model_dir, "model.safetensors"))
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    assert len(files) > 1
    return {k: v for name in files for k, v in load_file(os.path.join(model_dir, name)).items()}


def shares_master_weights(optimizer) -> bool | None:
    """Whether a ZeRO-3 optimizer's master weights are the model's partitions (scft_fast/hf/patches.py);
    None: not a ZeRO-3 optimizer."""
    flat16 = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    flat32 = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if flat16 is None or flat32 is None:
        return None
    return all(a.data_ptr() == b.data_ptr() for a, b in zip(flat16, flat32))
