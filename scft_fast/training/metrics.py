"""Per-step metrics (JSONL), the loss-curve plot, and the held-out evaluation of the summary (its head figures are
scft_fast.metrics', shared with evaluation and generation)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from ..errors import UserError
from ..metrics import head_metrics, head_scores

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


@torch.no_grad()
def evaluate(engine, batches, ignore_index: int) -> dict:
    """Held-out head accuracy, FPR, TPR and AUROC (scft_fast.metrics: the verdict p_unsafe > THRESHOLD, which for a
    two-class head is its argmax), and the mean probability of the refusal token at the RTO positions (where
    transition_labels, shifted, names it). Every rank runs every batch (ZeRO-3's gathers are collective); the
    results are identical on all ranks. An undefined figure is None."""
    refusal_probs = []

    def forward(batch: dict) -> torch.Tensor:
        out = engine.eval_forward(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                  position_ids=batch.get("position_ids"), cu_seqlens=batch.get("cu_seqlens"),
                                  cls_index=batch["cls_index"])
        targets = batch["transition_labels"][:, 1:]
        rows = targets != ignore_index
        if rows.any():
            logits = out.logits[:, :-1][rows].float()
            refusal_probs.append(logits.softmax(-1).gather(1, targets[rows][:, None])[:, 0].cpu())
        return out.cls_logits

    engine.train(False)
    scores, labels = head_scores(forward, batches, ignore_index)
    engine.train(True)
    head = head_metrics(scores, labels)
    return {
        "head_accuracy": head["accuracy"], "head_fpr": head["fpr"], "head_tpr": head["tpr"],
        "head_auroc": head["auroc"], "head_samples": head["n"],
        "refusal_prob_rto": float(torch.cat(refusal_probs).mean()) if refusal_probs else None,
        "rto_positions": int(sum(len(p) for p in refusal_probs)),
    }
