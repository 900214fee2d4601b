"""What a checkpoint directory holds of the SCFT head (``has_head``), read without building a model."""
from __future__ import annotations

import json
import os

import torch

from .config import HEAD_PREFIX


def has_head(path: str) -> bool:
    """Whether the checkpoint directory's weights hold ``score.weight`` (a config key alone makes no head)."""
    return _read_head(path) is not None


def _read_head(path: str, prefix: str = HEAD_PREFIX) -> dict[str, torch.Tensor] | None:
    """The head's tensors (names under ``prefix``, which is dropped) of a checkpoint directory: single file or
    sharded safetensors, a .bin, or PEFT's adapter_model.safetensors."""
    from safetensors import safe_open

    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({v for k, v in weight_map.items() if k.startswith(prefix)})
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    elif os.path.exists(os.path.join(path, "adapter_model.safetensors")):
        files = ["adapter_model.safetensors"]
    elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
        state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        head = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return head or None
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors, model.safetensors.index.json, "
                                f"adapter_model.safetensors or pytorch_model.bin")
    head = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    head[key[len(prefix):]] = f.get_tensor(key)
    return head or None
