"""The held-out evaluation: one definition of its figures, for ``SCFTTrainer.evaluate`` and for the before/after
summary of a run (``HeldOutSummary``).

    figures = held_out(model, dataset, SCFTDataCollator(tokenizer))     # every rank calls it under ZeRO-3

Each batch goes through the model's fused forward with its targets (no logits are built): the loss terms and the
head's logits at the pooled rows. From their sums over the set (``scft_fast.hf.accounting.output_stats``, reduced
over ranks) and the labeled rows' p_unsafe:
    loss, lm_loss, transition_loss, cls_loss   the set taken as one batch (never a mean of batch means)
    head_accuracy, head_auroc, head_fpr, head_tpr, head_samples
                                               scft_fast.metrics.head_metrics of the verdict p_unsafe > THRESHOLD
    refusal_prob_rto                           exp(-transition_loss): the geometric mean, over the RTO positions,
                                               of the refusal token's probability (DeRTa's transition target)
    rto_positions                              how many RTO positions the set holds
An undefined figure (no target of its kind) is None.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..constants import IGNORE_INDEX
from ..metrics import head_metrics, p_unsafe


def held_out_metrics(stats: torch.Tensor,  # (len(STEP_STATS),) sums over the set and the ranks
                     scores: np.ndarray,  # (n,) p_unsafe of the labeled pooled rows
                     labels: np.ndarray,  # (n,) their class labels
                     lm_coef: float = 1.0, transition_coef: float = 1.0, cls_coef: float = 1.0) -> dict:
    from ..hf.accounting import STEP_STATS, pooled_loss, stat_means

    means = stat_means(stats)
    head = head_metrics(scores, labels)
    transition = means["transition_loss"]
    counts = {name: int(stats[STEP_STATS.index(name)]) for name in ("n_lm", "n_tr", "n_cls")}
    has_targets = any(counts.values())
    return {
        "loss": pooled_loss(stats, lm_coef, transition_coef, cls_coef) if has_targets else None,
        "lm_loss": means["lm_loss"], "transition_loss": transition, "cls_loss": means["cls_loss"],
        "head_accuracy": head["accuracy"], "head_auroc": head["auroc"], "head_fpr": head["fpr"],
        "head_tpr": head["tpr"], "head_samples": head["n"],
        "refusal_prob_rto": math.exp(-transition) if transition is not None else None,
        "rto_positions": counts["n_tr"],
    }


@torch.no_grad()
def held_out(model, dataset, collator, batch_size: int = 16) -> dict:
    """``held_out_metrics`` of ``model`` (an ``apply_scft_fast`` model, PEFT-wrapped or not) on ``dataset`` (rows of
    ``scft_fast.data.build_dataset``, padded by ``collator``). Every rank runs every batch, as ZeRO-3's gathers
    require; the figures are the same on every rank."""
    from ..hf.accounting import output_stats
    from ..hf.peft import unwrap

    base = unwrap(model)
    config = getattr(base, "scft_config", None)
    ignore = config.ignore_index if config is not None else IGNORE_INDEX
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stats, scores, labels = None, [], []
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collator(rows).items()}
            if config is None:  # a plain fused LM: its targets are the LM labels
                batch = {k: v for k, v in batch.items() if k not in ("transition_labels", "cls_labels", "cls_index")}
            out = model(**batch)
            cls_labels = batch.get("cls_labels")
            batch_stats = output_stats(out, cls_labels, ignore)
            stats = batch_stats if stats is None else stats + batch_stats
            if getattr(out, "cls_logits", None) is not None and cls_labels is not None:
                labeled = cls_labels != ignore
                scores.append(p_unsafe(out.cls_logits[labeled]).double().cpu())
                labels.append(cls_labels[labeled].cpu())
    finally:
        model.train(was_training)
    if stats is None:
        from ..hf.accounting import STEP_STATS

        stats = torch.zeros(len(STEP_STATS), dtype=torch.float64, device=device)
    coefs = {} if config is None else dict(lm_coef=config.lm_coef, transition_coef=config.transition_coef,
                                           cls_coef=config.cls_coef)
    return held_out_metrics(stats.cpu(), torch.cat(scores).numpy() if scores else np.zeros(0),
                            torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64), **coefs)

