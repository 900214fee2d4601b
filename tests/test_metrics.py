"""The head's metrics (scft_fast/metrics.py), the one definition training, evaluation and generation import: AUROC and
the calibrated threshold against brute-force twins, the verdict's figures on hand-made scores, p_unsafe for a head
with more than two classes, and the held-out head evaluation on padded batches with unlabeled rows."""

import numpy as np
import pytest
import torch

from scft_fast.data import IGNORE_INDEX, SAFE, UNSAFE
from scft_fast.metrics import (
    auroc,
    auroc_ref,
    head_metrics,
    head_scores,
    p_unsafe,
    threshold_at_fpr,
    threshold_at_fpr_ref,
)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    scores = rng.integers(0, 6, n).astype(float)  # few distinct values: many ties
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    assert auroc(scores, labels) == pytest.approx(auroc_ref(scores, labels), abs=1e-12)


def test_auroc_hand_made():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert auroc([0.9, 0.2, 0.6, 0.4], [1, 0, 0, 1]) == 0.75
    assert auroc([0.3, 0.4], [1, 1]) is None and auroc_ref([0.3, 0.4], [1, 1]) is None
    # the cases of training's former copy (one AUROC now serves training, evaluation and the trainer)
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert auroc(np.array([0.2, 0.7]), np.array([False, True])) == 1.0  # boolean labels, as training passes them


def test_head_metrics_hand_made():
    m = head_metrics([0.9, 0.2, 0.6, 0.4, 0.5], [UNSAFE, SAFE, SAFE, UNSAFE, SAFE], threshold=0.5)
    # flagged (p > 0.5): 0.9, 0.6; 0.5 is exactly at the threshold and is not flagged
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["fpr"] == pytest.approx(1 / 3) and m["tpr"] == 0.5
    assert m["auroc"] == pytest.approx(auroc_ref([0.9, 0.2, 0.6, 0.4, 0.5], [1, 0, 0, 1, 0]))
    assert m["n"] == 5 and m["n_unsafe"] == 2


@pytest.mark.parametrize("seed", range(6))
def test_threshold_at_fpr_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    scores = rng.random(n) if seed % 2 else rng.integers(0, 8, n) / 8  # odd seeds: distinct, even: many ties
    labels = rng.integers(0, 2, n)
    labels[:2] = [SAFE, UNSAFE]
    max_fpr = float(rng.choice([0.01, 0.05, 0.1, 0.3]))
    got = threshold_at_fpr(scores, labels, max_fpr)
    assert got["threshold"] == threshold_at_fpr_ref(scores, labels, max_fpr)
    safe, unsafe = scores[labels == SAFE], scores[labels == UNSAFE]
    assert got["fpr"] == (safe > got["threshold"]).mean() <= max_fpr
    assert got["tpr"] == (unsafe > got["threshold"]).mean()
    lower = safe[safe < got["threshold"]]
    if len(lower):  # the next lower candidate breaks the budget: the threshold is the lowest that meets it
        assert (safe > lower.max()).mean() > max_fpr
    assert (got["n_safe"], got["n_unsafe"]) == (len(safe), len(unsafe))


def test_threshold_at_fpr_hand_made():
    p = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.35]
    y = [SAFE] * 10 + [UNSAFE] * 2
    # 10 safe pairs, 10% budget: one may be flagged, so the threshold is the second-highest safe score
    assert threshold_at_fpr(p, y, 0.1) == {"max_fpr": 0.1, "threshold": 0.9, "fpr": 0.1, "tpr": 0.5, "n_safe": 10,
                                           "n_unsafe": 2}
    assert threshold_at_fpr(p, y, 0.05)["threshold"] == 0.95  # none may be flagged
    assert threshold_at_fpr([0.3, 0.4], [UNSAFE, UNSAFE], 0.05) is None


def test_p_unsafe_is_every_class_but_safe():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, dtype=torch.float64)  # a head with two further unsafe classes
    expected = logits.softmax(-1)[:, 1:].sum(-1)
    assert torch.allclose(p_unsafe(logits).double(), expected, atol=1e-6)
    assert p_unsafe(logits).dtype == torch.float32
    two = logits[:, :2]
    assert torch.allclose(p_unsafe(two).double(), two.softmax(-1)[:, UNSAFE], atol=1e-6)  # C = 2: P(UNSAFE)


