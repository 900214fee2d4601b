"""scft_fast: safety fine-tuning (SCFT + DeRTa) at the cost of plain instruction tuning.

``safety_loss`` computes the LM loss, DeRTa's RTO transition loss and SCFT's classification loss in
one pass over the vocabulary without materializing the logits.
"""
from .ops import IGNORE_INDEX, SafetyLossOutput, last_token_index, safety_loss

__version__ = "0.1.0"
__all__ = ["IGNORE_INDEX", "SafetyLossOutput", "last_token_index", "safety_loss"]
