"""Training: config dataclasses, engines (one process / DeepSpeed ZeRO), checkpoints, metrics and the loop."""
from .config import DataSpec, LossSpec, ModelSpec, OptimSpec, TrainConfig
from .loop import train

__all__ = ["DataSpec", "LossSpec", "ModelSpec", "OptimSpec", "TrainConfig", "train"]
