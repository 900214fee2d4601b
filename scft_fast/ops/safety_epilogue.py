"""The per-chunk epilogue in plain PyTorch: logits -> losses and d(loss)/d(logits), in place.

Every backend implements this same function under a parallel name; only how it walks the chunk differs:
- ``safety_epilogue_torch`` (here): a handful of vectorized passes (the CPU fallback, and the readable spec),
- ``safety_epilogue_triton`` (kernels/safety_epilogue.py, ``scft_fast.kernels``): one program per row,
- ``safety_epilogue_cpu`` (scft_fast/ops/cpu_extension.py, loading csrc/safety_epilogue.cpp): one OpenMP pass
  per row.
All three are tested against the float64 definition ``scft_fast.ops.reference.safety_epilogue_ref``.

Contract, shared by all of them::

    epilogue(logits, lm_target, tr_target, lm_scale, tr_scale, softcap, ignore_index,
             label_smoothing=0.0, z_scale=None, row_stats=None, token_stats=False, compute_grad=True) -> sums
      logits:    (c, V) float32 / bfloat16 / float16, contiguous. Raw logits h @ W.T (+ b) on entry;
                 on exit d(loss)/d(raw logits), in the same dtype and storage (unspecified if not compute_grad).
      lm_target: (c,) int64, a token id in [0, V) or ignore_index
      tr_target: (c,) int64, a token id in [0, V) or ignore_index
      lm_scale:  float32 weight of each LM row: 0-dim (a device scalar: no host sync), or (c,), one per row
                 (the backward of reduction="none" folds the upstream gradient in here)
      tr_scale:  float32 weight of each transition row, 0-dim or (c,)
      softcap:   None or float > 0: z = softcap * tanh(raw / softcap)
      label_smoothing: eps in [0, 1): each target becomes (1 - eps) * onehot + eps / V (torch's cross_entropy)
      z_scale:   None, or the float32 weight (0-dim or (c,)) of lse^2 in each row with a target (z-loss)
      row_stats: None, or a (c, ROW_STATS) float32 output, per row: [LM cross-entropy, transition cross-entropy,
                 lse, entropy, correct]; the cross-entropies are 0 where the target is ignored, lse is NaN on a
                 row with neither target, entropy and correct are 0 unless token_stats and the row has an LM target
      token_stats: fill row_stats' entropy (of softmax(z)) and correct (1.0 when argmax z, first index on ties as
                 torch.argmax, is the LM target, else 0.0)
      compute_grad: False: only the losses (and row_stats); the gradient sweep is skipped
      sums:      (2,) float32 [sum of LM cross-entropies, sum of transition cross-entropies],
                 unscaled, over the rows whose target is not ignore_index; z_scale adds nothing to them.

    With a = lm_scale * [lm valid], b = tr_scale * [tr valid], c = z_scale * [a target], lse the row's log-sum-exp
    of z and zbar the mean of z over the V entries:
      CE(t)      = lse - (1 - eps) * z[t] - eps * zbar
      loss_row   = a * CE(lm) + b * CE(tr) + c * lse^2
      d loss_row / dz = (a + b + 2 c lse) * softmax(z) - (1 - eps) * (a * onehot(lm) + b * onehot(tr))
                        - eps * (a + b) / V
      d loss_row / draw = d loss_row / dz * (1 - tanh(raw / softcap)^2)     (softcap only)
    All arithmetic is in float32 whatever the storage dtype. With the defaults (eps = 0, no z_scale, no row_stats)
    every backend runs exactly the sweeps it ran before these options existed.
"""
from __future__ import annotations

import torch

# The columns of row_stats.
ROW_LM_CE, ROW_TR_CE, ROW_LSE, ROW_ENTROPY, ROW_CORRECT = range(5)
ROW_STATS = 5


def safety_epilogue_torch(
    logits: torch.Tensor,  # (c, V), overwritten with its gradient
    lm_target: torch.Tensor,  # (c,) int64
    tr_target: torch.Tensor,  # (c,) int64
    lm_scale: torch.Tensor,  # () or (c,) float32
    tr_scale: torch.Tensor,  # () or (c,) float32
    softcap: float | None,
    ignore_index: int,
    label_smoothing: float = 0.0,
    z_scale: torch.Tensor | None = None,  # () or (c,) float32
    row_stats: torch.Tensor | None = None,  # (c, ROW_STATS) float32, written
    token_stats: bool = False,
    compute_grad: bool = True,
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
    z_lm = z.gather(1, lm_idx).squeeze(1)
    z_tr = z.gather(1, tr_idx).squeeze(1)
    if label_smoothing:
        # (1 - eps) * (lse - z[t]) + eps * (lse - zbar), as torch's cross_entropy(label_smoothing=eps) defines it.
        z_mean = z.mean(dim=-1)
        z_lm = (1.0 - label_smoothing) * z_lm + label_smoothing * z_mean
        z_tr = (1.0 - label_smoothing) * z_tr + label_smoothing * z_mean
    lm_ce = (lse - z_lm) * lm_valid
    tr_ce = (lse - z_tr) * tr_valid
    sums = torch.stack([lm_ce.sum(), tr_ce.sum()])

    if row_stats is not None:
        row_stats.zero_()
        row_stats[:, ROW_LM_CE] = lm_ce
        row_stats[:, ROW_TR_CE] = tr_ce
        row_stats[:, ROW_LSE] = torch.where(lm_valid | tr_valid, lse, torch.nan)
        if token_stats:
            p = torch.softmax(z, dim=-1)
            entropy = lse - torch.linalg.vecdot(p, z)  # sum p (lse - z), with sum p = 1: no (c, V) temporary
            correct = z.argmax(dim=-1) == lm_target
            row_stats[:, ROW_ENTROPY] = torch.where(lm_valid, entropy, 0.0)
            row_stats[:, ROW_CORRECT] = (correct & lm_valid).float()
    if not compute_grad:
        return sums

    a = lm_scale * lm_valid  # (c,)
    b = tr_scale * tr_valid
    weight = a + b
    if z_scale is not None:
        weight = weight + 2.0 * z_scale * lse * (lm_valid | tr_valid)
    grad = z.sub_(lse.unsqueeze(1)).exp_().mul_(weight.unsqueeze(1))
    if label_smoothing:
        grad.sub_((label_smoothing / z.shape[1]) * (a + b).unsqueeze(1))
        a, b = (1.0 - label_smoothing) * a, (1.0 - label_smoothing) * b
    grad.scatter_add_(1, lm_idx, -a.unsqueeze(1))
    grad.scatter_add_(1, tr_idx, -b.unsqueeze(1))
    if tanh is not None:
        grad.mul_(1.0 - tanh.square_())
    if grad.data_ptr() != logits.data_ptr():
        logits.copy_(grad)
    return sums
