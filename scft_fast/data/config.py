"""DataConfig: how JSONL records become training samples."""
from __future__ import annotations

from dataclasses import dataclass

from ..constants import IGNORE_INDEX, POOLS
from .constants import CLS_LABELS, MAX_LENGTH, MIN_LENGTH, REFUSAL_STRING, TRUNCATIONS


@dataclass
class DataConfig:
    """The data recipe: ``safety_dataset()``, ``SCFTSFTTrainer`` and ``scft-fast train`` read these defaults, so
    they build the same samples from the same file. The recipe (measured on the separate-generator split, README):
    DeRTa's sparse RTO (a fifth of a harmful response's positions) and vanilla refusals, which give the head
    (harmful request, refusal) pairs labeled safe."""

    refusal_string: str = REFUSAL_STRING  # its first token is the RTO transition target
    rto_keep: float = 0.2  # fraction of RTO positions kept per sample (DeRTa's full-parameter recipe: 0.05)
    pool: str = "eos"  # pooled row for the classifier: "eos" | "pre_eos" (last target token before EOS)
    max_length: int = MAX_LENGTH
    truncation: str = "prompt"  # "prompt": cut the prompt's start first, then the target's end | "drop"
    prefix_label: str | None = None  # classification label of harmful-prefix samples: None | "safe" | "unsafe"
    vanilla_safety: bool = True  # also emit instruction + safe response from every harmful triple
    skip_invalid: bool = False  # skip and count invalid records instead of raising DataError
    seed: int = 0
    num_proc: int = 1
    ignore_index: int = IGNORE_INDEX
    cache_dir: str | None = None  # datasets cache; None: the datasets library's default

    def __post_init__(self):
        if not 0.0 < self.rto_keep <= 1.0:
            raise ValueError(f"rto_keep must be in (0, 1], got {self.rto_keep}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be 'prompt' or 'drop', got {self.truncation!r}")
        if self.prefix_label is not None and self.prefix_label not in CLS_LABELS:
            raise ValueError(f"prefix_label must be None, 'safe' or 'unsafe', got {self.prefix_label!r}")
        if self.max_length < MIN_LENGTH:
            raise ValueError(f"max_length must be at least {MIN_LENGTH} tokens, got {self.max_length}")
        if self.num_proc < 1:
            raise ValueError(f"num_proc must be at least 1, got {self.num_proc}")
