"""The per-chunk epilogue as one Triton kernel: logits -> LM + transition losses and d(loss)/d(logits), in place.

``safety_epilogue_triton`` has the contract of its torch twin ``scft_fast.ops.safety_epilogue.safety_epilogue_torch``
(that docstring is the spec); both are tested against the float64 ``scft_fast.ops.reference.safety_epilogue_ref``.
One program per row makes two sweeps over the row's V logits, read in their storage dtype and upcast to float32:
  1. online max / sum-exp (one exp per element; the running sum is rescaled once per block, not per element),
  2. d(loss)/d(raw) = ((a + b) * softmax(z) - a * onehot(lm) - b * onehot(tr)) * (1 - tanh^2 if softcap),
     written back over the logits in the storage dtype.
The two target logits are single scalar loads (a gather, not a third sweep). The row's two cross-entropies go
to a (c, 2) float32 buffer that torch sums: unlike float32 atomics into (2,), the sum is deterministic run to
run, and the buffer is 8 bytes per row.

Block size: BLOCK_V = 4096 (capped at next_pow2(V)) with 8 warps is 16 elements per thread, two 16-byte
loads per thread for bf16/fp16: the sweeps are bandwidth-bound, this keeps loads vectorized, the per-block
reductions rare (32 per sweep at V = 128k) and the register footprint small enough for several programs
per SM to hide latency. Under TRITON_INTERPRET=1 a large block also means few interpreted iterations.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_V = 4096


@triton.jit
def _softcap(x, softcap, inv_softcap):
    """z = softcap * tanh(x / softcap) and dz/dx = 1 - tanh^2, both from e = exp(-2|x / softcap|)."""
    # libdevice.tanh does not run under TRITON_INTERPRET=1. Through e <= 1 nothing overflows and tanh saturates
    # to +-1 exactly; near 0 the absolute error is ~1 float32 ulp of 1, i.e. ~softcap * 6e-8 on z, below the
    # ulp of the logits that matter in the softmax. 4e / (1 + e)^2 keeps the derivative's relative precision
    # where tanh saturates and 1 - tanh^2 would cancel.
    e = tl.exp(-2.0 * tl.abs(x * inv_softcap))
    r = 1.0 / (1.0 + e)
    t = (1.0 - e) * r
    return softcap * tl.where(x < 0, -t, t), 4.0 * e * r * r


@triton.jit
def _safety_epilogue_kernel(
    logits_ptr,  # (c, V) fp32/bf16/fp16; raw logits in, d(loss)/d(raw logits) out
    lm_target_ptr,  # (c,) int64
    tr_target_ptr,  # (c,) int64
    lm_scale_ptr,  # () float32
    tr_scale_ptr,  # () float32
    ce_ptr,  # (c, 2) float32 out: [LM CE, transition CE] of each row, 0 where ignored
    V,  # int
    stride_row,  # logits.stride(0), in elements
    stride_lm,  # lm_target.stride(0)
    stride_tr,  # tr_target.stride(0)
    softcap,  # float, read only when HAS_SOFTCAP
    ignore_index,  # int
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_softcap = 1.0 / softcap
    # row * stride_row exceeds 2**31 for large chunks at V = 128k: 64-bit row offset, 32-bit column offsets.
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    lm_t = tl.load(lm_target_ptr + row * stride_lm)
    tr_t = tl.load(tr_target_ptr + row * stride_tr)
    lm_valid = lm_t != ignore_index
    tr_valid = tr_t != ignore_index
    lm_col = tl.where(lm_valid, lm_t, -1).to(tl.int32)
    tr_col = tl.where(tr_valid, tr_t, -1).to(tl.int32)
    a = tl.where(lm_valid, tl.load(lm_scale_ptr), 0.0)
    b = tl.where(tr_valid, tl.load(tr_scale_ptr), 0.0)

    # Sweep 1: log-sum-exp of z. Masked lanes are -inf after the softcap (tanh(-inf) would give -softcap).
    m_i = tl.zeros([], dtype=tl.float32) - float("inf")
    s_i = tl.zeros([], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z, _ = _softcap(z, softcap, inv_softcap)
        z = tl.where(mask, z, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=0))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m_i = m_new
    lse = m_i + tl.log(s_i)

    z_lm = tl.load(row_ptr + tl.maximum(lm_col, 0)).to(tl.float32)
    z_tr = tl.load(row_ptr + tl.maximum(tr_col, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        z_lm, _ = _softcap(z_lm, softcap, inv_softcap)
        z_tr, _ = _softcap(z_tr, softcap, inv_softcap)
    tl.store(ce_ptr + row * 2, tl.where(lm_valid, lse - z_lm, 0.0))
    tl.store(ce_ptr + row * 2 + 1, tl.where(tr_valid, lse - z_tr, 0.0))

    # Sweep 2: the gradient, over the logits. A row with neither target gets exact zeros (a = b = 0).
    ab = a + b
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        # -inf on masked lanes keeps exp(z - lse) <= 1 there too (0 could overflow it when lse << 0).
        x = tl.load(row_ptr + offs, mask=mask, other=-float("inf")).to(tl.float32)
        if HAS_SOFTCAP:
            z, dz_dx = _softcap(x, softcap, inv_softcap)
        else:
            z = x
        g = tl.exp(z - lse) * ab
        g = tl.where(offs == lm_col, g - a, g)
        g = tl.where(offs == tr_col, g - b, g)
        if HAS_SOFTCAP:
            g = g * dz_dx
        tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)


def safety_epilogue_triton(
    logits: torch.Tensor,  # (c, V) fp32/bf16/fp16, unit column stride; overwritten with d(loss)/d(logits)
    lm_target: torch.Tensor,  # (c,) int64, in [0, V) or ignore_index
    tr_target: torch.Tensor,  # (c,) int64, in [0, V) or ignore_index
    lm_scale: torch.Tensor,  # () float32 on logits.device
    tr_scale: torch.Tensor,  # () float32 on logits.device
    softcap: float | None,
    ignore_index: int,
) -> torch.Tensor:  # (2,) float32: [sum of LM CEs, sum of transition CEs], unscaled
    """Triton twin of ``scft_fast.ops.safety_epilogue.safety_epilogue_torch``: one launch, no host synchronization.
    Targets are not range-checked here (the op validates them before the chunk loop)."""
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"logits must be a 2-D float32/bfloat16/float16 tensor, got {logits.dtype} "
                        f"of shape {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have unit column stride (it is written in place), got strides {logits.stride()}")
    c, V = logits.shape
    for name, t in (("lm_target", lm_target), ("tr_target", tr_target)):
        if t.shape != (c,) or t.dtype != torch.int64 or t.device != logits.device:
            raise ValueError(f"{name} must be int64 of shape ({c},) on {logits.device}, got {t.dtype} of shape "
                             f"{tuple(t.shape)} on {t.device}")
    for name, t in (("lm_scale", lm_scale), ("tr_scale", tr_scale)):
        if t.shape != () or t.dtype != torch.float32 or t.device != logits.device:
            raise ValueError(f"{name} must be a 0-dim float32 tensor on {logits.device}, got {t.dtype} of shape "
                             f"{tuple(t.shape)} on {t.device}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    ce = torch.empty((c, 2), dtype=torch.float32, device=logits.device)
    if c > 0 and V > 0:
        block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(V))
        _safety_epilogue_kernel[(c,)](
            logits, lm_target, tr_target, lm_scale, tr_scale, ce,
            V, logits.stride(0), lm_target.stride(0), tr_target.stride(0),
            float(softcap) if softcap is not None else 1.0, ignore_index,
            HAS_SOFTCAP=softcap is not None,
            BLOCK_V=block_v,
            num_warps=8 if block_v >= 4096 else 4,
        )
    else:
        ce.zero_()
    return ce.sum(0)

