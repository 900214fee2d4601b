"""Training: config dataclasses, engines (one process / DeepSpeed ZeRO), checkpoints, metrics and the loop."""
from .config import DataSpec, LossSpec, ModelSpec, OptimSpec, TrainConfig
from .loop import LossHook, train

__all__ = ["DataSpec", "LossHook", "LossSpec", "ModelSpec", "OptimSpec", "TrainConfig", "train"]
