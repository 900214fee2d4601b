"""The SCFT settings of a model (``SCFTConfig``, recorded under config.json's "scft" key) and what its forward
returns with a loss (``SCFTOutput``)."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..constants import IGNORE_INDEX, POOLS
from ..ops.cls_head import MAX_CLASSES, MIN_CLASSES

HEAD_NAME = "score"  # the SCFT head's module name


HEAD_PREFIX = HEAD_NAME + "."


SCFT_CONFIG_KEY = "scft"  # the SCFT settings live under this key of the causal LM's config.json


@dataclass
class SCFTConfig:
    num_labels: int = 2  # classes of the safety head (0 = safe, 1 = unsafe)
    # The RTO transition target ("Sorry"), recorded in config.json: the data makes the transition labels, the
    # model's loss never reads it; SCFTSFTTrainer refuses a data config whose refusal string gives another token.
    refusal_token_id: int | None = None
    pool: str = "eos"  # "eos": the last token | "pre_eos": the one before (free inference-time check)
    lm_coef: float = 1.0
    transition_coef: float = 1.0
    cls_coef: float = 1.0
    backend: str = "auto"  # safety_loss backend, one of scft_fast.ops.backends.BACKENDS
    chunk_size: int | None = None  # safety_loss rows per chunk; None: chosen from the shapes
    ignore_index: int = IGNORE_INDEX
    # False by default: Hugging Face's sequence-classification heads have no bias, so a bias-free head exports
    # to AutoModelForSequenceClassification exactly (export_sequence_classifier).
    head_bias: bool = False
    threshold: float | None = None  # calibrated p_unsafe threshold for gating; None: the caller's default

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if not MIN_CLASSES <= self.num_labels <= MAX_CLASSES:
            raise ValueError(f"num_labels must be in [{MIN_CLASSES}, {MAX_CLASSES}] (the fused head's range), got "
                             f"{self.num_labels}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")

    @classmethod
    def from_dict(cls, d: dict) -> "SCFTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SCFT config keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)


# The loss settings of a model patched without an SCFTConfig (a plain fused LM loss).
PLAIN_LM = SCFTConfig()


@dataclass
class SCFTOutput(CausalLMOutputWithPast):
    """The causal LM's output with the fused loss's terms. ``loss`` is float32 and differentiable; the rest is
    detached, for logging. ``logits`` is None whenever a loss was computed."""

    lm_loss: torch.Tensor | None = None  # () mean over LM targets
    transition_loss: torch.Tensor | None = None  # () mean over RTO targets
    cls_loss: torch.Tensor | None = None  # () mean over labeled sequences
    cls_logits: torch.Tensor | None = None  # (S, C) float32, one row per pooled sequence
    n_lm: torch.Tensor | None = None
    n_tr: torch.Tensor | None = None
    n_cls: torch.Tensor | None = None
    # safety_loss's optional outputs (SafetyLossOutput), None unless asked for
    z_loss: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
