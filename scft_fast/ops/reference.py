"""Float64 references: the definitions, written as directly as possible, that tests and benchmarks compare against.

- ``safety_loss_ref``: the whole op, on the naive logits of the rows with a target (every backend of
  ``safety_loss``),
- ``safety_epilogue_ref``: one logits chunk's epilogue (``safety_epilogue_torch`` / ``_triton`` / ``_cpu``), and
  ``epilogue_row_stats_ref`` its per-row statistics,
- ``cls_head_ref``: the classification head (``cls_head_torch`` / ``_triton``).
Nothing here imports triton or the C++ extension, so every test can import it.
"""
from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX


def safety_loss_ref(
    hidden: torch.Tensor,  # (N, H)
    lm_weight: torch.Tensor,  # (V, H)
    labels: torch.Tensor,  # (N,)
    *,
    lm_bias: torch.Tensor | None = None,  # (V,)
    transition_labels: torch.Tensor | None = None,  # (N,)
    cls_weight: torch.Tensor | None = None,  # (C, H)
    cls_bias: torch.Tensor | None = None,  # (C,)
    cls_index: torch.Tensor | None = None,  # (S,)
    cls_labels: torch.Tensor | None = None,  # (S,)
    lm_coef: float = 1.0,
    transition_coef: float = 1.0,
    cls_coef: float = 1.0,
    num_items: float | None = None,
    num_cls: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Returns loss (() or (N,) for reduction="none"), lm_loss, transition_loss, cls_loss, cls_logits (float64,
    differentiable); n_lm, n_tr, n_target (ints); lse (N,) (NaN on rows without a target), z_loss (the mean of lse^2
    over rows with a target), token_accuracy and entropy (over LM-target rows), detached.

    The logits are formed only for rows with a target and the head's cross-entropy only over labeled pooled rows,
    so a non-finite value elsewhere (a NaN pooled row that carries no label) reaches neither the loss nor a
    gradient."""
    h = hidden.reshape(-1, hidden.shape[-1]).double()
    lm_t = labels.reshape(-1)
    tr_t = transition_labels.reshape(-1) if transition_labels is not None else torch.full_like(lm_t, ignore_index)
    lm_valid, tr_valid = lm_t != ignore_index, tr_t != ignore_index
    rows = torch.nonzero(lm_valid | tr_valid).squeeze(1)
    z = h[rows] @ lm_weight.double().T
    if lm_bias is not None:
        z = z + lm_bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)

    def per_row(targets, valid):  # the (smoothed) cross-entropy of each visited row, 0 where ignored
        valid = valid[rows]
        picked = logp.gather(1, torch.where(valid, targets[rows], 0).unsqueeze(1)).squeeze(1)
        ce = -(1.0 - label_smoothing) * picked - label_smoothing * logp.mean(dim=-1)
        return torch.where(valid, ce, 0.0), int(valid.sum())

    lm_row, n_lm = per_row(lm_t, lm_valid)
    tr_row, n_tr = per_row(tr_t, tr_valid)
    lse_sq = lse.square()
    row_loss = lm_coef * lm_row + transition_coef * tr_row + z_loss * lse_sq
    if reduction == "none":
        token_loss = z.new_zeros(lm_t.shape[0]).index_put((rows,), row_loss)
    elif reduction == "sum":
        token_loss = row_loss.sum()
    else:
        denom = float(num_items) if num_items is not None else float(n_lm + n_tr)
        token_loss = row_loss.sum() / denom if denom > 0 else z.new_zeros(())

    cls_loss = cls_term = z.new_zeros(())
    cls_logits = None
    if cls_weight is not None:
        def head_logits(index):
            u = h[index] @ cls_weight.double().T
            return u + cls_bias.double() if cls_bias is not None else u

        cls_logits = head_logits(cls_index)
        valid = cls_labels != ignore_index
        if valid.any():
            cls_sum = torch.nn.functional.cross_entropy(head_logits(cls_index[valid]), cls_labels[valid],
                                                        reduction="sum")
            cls_loss = cls_sum / int(valid.sum())
            if num_cls is None:
                cls_term = cls_loss
            elif float(num_cls) > 0:
                cls_term = cls_sum / float(num_cls)

    lm_rows = lm_valid[rows]
    probs = logp.exp()
    entropy = -(probs * logp).sum(dim=-1)
    correct = z.argmax(dim=-1) == torch.where(lm_rows, lm_t[rows], -1)
    return {
        "loss": token_loss + cls_coef * cls_term,
        "lm_loss": lm_row.sum() / max(n_lm, 1),
        "transition_loss": tr_row.sum() / max(n_tr, 1),
        "cls_loss": cls_loss,
        "cls_logits": cls_logits,
        "n_lm": n_lm,
        "n_tr": n_tr,
        "n_target": rows.numel(),
        "lse": z.new_full((lm_t.shape[0],), torch.nan).index_put((rows,), lse).detach(),
        "z_loss": (lse_sq.sum() / max(rows.numel(), 1)).detach(),
        "token_accuracy": (correct.sum() / max(n_lm, 1)).double(),
        "entropy": (entropy[lm_rows].sum() / max(n_lm, 1)).detach(),
    }


def safety_epilogue_ref(
    logits: torch.Tensor,  # (c, V), left untouched
    lm_target: torch.Tensor,  # (c,) int64
    tr_target: torch.Tensor,  # (c,) int64
    lm_scale: torch.Tensor,  # () or (c,)
    tr_scale: torch.Tensor,  # () or (c,)
    softcap: float | None,
    ignore_index: int,
    label_smoothing: float = 0.0,
    z_scale: torch.Tensor | None = None,  # () or (c,)
) -> tuple[torch.Tensor, torch.Tensor]:  # sums (2,) float64, d(loss)/d(logits) (c, V) float64
    """The epilogue contract (scft_fast/ops/safety_epilogue.py) in float64; the logits are left untouched."""
    x = logits.double()
    z = softcap * torch.tanh(x / softcap) if softcap is not None else x
    lse = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    rows = torch.arange(x.shape[0], device=x.device)
    eps = label_smoothing
    sums, grad = [], torch.zeros_like(x)
    for target, scale in ((lm_target, lm_scale), (tr_target, tr_scale)):
        valid = target != ignore_index
        idx = torch.where(valid, target, 0)
        ce = lse - (1.0 - eps) * z[rows, idx] - eps * z.mean(dim=-1)
        sums.append((ce * valid).sum())
        w = scale.double() * valid  # (c,)
        grad += w[:, None] * (p - eps / x.shape[1])
        grad[rows, idx] -= (1.0 - eps) * w
    if z_scale is not None:
        has_target = (lm_target != ignore_index) | (tr_target != ignore_index)
        grad += (2.0 * z_scale.double() * lse * has_target)[:, None] * p
    if softcap is not None:
        grad = grad * (1.0 - torch.tanh(x / softcap) ** 2)
    return torch.stack(sums), grad


def epilogue_row_stats_ref(
    logits: torch.Tensor,  # (c, V)
    lm_target: torch.Tensor,  # (c,) int64
    tr_target: torch.Tensor,  # (c,) int64
    softcap: float | None,
    ignore_index: int,
    label_smoothing: float = 0.0,
) -> torch.Tensor:  # (c, ROW_STATS) float64
    """The epilogue's row_stats with token_stats (safety_epilogue.py's contract), in float64."""
    x = logits.double()
    z = softcap * torch.tanh(x / softcap) if softcap is not None else x
    logp = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    lm_valid, tr_valid = lm_target != ignore_index, tr_target != ignore_index
    rows = torch.arange(x.shape[0], device=x.device)

    def ce(target, valid):
        picked = logp[rows, torch.where(valid, target, 0)]
        return torch.where(valid, -(1.0 - label_smoothing) * picked - label_smoothing * logp.mean(dim=-1), 0.0)

    entropy = -(logp.exp() * logp).sum(dim=-1)
    correct = (z.argmax(dim=-1) == lm_target) & lm_valid
    return torch.stack([ce(lm_target, lm_valid), ce(tr_target, tr_valid),
                        torch.where(lm_valid | tr_valid, lse, torch.nan), torch.where(lm_valid, entropy, 0.0),
                        correct.double()], dim=1)


def cls_head_ref(
    hidden: torch.Tensor,  # (N, H)
    cls_index: torch.Tensor,  # (S,) int64
    cls_labels: torch.Tensor,  # (S,) int64
    cls_weight: torch.Tensor,  # (C, H)
    cls_bias: torch.Tensor | None,  # (C,)
    cls_scale: torch.Tensor,  # ()
    ignore_index: int,
):
    """The head contract (scft_fast/ops/cls_head.py) in float64 through autograd: (ce (S,), cls_logits (S, C),
    grad_pooled (S, H), grad_cls_weight (C, H), grad_cls_bias (C,) or None)."""
    pooled = hidden.double()[cls_index].requires_grad_(True)
    weight = cls_weight.double().requires_grad_(True)
    bias = cls_bias.double().requires_grad_(True) if cls_bias is not None else None
    logits = torch.nn.functional.linear(pooled, weight, bias)
    ce = torch.nn.functional.cross_entropy(logits, cls_labels, ignore_index=ignore_index, reduction="none")
    (ce.sum() * cls_scale.double()).backward()
    return (ce.detach(), logits.detach(), pooled.grad, weight.grad,
            bias.grad if bias is not None else None)
