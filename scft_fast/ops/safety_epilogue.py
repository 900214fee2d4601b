"""The per-chunk epilogue in plain PyTorch: logits -> losses and d(loss)/d(logits), in place.

Every backend implements this same function under a parallel name; only how it walks the chunk differs:
- ``safety_epilogue_torch`` (here): a handful of vectorized passes (the CPU fallback, and the readable spec),
- ``safety_epilogue_triton`` (kernels/safety_epilogue.py, ``scft_fast.kernels``): one program per row,
- ``safety_epilogue_cpu`` (scft_fast/ops/cpu_extension.py, loading csrc/safety_epilogue.cpp): one OpenMP pass
  per row.
All three are tested against the float64 definition ``scft_fast.ops.reference.safety_epilogue_ref``.

Contract, shared by all of them::

    epilogue(logits, lm_target, tr_target, lm_scale, tr_scale, softcap, ignore_index) -> sums
      logits:    (c, V) float32 / bfloat16 / float16, contiguous. Raw logits h @ W.T (+ b) on entry;
                 on exit d(loss)/d(raw logits), in the same dtype and storage.
      lm_target: (c,) int64, a token id in [0, V) or ignore_index
      tr_target: (c,) int64, a token id in [0, V) or ignore_index
      lm_scale:  0-dim float32 tensor (device scalar: no host sync) weighting each LM row
      tr_scale:  0-dim float32 tensor weighting each transition row
      softcap:   None or float > 0: z = softcap * tanh(raw / softcap)
      sums:      (2,) float32 [sum of LM cross-entropies, sum of transition cross-entropies],
                 unscaled, over the rows whose target is not ignore_index.

    With a = lm_scale * [lm valid], b = tr_scale * [tr valid] and lse the row's log-sum-exp of z:
      loss_row = a * (lse - z[lm]) + b * (lse - z[tr])
      d loss_row / dz = (a + b) * softmax(z) - a * onehot(lm) - b * onehot(tr)
      d loss_row / draw = d loss_row / dz * (1 - tanh(raw / softcap)^2)     (softcap only)
    All arithmetic is in float32 whatever the storage dtype.
"""
from __future__ import annotations

import torch


def safety_epilogue_torch(
    logits: torch.Tensor,  # (c, V), overwritten with its gradient
    lm_target: torch.Tensor,  # (c,) int64
    tr_target: torch.Tensor,  # (c,) int64
    lm_scale: torch.Tensor,  # () float32
    tr_scale: torch.Tensor,  # () float32
    softcap: float | None,
    ignore_index: int,
) -> torch.Tensor:  # (2,) float32
    z = logits.float()  # a copy for low-precision storage, the same tensor for float32
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(z.div_(softcap))
        z = torch.mul(tanh, softcap, out=z)
    lse = torch.logsumexp(z, dim=-1)  # (c,)
    lm_valid = lm_target != ignore_index
    tr_valid = tr_target != ignore_index
    lm_idx = torch.where(lm_valid, lm_target, 0).unsqueeze(1)
    tr_idx = torch.where(tr_valid, tr_target, 0).unsqueeze(1)
    lm_ce = (lse - z.gather(1, lm_idx).squeeze(1)) * lm_valid
    tr_ce = (lse - z.gather(1, tr_idx).squeeze(1)) * tr_valid
    sums = torch.stack([lm_ce.sum(), tr_ce.sum()])

    a = lm_scale * lm_valid  # (c,)
    b = tr_scale * tr_valid
    grad = z.sub_(lse.unsqueeze(1)).exp_().mul_((a + b).unsqueeze(1))
    grad.scatter_add_(1, lm_idx, -a.unsqueeze(1))
    grad.scatter_add_(1, tr_idx, -b.unsqueeze(1))
    if tanh is not None:
        grad.mul_(1.0 - tanh.square_())
    if grad.data_ptr() != logits.data_ptr():
        logits.copy_(grad)
    return sums
