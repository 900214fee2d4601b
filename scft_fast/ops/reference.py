"""Float64 reference of ``safety_loss``, built on the naive N x V logits.

Tests compare every backend against it; it is the definition written as directly as possible.
"""
from __future__ import annotations

import torch


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
    ignore_index: int = -100,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """Returns loss, lm_loss, transition_loss, cls_loss, cls_logits (float64, differentiable)."""
    h = hidden.reshape(-1, hidden.shape[-1]).double()
    z = h @ lm_weight.double().T
    if lm_bias is not None:
        z = z + lm_bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)

    def term(targets):
        targets = targets.reshape(-1)
        valid = targets != ignore_index
        picked = logp[valid].gather(1, targets[valid].unsqueeze(1)).squeeze(1)
        return -picked.sum(), int(valid.sum())

    lm_sum, n_lm = term(labels)
    tr_sum, n_tr = term(transition_labels) if transition_labels is not None else (z.new_zeros(()), 0)
    denom = float(num_items) if num_items is not None else float(n_lm + n_tr)
    token_loss = (lm_coef * lm_sum + transition_coef * tr_sum) / denom if denom > 0 else z.new_zeros(())
    cls_loss = cls_term = z.new_zeros(())
    cls_logits = None
    if cls_weight is not None:
        u = h[cls_index] @ cls_weight.double().T
        if cls_bias is not None:
            u = u + cls_bias.double()
        cls_logits = u
        valid = cls_labels != ignore_index
        if valid.any():
            cls_sum = torch.nn.functional.cross_entropy(u[valid], cls_labels[valid], reduction="sum")
            cls_loss = cls_sum / int(valid.sum())
            cls_term = cls_sum / float(num_cls) if num_cls is not None else cls_loss
    return {
        "loss": token_loss + cls_coef * cls_term,
        "lm_loss": lm_sum / max(n_lm, 1),
        "transition_loss": tr_sum / max(n_tr, 1),
        "cls_loss": cls_loss,
        "cls_logits": cls_logits,
        "n_lm": n_lm,
        "n_tr": n_tr,
    }
