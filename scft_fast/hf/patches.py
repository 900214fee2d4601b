"""ZeRO-3 without a second copy of float32 weights.

DeepSpeed's ZeRO-3 optimizer keeps float32 master weights beside the model's own partitions. When the model's
weights already are float32 on the optimizer's device (float32 training, or bf16 through autocast over float32
weights), ``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions`` is written to use the model's partition as its
master copy instead of cloning it. That branch never runs in deepspeed 0.19.8: it compares the partition's
``torch.device`` with ``self.device``, the accelerator's device *name* (a str such as "cpu" or "cuda:0"), and a
``torch.device`` never equals a str. Every float32 ZeRO-3 run therefore holds one more float32 copy of its
partition: 1/world_size of the model per rank (297 MiB per rank for the 156M Llama of benchmarks/bench_memory.py
on 2 ranks).

``master_weights_shared`` runs the optimizer's construction with ``self.device`` as a ``torch.device`` for the
duration of that one method, so DeepSpeed's own branch decides, and then puts the str back. Nothing else changes:
a bf16 or fp16 model (a different dtype), optimizer offload (its own branch) and NVMe keep their copies; the
optimizer steps on the shared tensor in place and DeepSpeed's copy back into the model's partition becomes a copy
onto itself. ``scft-fast train`` and ``SCFTTrainer.train`` build their engines inside it. The override touches a
private method of the pinned deepspeed (constraints.txt); tests/test_deepspeed.py checks both that the copy is gone
and that ZeRO-3 training, resume and export still equal one process.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def master_weights_shared():
    """Inside it, a ZeRO-3 optimizer whose model weights are already its master dtype on its device uses them as
    its master weights (see the module docstring). A no-op without deepspeed."""
    try:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3
    except ImportError:
        yield
        return
    original = Stage3._create_fp32_partitions

    def create_fp32_partitions(self):
        name = self.device
        if isinstance(name, str):
            self.device = torch.device(name)
        try:
            original(self)
        finally:
            self.device = name

    Stage3._create_fp32_partitions = create_fp32_partitions
    try:
        yield
    finally:
        Stage3._create_fp32_partitions = original

