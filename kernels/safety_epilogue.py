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

The options of the contract are constexpr branches, so the default kernel is the one above: label smoothing adds
a sum of z to sweep 1 and a constant to sweep 2; z_loss adds 2 c lse to the softmax weight of sweep 2; the token
stats add to sweep 1 a running sum of exp(z - m) (z - m) for the entropy and a block argmax (with BLOCK_V = 2048:
at 4096 they need 70 registers); row_stats is 20 bytes per row; without a gradient sweep 2 is skipped.

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
    lm_scale_ptr,  # () or (c,) float32
    tr_scale_ptr,  # () or (c,) float32
    z_scale_ptr,  # () or (c,) float32, read only when HAS_Z_LOSS
    ce_ptr,  # (c, 2) float32 out: [LM CE, transition CE] of each row, 0 where ignored
    row_stats_ptr,  # (c, 5) float32 out, written only when ROW_STATS (safety_epilogue.py's row_stats)
    V,  # int
    stride_row,  # logits.stride(0), in elements
    stride_lm,  # lm_target.stride(0)
    stride_tr,  # tr_target.stride(0)
    stride_scale,  # 0: one scale for every row; 1: one per row (lm, tr and z scales alike)
    softcap,  # float, read only when HAS_SOFTCAP
    ignore_index,  # int
    label_smoothing,  # float, read only when HAS_SMOOTHING
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    ROW_STATS: tl.constexpr,
    TOKEN_STATS: tl.constexpr,  # entropy and argmax in sweep 1 (only with ROW_STATS)
    COMPUTE_GRAD: tl.constexpr,
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
    a = tl.where(lm_valid, tl.load(lm_scale_ptr + row * stride_scale), 0.0)
    b = tl.where(tr_valid, tl.load(tr_scale_ptr + row * stride_scale), 0.0)

    # Sweep 1: log-sum-exp of z. Masked lanes are -inf after the softcap (tanh(-inf) would give -softcap).
    m_i = tl.zeros([], dtype=tl.float32) - float("inf")
    s_i = tl.zeros([], dtype=tl.float32)
    z_sum = tl.zeros([], dtype=tl.float32)  # sum of z (label smoothing)
    u_i = tl.zeros([], dtype=tl.float32)  # sum of exp(z - m_i) * (z - m_i) (entropy), rescaled with s_i
    arg_i = tl.zeros([], dtype=tl.int32)  # first index of the running max (token accuracy)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z, _ = _softcap(z, softcap, inv_softcap)
        z = tl.where(mask, z, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=0))
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        if TOKEN_STATS:
            m_block = tl.max(z, axis=0)
            # An earlier block keeps a tie: the first index, as torch.argmax.
            arg_i = tl.where(m_block > m_i, tl.min(tl.where(z == m_block, offs, V), axis=0), arg_i)
            # u is relative to the running max: moving it from m_i to m_new adds (m_i - m_new) * s_i before the
            # common rescaling (no term before the first block, where m_i = -inf and s_i = 0).
            shift = (tl.where(s_i > 0, m_i, m_new) - m_new) * s_i
            u_i = (u_i + shift) * tl.exp(m_i - m_new) + tl.sum(
                tl.exp(z - m_new) * tl.where(mask, z - m_new, 0.0), axis=0)
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m_i = m_new
    lse = m_i + tl.log(s_i)

    z_lm = tl.load(row_ptr + tl.maximum(lm_col, 0)).to(tl.float32)
    z_tr = tl.load(row_ptr + tl.maximum(tr_col, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        z_lm, _ = _softcap(z_lm, softcap, inv_softcap)
        z_tr, _ = _softcap(z_tr, softcap, inv_softcap)
    if HAS_SMOOTHING:
        z_mean = z_sum / V
        z_lm = (1.0 - label_smoothing) * z_lm + label_smoothing * z_mean
        z_tr = (1.0 - label_smoothing) * z_tr + label_smoothing * z_mean
    ce_lm = tl.where(lm_valid, lse - z_lm, 0.0)
    ce_tr = tl.where(tr_valid, lse - z_tr, 0.0)
    tl.store(ce_ptr + row * 2, ce_lm)
    tl.store(ce_ptr + row * 2 + 1, ce_tr)
    if ROW_STATS:
        stats_ptr = row_stats_ptr + row * 5
        tl.store(stats_ptr, ce_lm)
        tl.store(stats_ptr + 1, ce_tr)
        tl.store(stats_ptr + 2, tl.where(lm_valid | tr_valid, lse, float("nan")))
        if TOKEN_STATS:
            tl.store(stats_ptr + 3, tl.where(lm_valid, tl.log(s_i) - u_i / s_i, 0.0))
            tl.store(stats_ptr + 4, tl.where(lm_valid & (arg_i == lm_col), 1.0, 0.0))
        else:
            tl.store(stats_ptr + 3, 0.0)
            tl.store(stats_ptr + 4, 0.0)

    # Sweep 2: the gradient, over the logits. A row with neither target gets exact zeros (a = b = 0).
    if COMPUTE_GRAD:
        ab = a + b
        p_weight = ab
        if HAS_Z_LOSS:
            c = tl.where(lm_valid | tr_valid, tl.load(z_scale_ptr + row * stride_scale), 0.0)
            p_weight = ab + 2.0 * c * lse
        if HAS_SMOOTHING:
            uniform = label_smoothing * ab / V
            a = (1.0 - label_smoothing) * a
            b = (1.0 - label_smoothing) * b
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            # -inf on masked lanes keeps exp(z - lse) <= 1 there too (0 could overflow it when lse << 0).
            x = tl.load(row_ptr + offs, mask=mask, other=-float("inf")).to(tl.float32)
            if HAS_SOFTCAP:
                z, dz_dx = _softcap(x, softcap, inv_softcap)
            else:
                z = x
            g = tl.exp(z - lse) * p_weight
            if HAS_SMOOTHING:
                g = g - uniform
            g = tl.where(offs == lm_col, g - a, g)
            g = tl.where(offs == tr_col, g - b, g)
            if HAS_SOFTCAP:
                g = g * dz_dx
            tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)


def safety_epilogue_triton(
    logits: torch.Tensor,  # (c, V) fp32/bf16/fp16, unit column stride; overwritten with d(loss)/d(logits)
    lm_target: torch.Tensor,  # (c,) int64, in [0, V) or ignore_index
    tr_target: torch.Tensor,  # (c,) int64, in [0, V) or ignore_index
    lm_scale: torch.Tensor,  # () or (c,) float32 on logits.device
    tr_scale: torch.Tensor,  # () or (c,) float32 on logits.device
    softcap: float | None,
    ignore_index: int,
    label_smoothing: float = 0.0,
    z_scale: torch.Tensor | None = None,  # () or (c,) float32 on logits.device
    row_stats: torch.Tensor | None = None,  # (c, 5) float32 on logits.device, contiguous; written
    token_stats: bool = False,
    compute_grad: bool = True,
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
    scales = {"lm_scale": lm_scale, "tr_scale": tr_scale, **({} if z_scale is None else {"z_scale": z_scale})}
    for name, t in scales.items():
        if t.shape not in ((), (c,)) or t.dtype != torch.float32 or t.device != logits.device:
            raise ValueError(f"{name} must be a 0-dim or ({c},) float32 tensor on {logits.device}, got {t.dtype} of "
                             f"shape {tuple(t.shape)} on {t.device}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if row_stats is not None and (row_stats.shape != (c, 5) or row_stats.dtype != torch.float32
                                  or not row_stats.is_contiguous() or row_stats.device != logits.device):
        raise ValueError(f"row_stats must be a contiguous ({c}, 5) float32 tensor on {logits.device}, got "
                         f"{row_stats.dtype} of shape {tuple(row_stats.shape)}")
    # One stride serves the three scales: a per-row one makes the others per-row too (c floats).
    per_row = any(t.dim() == 1 for t in scales.values())
    if per_row:
        lm_scale, tr_scale, z_scale = (None if t is None else t.expand(c).contiguous()
                                       for t in (lm_scale, tr_scale, z_scale))
    ce = torch.empty((c, 2), dtype=torch.float32, device=logits.device)
    if c > 0 and V > 0:
        token_stats = token_stats and row_stats is not None
        # The token stats' block argmax and entropy sum take 70 registers at 4096 (sm_90, softcap): half the block
        # keeps the program within 64 and 16-byte loads (tests/test_kernels_compile.py).
        block_v = min(_MAX_BLOCK_V // 2 if token_stats else _MAX_BLOCK_V, triton.next_power_of_2(V))
        _safety_epilogue_kernel[(c,)](
            logits, lm_target, tr_target, lm_scale, tr_scale, lm_scale if z_scale is None else z_scale, ce,
            ce if row_stats is None else row_stats,
            V, logits.stride(0), lm_target.stride(0), tr_target.stride(0), 1 if per_row else 0,
            float(softcap) if softcap is not None else 1.0, ignore_index, float(label_smoothing),
            HAS_SOFTCAP=softcap is not None,
            HAS_SMOOTHING=label_smoothing > 0,
            HAS_Z_LOSS=z_scale is not None,
            ROW_STATS=row_stats is not None,
            TOKEN_STATS=token_stats,
            COMPUTE_GRAD=compute_grad,
            BLOCK_V=block_v,
            num_warps=8 if block_v >= 4096 else 4,
        )
    else:
        ce.zero_()
    return ce.sum(0)
