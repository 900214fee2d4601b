"""SCFT's classification head on the pooled rows, in plain PyTorch.

Two implementations under parallel names, both tested against the float64 definition
``scft_fast.ops.reference.cls_head_ref``:
- ``cls_head_torch`` (here): the head of the torch backend *and* of the cpu backend, which has no C++ head (the
  head is S x C x H work on a handful of pooled rows, beside the chunk loop's 6 x N x H x V),
- ``cls_head_triton`` (kernels/cls_head.py, ``scft_fast.kernels``): one program per pooled row.

Contract, shared by both::

    cls_head(hidden, cls_index, cls_labels, cls_weight, cls_bias, cls_scale, ignore_index, compute_grad)
      hidden:     (N, H) float32 / bfloat16 / float16
      cls_index:  (S,) int64 in [0, N): the pooled row of each sequence (duplicates allowed)
      cls_labels: (S,) int64 in [0, C) or ignore_index
      cls_weight: (C, H), same dtype as hidden, MIN_CLASSES <= C <= MAX_CLASSES (2 <= C <= 16)
      cls_bias:   (C,) or None
      cls_scale:  () float32 device scalar, cls_coef / max(n_cls, 1)
    returns (ce, cls_logits, grad_pooled, grad_cls_weight, grad_cls_bias):
      ce:              (S,) float32, cross-entropy of each labeled row, 0 where unlabeled
      cls_logits:      (S, C) float32, u = hidden[cls_index] @ cls_weight.T (+ cls_bias)
      grad_pooled:     (S, H) float32, d(cls_scale * sum(ce)) / d hidden[cls_index[s]]
      grad_cls_weight: (C, H) float32,   grad_cls_bias: (C,) float32 or None without a bias
    The three gradients are None when compute_grad is False. All arithmetic is in float32.
"""
from __future__ import annotations

import torch

# The class range of the head, checked by the op and by the Triton kernel (which pads C to BLOCK_C = next_pow2(C)
# and keeps a (BLOCK_C, BLOCK_H) float32 tile in registers).
MIN_CLASSES, MAX_CLASSES = 2, 16


def cls_head_torch(
    hidden: torch.Tensor,  # (N, H)
    cls_index: torch.Tensor,  # (S,)
    cls_labels: torch.Tensor,  # (S,)
    cls_weight: torch.Tensor,  # (C, H)
    cls_bias: torch.Tensor | None,  # (C,)
    cls_scale: torch.Tensor,  # ()
    ignore_index: int,
    compute_grad: bool,
):
    pooled = hidden.index_select(0, cls_index).float()  # (S, H)
    weight = cls_weight.float()
    logits = pooled @ weight.T  # (S, C)
    if cls_bias is not None:
        logits = logits + cls_bias.float()
    valid = cls_labels != ignore_index
    target = torch.where(valid, cls_labels, 0).unsqueeze(1)
    log_probs = torch.log_softmax(logits, dim=-1)
    ce = -log_probs.gather(1, target).squeeze(1) * valid
    if not compute_grad:
        return ce, logits, None, None, None
    dlogits = log_probs.exp()
    dlogits.scatter_add_(1, target, -torch.ones_like(target, dtype=dlogits.dtype))
    dlogits.mul_((cls_scale * valid).unsqueeze(1))  # (S, C)
    grad_pooled = dlogits @ weight
    grad_weight = dlogits.T @ pooled
    grad_bias = dlogits.sum(0) if cls_bias is not None else None
    return ce, logits, grad_pooled, grad_weight, grad_bias
