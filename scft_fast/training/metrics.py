"""Per-step metrics (JSONL), the loss-curve plot, and the held-out evaluation of the summary."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from ..errors import UserError

LOSS_CURVES = ("loss", "lm_loss", "transition_loss", "cls_loss")


class MetricsLog:
    """metrics.jsonl, one strict-JSON object per optimizer step (a non-finite number is null). On resume the lines
    after the checkpoint's step are dropped, so the file always reads as one run; so is a partial last line (the
    run was killed while writing it), with a message."""

    def __init__(self, path: str, resume_step: int, enabled: bool, report=print):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_step > 0 and os.path.exists(path):
            with open(path) as f:
                lines = f.readlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    if number < len(lines):
                        raise UserError(f"{path}:{number}: not a metrics record ({line.strip()!r:.80}); remove the "
                                        f"line or the file to resume") from None
                    report(f"{path}:{number}: dropped a partial last line (the run stopped while writing it)")
                    continue
                if step <= resume_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(path, "w") as f:
            f.writelines(kept)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")


def strict_json(value):
    """value with every non-finite float replaced by None: JSON has no NaN or Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str, value, indent: int | None = 2) -> None:
    with open(path, "w") as f:
        json.dump(strict_json(value), f, indent=indent, allow_nan=False)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# The terms of a metrics record a divergence names, in the loss's order.
DIVERGENCE_TERMS = {"lm_loss": "LM loss", "transition_loss": "RTO loss", "cls_loss": "head loss",
                    "loss": "total loss", "grad_norm": "gradient norm"}


def non_finite_terms(record: dict) -> list[str]:
    """'LM loss = nan', ... for the terms of a step's record that are NaN or infinite. The total loss is named only
    when no term explains it (loss modes without terms)."""
    bad = {k: record[k] for k in DIVERGENCE_TERMS
           if isinstance(record.get(k), float) and not math.isfinite(record[k])}
    if "loss" in bad and bad.keys() & {"lm_loss", "transition_loss", "cls_loss"}:
        del bad["loss"]
    return [f"{DIVERGENCE_TERMS[k]} = {v}" for k, v in bad.items()]


def plot_loss_curves(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(LOSS_CURVES), figsize=(4 * len(LOSS_CURVES), 3.2))
    for ax, key in zip(axes, LOSS_CURVES):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, lw=0.8, alpha=0.35, color="C0")
            window = max(1, len(values) // 20)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color="C0")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN with a single class."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


@torch.no_grad()
def evaluate(engine, batches, ignore_index: int, unsafe: int = 1) -> dict:
    """Held-out head accuracy, FPR and TPR, AUROC (P(unsafe) vs. the label), and the mean probability of the refusal token
    at the RTO positions (where transition_labels, shifted, names it). Every rank runs every batch (ZeRO-3's
    gathers are collective); the results are identical on all ranks."""
    engine.train(False)
    scores, labels, predictions, refusal_probs = [], [], [], []
    for batch in batches:
        out = engine.eval_forward(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                  position_ids=batch.get("position_ids"), cu_seqlens=batch.get("cu_seqlens"),
                                  cls_index=batch["cls_index"])
        cls_labels = batch["cls_labels"]
        labeled = cls_labels != ignore_index
        scores.append(out.cls_logits.float().softmax(-1)[labeled, unsafe].cpu())
        predictions.append(out.cls_logits[labeled].argmax(-1).cpu())
        labels.append(cls_labels[labeled].cpu())
        targets = batch["transition_labels"][:, 1:]
        rows = targets != ignore_index
        if rows.any():
            logits = out.logits[:, :-1][rows].float()
            refusal_probs.append(logits.softmax(-1).gather(1, targets[rows][:, None])[:, 0].cpu())
    engine.train(True)
    scores, labels = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    predictions = torch.cat(predictions).numpy()
    flagged, unsafe_rows = predictions == unsafe, labels == unsafe
    return {
        "head_accuracy": float((predictions == labels).mean()) if len(labels) else float("nan"),
        # at the head's argmax verdict: safe pairs flagged unsafe, unsafe pairs flagged
        "head_fpr": float(flagged[~unsafe_rows].mean()) if (~unsafe_rows).any() else float("nan"),
        "head_tpr": float(flagged[unsafe_rows].mean()) if unsafe_rows.any() else float("nan"),
        "head_auroc": auroc(scores, labels == unsafe),
        "head_samples": int(len(labels)),
        "refusal_prob_rto": float(torch.cat(refusal_probs).mean()) if refusal_probs else float("nan"),
        "rto_positions": int(sum(len(p) for p in refusal_probs)),
    }
