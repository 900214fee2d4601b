"""SCFT's classification head on the pooled rows as one Triton kernel: logits, cross-entropy and all gradients.

``cls_head_triton`` has the contract of its torch twin ``scft_fast.ops.cls_head.cls_head_torch`` (that docstring is
the spec); both are tested against the float64 ``scft_fast.ops.reference.cls_head_ref``. One program per pooled
row s gathers hidden[cls_index[s]] in blocks of H and makes two sweeps over H:
  1. u = h @ W.T (+ b): a (BLOCK_C, BLOCK_H) float32 partial product, reduced over H once at the end,
  2. with du = cls_scale * [labeled] * (softmax(u) - onehot(label)): grad_pooled[s] = du @ W is stored, and
     du^T h, du are added into grad_cls_weight / grad_cls_bias with float32 atomics, so duplicate cls_index
     entries add (in an order that may vary run to run: S is a handful of sequences, C x H is small).
C (MIN_CLASSES..MAX_CLASSES, 2..16) is padded to BLOCK_C = next_pow2(C); ``cls_head_blocks`` picks BLOCK_H so that
each (BLOCK_C, BLOCK_H) float32 tile is at most 2048 elements, 16 per thread with 4 warps. The kernel is tiny
(S x C x H); one launch is what matters.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from scft_fast.ops.cls_head import MAX_CLASSES, MIN_CLASSES

_MAX_BLOCK_H = 256
# Elements of one (BLOCK_C, BLOCK_H) float32 tile. At 4096 (BLOCK_C = 16 with BLOCK_H = 256) two variants spilled to
# the stack under Triton 3.6 (4 and 12 bytes, sm_90) and took up to 119 registers under 3.9; at 2048 no variant
# spills and the most any takes is 88 (Triton 3.9, sm_80/90/100: tests/test_kernels_compile.py).
_MAX_TILE = 2048
_NUM_WARPS = 4


def cls_head_blocks(num_classes: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_H) of the launch for C classes. BLOCK_H does not follow H: below 256 the masked lanes cost
    nothing that matters (S programs), and a tile that shrank with H spilled too (BLOCK_H = 64, fp32, sm_90)."""
    block_c = triton.next_power_of_2(num_classes)
    return block_c, min(_MAX_BLOCK_H, _MAX_TILE // block_c)


@triton.jit
def _cls_head_kernel(
    hidden_ptr,  # (N, H) fp32/bf16/fp16
    cls_index_ptr,  # (S,) int64 in [0, N)
    cls_labels_ptr,  # (S,) int64 in [0, C) or ignore_index
    weight_ptr,  # (C, H), hidden's dtype
    bias_ptr,  # (C,), read only when HAS_BIAS
    cls_scale_ptr,  # () float32
    ce_ptr,  # (S,) float32 out
    logits_ptr,  # (S, C) float32 out, contiguous
    grad_pooled_ptr,  # (S, H) float32 out, contiguous; written only when COMPUTE_GRAD
    grad_weight_ptr,  # (C, H) float32, zero-initialized, contiguous; accumulated atomically
    grad_bias_ptr,  # (C,) float32, zero-initialized; accumulated atomically when HAS_BIAS
    C,  # int
    H,  # int
    stride_hn, stride_hh,  # hidden strides
    stride_wc, stride_wh,  # cls_weight strides
    stride_b,  # cls_bias stride
    stride_idx, stride_lbl,  # cls_index / cls_labels strides
    ignore_index,  # int
    HAS_BIAS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    # The gathered row index times H can exceed 2**31: 64-bit row offsets.
    h_row_ptr = hidden_ptr + tl.load(cls_index_ptr + s * stride_idx) * stride_hn
    label = tl.load(cls_labels_ptr + s * stride_lbl)
    valid = label != ignore_index
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    cols = tl.arange(0, BLOCK_H)

    acc = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        offs_h = start + cols
        mask_h = offs_h < H
        h = tl.load(h_row_ptr + offs_h * stride_hh, mask=mask_h, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + offs_c[:, None] * stride_wc + offs_h[None, :] * stride_wh,
                    mask=mask_c[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        acc += w * h[None, :]
    u = tl.sum(acc, axis=1)  # (BLOCK_C,)
    if HAS_BIAS:
        u += tl.load(bias_ptr + offs_c * stride_b, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(logits_ptr + s * C + offs_c, u, mask=mask_c)

    u = tl.where(mask_c, u, -float("inf"))
    m = tl.max(u, axis=0)
    e = tl.exp(u - m)
    sum_e = tl.sum(e, axis=0)
    u_label = tl.sum(tl.where(offs_c == label, u, 0.0), axis=0)
    tl.store(ce_ptr + s, tl.where(valid, m + tl.log(sum_e) - u_label, 0.0))

    if COMPUTE_GRAD:
        scale = tl.where(valid, tl.load(cls_scale_ptr), 0.0)
        du = (e / sum_e - tl.where(offs_c == label, 1.0, 0.0)) * scale
        du = tl.where(mask_c, du, 0.0)  # (BLOCK_C,)
        # Unlabeled rows issue no atomics. (Written as a bound on offs_c: the interpreter's atomics reject a
        # mask built by & with a scalar.)
        mask_c_labeled = offs_c < tl.where(valid, C, 0)
        if HAS_BIAS:
            tl.atomic_add(grad_bias_ptr + offs_c, du, mask=mask_c_labeled, sem="relaxed")
        for start in range(0, H, BLOCK_H):
            offs_h = start + cols
            mask_h = offs_h < H
            h = tl.load(h_row_ptr + offs_h * stride_hh, mask=mask_h, other=0.0).to(tl.float32)
            mask_ch = mask_c[:, None] & mask_h[None, :]
            w = tl.load(weight_ptr + offs_c[:, None] * stride_wc + offs_h[None, :] * stride_wh,
                        mask=mask_ch, other=0.0).to(tl.float32)
            tl.store(grad_pooled_ptr + s * H + offs_h, tl.sum(du[:, None] * w, axis=0), mask=mask_h)
            tl.atomic_add(grad_weight_ptr + offs_c[:, None] * H + offs_h[None, :], du[:, None] * h[None, :],
                          mask=mask_c_labeled[:, None] & mask_h[None, :], sem="relaxed")


def cls_head_triton(
    hidden: torch.Tensor,  # (N, H) fp32/bf16/fp16
    cls_index: torch.Tensor,  # (S,) int64 in [0, N), duplicates allowed
    cls_labels: torch.Tensor,  # (S,) int64 in [0, C) or ignore_index
    cls_weight: torch.Tensor,  # (C, H), hidden's dtype, MIN_CLASSES <= C <= MAX_CLASSES
    cls_bias: torch.Tensor | None,  # (C,)
    cls_scale: torch.Tensor,  # () float32 device scalar, cls_coef / max(n_cls, 1)
    ignore_index: int,
    compute_grad: bool,
):
    """Triton twin of ``scft_fast.ops.cls_head.cls_head_torch``: returns (ce (S,), cls_logits (S, C),
    grad_pooled (S, H), grad_cls_weight (C, H), grad_cls_bias (C,) or None), all float32; the gradients are None
    unless compute_grad. Indices and labels are not range-checked here (the op validates them)."""
    if hidden.dim() != 2 or cls_weight.dim() != 2 or cls_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden must be (N, H) and cls_weight (C, H), got {tuple(hidden.shape)} and "
                         f"{tuple(cls_weight.shape)}")
    C, H = cls_weight.shape
    if not MIN_CLASSES <= C <= MAX_CLASSES:
        raise ValueError(f"cls_weight must have {MIN_CLASSES} <= C <= {MAX_CLASSES} rows, got C={C}")
    S = cls_index.shape[0]
    if cls_index.shape != (S,) or cls_labels.shape != (S,):
        raise ValueError(f"cls_index and cls_labels must both be (S,), got {tuple(cls_index.shape)} and "
                         f"{tuple(cls_labels.shape)}")
    if cls_bias is not None and cls_bias.shape != (C,):
        raise ValueError(f"cls_bias must be ({C},), got {tuple(cls_bias.shape)}")
    if cls_scale.shape != () or cls_scale.dtype != torch.float32 or cls_scale.device != hidden.device:
        raise ValueError(f"cls_scale must be a 0-dim float32 tensor on {hidden.device}, got {cls_scale.dtype} of "
                         f"shape {tuple(cls_scale.shape)} on {cls_scale.device}")
    f32 = dict(dtype=torch.float32, device=hidden.device)
    ce = torch.empty((S,), **f32)
    logits = torch.empty((S, C), **f32)
    grad_pooled = torch.empty((S, H), **f32) if compute_grad else None
    grad_weight = torch.zeros((C, H), **f32) if compute_grad else None
    grad_bias = torch.zeros((C,), **f32) if compute_grad and cls_bias is not None else None
    if S > 0:
        block_c, block_h = cls_head_blocks(C)
        _cls_head_kernel[(S,)](
            hidden, cls_index, cls_labels, cls_weight,
            cls_bias if cls_bias is not None else cls_weight,
            cls_scale, ce, logits,
            grad_pooled if compute_grad else ce,
            grad_weight if compute_grad else ce,
            grad_bias if grad_bias is not None else ce,
            C, H,
            hidden.stride(0), hidden.stride(1),
            cls_weight.stride(0), cls_weight.stride(1),
            cls_bias.stride(0) if cls_bias is not None else 0,
            cls_index.stride(0), cls_labels.stride(0),
            ignore_index,
            HAS_BIAS=cls_bias is not None,
            COMPUTE_GRAD=compute_grad,
            BLOCK_C=block_c,
            BLOCK_H=block_h,
            num_warps=_NUM_WARPS,
        )
    return ce, logits, grad_pooled, grad_weight, grad_bias

