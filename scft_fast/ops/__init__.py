"""Fused safety losses: no Hugging Face, DeepSpeed or data-format imports below this line."""
from .pooling import last_token_index
from .safety_loss import IGNORE_INDEX, SafetyLossOutput, safety_loss

__all__ = ["IGNORE_INDEX", "SafetyLossOutput", "last_token_index", "safety_loss"]