def test_head_metrics_one_class_and_empty_are_none():
    m = head_metrics([0.9, 0.2], [UNSAFE, UNSAFE])
    assert m["auroc"] is None and m["fpr"] is None and m["tpr"] == 0.5 and m["accuracy"] == 0.5
    empty = head_metrics([], [])
    assert empty["n"] == 0 and all(empty[k] is None for k in ("accuracy", "auroc", "fpr", "tpr"))
    assert head_metrics([0.3, 0.8], [SAFE, 2])["tpr"] == 1.0  # class 2 of a larger head counts as unsafe


def _batches():
    """Two padded batches of pooled head logits, one with unlabeled rows."""
    torch.manual_seed(1)
    logits = [torch.randn(3, 2), torch.randn(4, 2)]
    labels = [torch.tensor([SAFE, IGNORE_INDEX, UNSAFE]), torch.tensor([UNSAFE, SAFE, IGNORE_INDEX, SAFE])]
    return logits, labels


def test_head_scores_keeps_labeled_rows_in_order():
    logits, labels = _batches()
    batches = [{"cls_labels": y, "cls_logits": z} for z, y in zip(logits, labels)]
    scores, got = head_scores(lambda batch: batch["cls_logits"], batches, IGNORE_INDEX)
    kept = [(z, y) for zz, yy in zip(logits, labels) for z, y in zip(zz, yy) if y != IGNORE_INDEX]
    assert got.tolist() == [int(y) for _, y in kept]
    expected = [1 - torch.softmax(z.double(), -1)[SAFE].item() for z, _ in kept]
    assert scores == pytest.approx(expected, abs=1e-6)
    assert head_scores(lambda batch: None, [], IGNORE_INDEX)[0].shape == (0,)


def test_held_out_figures_are_the_shared_ones(tok, embedded_train_head):
    """evaluation.held_out (SCFTTrainer.evaluate's figures and the run summary's): the loss terms of the set taken
    as one batch, head_metrics of the labeled rows' p_unsafe (a two-class head's argmax), refusal_prob_rto
    exp(-transition loss), and None, not NaN, where a figure is undefined. Float32 sums in another order: 1e-5."""
    import math

    from scft_fast import SCFTConfig, apply_scft_fast, safety_dataset
    from scft_fast.data import SCFTDataCollator
    from scft_fast.evaluation.held_out import held_out
    from scft_fast.hf.presets import random_causal_lm
    from scft_fast.metrics import p_unsafe

    rows = safety_dataset(tok, [embedded_train_head(12, balanced=True)], rto_keep=1.0)
    torch.manual_seed(0)
    model = apply_scft_fast(random_causal_lm("llama", tok, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2), SCFTConfig())
    got = held_out(model, rows, SCFTDataCollator(tok), batch_size=5)
    with torch.no_grad():
        batch = SCFTDataCollator(tok)(list(rows))
        out = model.eval()(**batch)
    for key in ("loss", "lm_loss", "transition_loss", "cls_loss"):
        assert got[key] == pytest.approx(float(getattr(out, key)), rel=1e-5), key
    labeled = batch["cls_labels"] != IGNORE_INDEX
    head = head_metrics(p_unsafe(out.cls_logits[labeled]).double().numpy(), batch["cls_labels"][labeled].numpy())
    argmax = out.cls_logits[labeled].argmax(-1) == batch["cls_labels"][labeled]
    assert got["head_accuracy"] == pytest.approx(head["accuracy"]) == pytest.approx(float(argmax.float().mean()))
    assert (got["head_auroc"], got["head_fpr"], got["head_tpr"]) == pytest.approx(
        (head["auroc"], head["fpr"], head["tpr"]), abs=1e-9)
    assert got["head_samples"] == int(labeled.sum())
    assert got["refusal_prob_rto"] == pytest.approx(math.exp(-float(out.transition_loss)), rel=1e-5)
    safe_only = rows.map(lambda r: {"cls_label": SAFE if r["cls_label"] != IGNORE_INDEX else IGNORE_INDEX})
    figures = held_out(model, safe_only, SCFTDataCollator(tok))
    assert figures["head_auroc"] is None and figures["head_tpr"] is None and figures["head_fpr"] is not None
    no_rto = rows.map(lambda r: {"transition_labels": [IGNORE_INDEX] * len(r["labels"])})
    figures = held_out(model, no_rto, SCFTDataCollator(tok))
    assert figures["refusal_prob_rto"] is None and figures["rto_positions"] == 0
