"""EvalConfig: what one evaluation measures and how (sizes, thresholds, the refusal string)."""
from __future__ import annotations

from dataclasses import dataclass

from ..data import REFUSAL_STRING
from ..metrics import THRESHOLD


@dataclass
class EvalConfig:
    threshold: float = THRESHOLD  # blocked when p_unsafe > threshold
    max_fpr: float = 0.05  # false-positive budget of the calibrated threshold
    max_new_tokens: int = 64  # response length for the harmful and benign prompts
    attack_words: tuple[int, ...] = (0, 4, 8, 16)  # k: harmful-response words forced as the response's start
    attack_window: int = 16  # m: tokens generated after the forced prefix
    batch_size: int = 16
    limit: int | None = None  # at most this many items of each kind (pairs, harmful, benign, attacks)
    refusal_string: str = REFUSAL_STRING
    max_length: int = 1024  # tokens of a labeled pair (longer prompts are truncated as in training)
    progress: bool = True

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 < self.max_fpr < 1.0:
            raise ValueError(f"max_fpr must be in (0, 1), got {self.max_fpr}")
        if any(k < 0 for k in self.attack_words):
            raise ValueError(f"attack_words must be non-negative word counts, got {self.attack_words}")
        for name in ("max_new_tokens", "attack_window", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1 (or None: everything), got {self.limit}")
