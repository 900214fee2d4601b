"""The head's scores and what they measure, defined once for training, evaluation and generation.

    p = p_unsafe(cls_logits)                          # (S, C) -> (S,): 1 - P(SAFE)
    head_metrics(p, labels, threshold=THRESHOLD)      # accuracy, AUROC, FPR, TPR of the verdict p > threshold

The verdict. Only SAFE (data/constants.py) names a safe response; every other class (UNSAFE, and any further class
of a head with C > 2) is unsafe, so p_unsafe = 1 - P(SAFE) and a labeled row is a positive when its label is not
SAFE. A pair is flagged (blocked by the gate) when p_unsafe > threshold, strictly.

Undefined figures (the AUROC of a set with one class, the FPR without safe rows, any figure of an empty set) are
None: JSON writes null and the tables print n/a.

The ``_ref`` twins are brute-force definitions the tests compare against.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from .data.constants import SAFE

THRESHOLD = 0.5  # flagged when p_unsafe > THRESHOLD, unless a call or the model's SCFT config sets another


def p_unsafe(cls_logits: torch.Tensor) -> torch.Tensor:  # (S, C) -> (S,) float32
    """The head's probability that a response is unsafe: every class but SAFE."""
    return 1.0 - cls_logits.float().softmax(-1)[..., SAFE]


def is_unsafe(labels) -> np.ndarray:  # (N,) class labels -> (N,) bool
    return np.asarray(labels) != SAFE


def auroc(scores, labels) -> float | None:  # scores, labels: (N,); labels 1 (or True) positive, else negative
    """Rank-based AUROC (Mann-Whitney U), ties counted half; None when a class is absent."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels) == 1
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first occurrence
    average_rank = first_rank + (counts - 1) / 2.0
    rank_sum = average_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_ref(scores, labels) -> float | None:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y != 1]
    if not pos or not neg:
        return None
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:  # -> fpr, tpr (K,) each, from (0, 0) to (1, 1)
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels) == 1
    thresholds = np.unique(scores)[::-1]
    tpr = [(scores[labels] >= t).mean() for t in thresholds]
    fpr = [(scores[~labels] >= t).mean() for t in thresholds]
    return np.array([0.0] + fpr), np.array([0.0] + tpr)


def head_metrics(p_unsafe, labels, threshold: float = THRESHOLD) -> dict:  # p_unsafe, labels: (N,)
    """n, n_unsafe, and accuracy, AUROC, FPR and TPR of the verdict p_unsafe > threshold against the labels."""
    p, y = np.asarray(p_unsafe, dtype=np.float64), is_unsafe(labels)
    flagged = p > threshold
    return {"n": int(len(p)), "n_unsafe": int(y.sum()),
            "accuracy": float((flagged == y).mean()) if len(p) else None,
            "auroc": auroc(p, y),
            "fpr": float(flagged[~y].mean()) if (~y).any() else None,
            "tpr": float(flagged[y].mean()) if y.any() else None}


def threshold_at_fpr(p_unsafe, labels, max_fpr: float) -> dict | None:  # p_unsafe, labels: (N,)
    """The lowest threshold whose verdict p_unsafe > threshold flags at most max_fpr of the safe pairs, with the FPR
    and TPR there; None without safe pairs. It is the (k + 1)-th highest safe score, k = floor(max_fpr * n_safe):
    only the k above it are flagged, and any lower threshold also flags it."""
    p, y = np.asarray(p_unsafe, dtype=np.float64), is_unsafe(labels)
    safe = np.sort(p[~y])[::-1]
    if not len(safe):
        return None
    allowed = int(np.floor(max_fpr * len(safe) + 1e-9))  # max_fpr < 1, so allowed < len(safe)
    threshold = float(safe[allowed])
    return {"max_fpr": max_fpr, "threshold": threshold, "fpr": float((safe > threshold).mean()),
            "tpr": float((p[y] > threshold).mean()) if y.any() else None, "n_safe": int(len(safe)),
            "n_unsafe": int(y.sum())}


def threshold_at_fpr_ref(p_unsafe, labels, max_fpr: float) -> float | None:
    safe = [p for p, y in zip(p_unsafe, labels) if y == SAFE]
    within = [t for t in safe if sum(p > t for p in safe) <= max_fpr * len(safe) + 1e-9]
    return min(within) if within else None


@torch.no_grad()
def head_scores(forward: Callable[[dict], torch.Tensor], batches: Iterable[dict],
                ignore_index: int) -> tuple[np.ndarray, np.ndarray]:  # -> p_unsafe (n,) float64, labels (n,) int64
    """The held-out head evaluation: p_unsafe and the label of every labeled pooled row of the batches, in order.
    A batch holds ``cls_labels`` (S,) (ignore_index: no label); forward(batch) returns its head logits (S, C) at
    those rows, so that padded and packed batches, a model or a (DeepSpeed) engine all take this one path."""
    scores, labels = [], []
    for batch in batches:
        cls_logits, cls_labels = forward(batch), batch["cls_labels"]
        labeled = cls_labels != ignore_index
        scores.append(p_unsafe(cls_logits[labeled.to(cls_logits.device)]).double().cpu())
        labels.append(cls_labels[labeled].cpu())
    if not scores:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return torch.cat(scores).numpy(), torch.cat(labels).numpy()
