"""Fused safety losses: no Hugging Face, DeepSpeed or data-format imports below this line."""
from ..constants import IGNORE_INDEX
from .pooling import last_token_index
from .safety_loss import SafetyLossOutput, safety_loss

__all__ = ["IGNORE_INDEX", "SafetyLossOutput", "last_token_index", "safety_loss"]
