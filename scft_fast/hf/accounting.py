"""What one optimizer step counts and logs: shared by ``SCFTTrainer`` and ``scft-fast train``.

Normalizers. The fused loss divides its token terms by ``num_items_in_batch`` (LM + RTO targets) and its head
term by ``num_cls_in_batch`` (labeled sequences). Accumulated micro-batches (and ranks) give exactly the large
batch's gradient only if both are counted over the whole step before its first forward, the way the model counts
them: after its shift, packed rows respected (``step_targets``).

Logged metrics. ``output_stats`` turns one model output into sums (loss terms times their counts, correct head
predictions); summed over micro-batches, logging steps and ranks, ``stat_means`` makes them the means over all
of them, never a mean of per-batch means. Everything stays on the device: no host sync per micro-batch.
"""
from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX
from ..data.checks import TOKEN_TARGETS
from ..data.collate import positions_from_cu_seqlens, shift_labels

# n_stats: the LM targets over which the op's token statistics were computed (0 when they were not asked for).
STEP_STATS = ("loss", "lm_sum", "n_lm", "tr_sum", "n_tr", "cls_sum", "n_cls", "cls_correct", "lm_correct",
              "lm_entropy_sum", "n_stats")


def loss_targets(batch: dict, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(2,) int64 on the batch's device: [token targets (LM + RTO), labeled sequences] of one micro-batch, as
    the model's forward will count them from the same keys."""
    reference = batch["input_ids"]
    position_ids = batch.get("position_ids")
    if position_ids is None and batch.get("cu_seqlens") is not None:
        position_ids = positions_from_cu_seqlens(batch["cu_seqlens"], reference.shape[-1])
    tokens = torch.zeros((), dtype=torch.long, device=reference.device)
    for key in TOKEN_TARGETS:
        if batch.get(key) is not None:
            tokens = tokens + (shift_labels(batch[key], position_ids, ignore_index) != ignore_index).sum()
    cls_labels = batch.get("cls_labels")
    labeled = (cls_labels != ignore_index).sum() if cls_labels is not None else torch.zeros_like(tokens)
    return torch.stack([tokens, labeled.to(tokens.device)])


def step_targets(batches: list[dict], ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(2,) int64: ``loss_targets`` summed over one step's micro-batches (of this rank)."""
    return torch.stack([loss_targets(b, ignore_index) for b in batches]).sum(0)


def output_stats(out, cls_labels: torch.Tensor | None,  # (S,) the batch's head labels
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:  # (len(STEP_STATS),) float64, out's device
    loss = out.loss.detach().double()
    zero = torch.zeros((), dtype=torch.float64, device=loss.device)
    if out.n_lm is None:
        return torch.stack([loss] + [zero] * (len(STEP_STATS) - 1))
    n_lm, n_tr, n_cls = out.n_lm.double(), out.n_tr.double(), out.n_cls.double()
    correct = zero
    if out.cls_logits is not None and out.cls_logits.numel() and cls_labels is not None:
        correct = ((out.cls_logits.argmax(-1) == cls_labels) & (cls_labels != ignore_index)).sum().double()
    token = [zero, zero, zero]
    if getattr(out, "token_accuracy", None) is not None:
        token = [out.token_accuracy.double() * n_lm, out.entropy.double() * n_lm, n_lm]
    return torch.stack([loss, out.lm_loss.double() * n_lm, n_lm, out.transition_loss.double() * n_tr, n_tr,
                        out.cls_loss.double() * n_cls, n_cls, correct, *token])


def stat_means(stats: torch.Tensor) -> dict[str, float | None]:
    """lm_loss, transition_loss, cls_loss, head_accuracy, and the token statistics token_accuracy (argmax = label)
    and entropy (of the softmax) over the LM targets, over everything ``stats`` summed (None: no target, or no
    statistics asked for)."""
    s = dict(zip(STEP_STATS, stats.tolist()))

    def mean(total: str, count: str) -> float | None:
        return s[total] / s[count] if s[count] else None

    return {"lm_loss": mean("lm_sum", "n_lm"), "transition_loss": mean("tr_sum", "n_tr"),
            "cls_loss": mean("cls_sum", "n_cls"), "head_accuracy": mean("cls_correct", "n_cls"),
            "token_accuracy": mean("lm_correct", "n_stats"), "entropy": mean("lm_entropy_sum", "n_stats")}


def pooled_loss(stats: torch.Tensor, lm_coef: float = 1.0, transition_coef: float = 1.0,
                cls_coef: float = 1.0) -> float:
    """The loss of everything ``stats`` summed taken as one batch: (lm + RTO sums) / their targets + cls mean."""
    s = dict(zip(STEP_STATS, stats.tolist()))
    tokens = s["n_lm"] + s["n_tr"]
    token_loss = (lm_coef * s["lm_sum"] + transition_coef * s["tr_sum"]) / tokens if tokens else 0.0
    return token_loss + (cls_coef * s["cls_sum"] / s["n_cls"] if s["n_cls"] else 0.0)
