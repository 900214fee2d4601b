"""scft_fast: safety fine-tuning (SCFT + DeRTa) at the cost of plain instruction tuning.

``safety_loss`` computes the LM loss, DeRTa's RTO transition loss and SCFT's classification loss in
one pass over the vocabulary without materializing the logits.
"""
from .constants import IGNORE_INDEX
from .ops import SafetyLossOutput, last_token_index, safety_loss

__version__ = "0.1.0"
__all__ = ["IGNORE_INDEX", "SafetyLossOutput", "last_token_index", "safety_loss", "SCFTConfig", "SCFTForCausalLM",
           "apply_scft_fast", "generate_safe", "SafeGeneration", "SCFTTrainer", "SCFTTrainerMixin", "SCFTDataCollator",
           "safety_dataset", "SCFTSFTTrainer", "save_merged", "export_sequence_classifier"]

# Imported on first use: `import scft_fast` stays free of transformers and DeepSpeed.
_LAZY = {
    "SCFTConfig": "scft_fast.hf.config",
    "SCFTForCausalLM": "scft_fast.hf.patch",
    "apply_scft_fast": "scft_fast.hf.patch",
    "generate_safe": "scft_fast.generation",
    "SafeGeneration": "scft_fast.generation",
    "SCFTTrainer": "scft_fast.hf.trainer",
    "SCFTTrainerMixin": "scft_fast.hf.trainer",
    "SCFTDataCollator": "scft_fast.data",
    "safety_dataset": "scft_fast.data",
    "SCFTSFTTrainer": "scft_fast.hf.trl",  # needs the trl extra
    "save_merged": "scft_fast.hf.export",
    "export_sequence_classifier": "scft_fast.hf.export",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scft_fast' has no attribute {name!r}")
