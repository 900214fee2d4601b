"""Every patch of another library's private API, in one place, each with the version it was written for
(``WRITTEN_FOR``; tests/test_private_patches.py fails when an installed version differs, so that each patch is
re-read against the new code before the pin moves).

- ``master_weights_shared`` (deepspeed): ZeRO-3 without a second float32 copy of float32 weights.
- ``partition_only_init`` (deepspeed): ``zero.Init`` that partitions without rank 0's broadcast, for the ZeRO-3
  build from a checkpoint (hf/zero3.py), where every value is read from the checkpoint next.
- ``deepspeed_loads_weights_only`` (deepspeed): DeepSpeed's checkpoint engine unpickles its files with
  ``weights_only=False``: a file in a run directory could run code on resume. Inside it, they load with
  ``weights_only=True`` and the few DeepSpeed classes its checkpoints hold allowed.
- ``is_trl_fused_lm_head`` / ``fused_lm_head_allowed`` / ``sft_trainer_datasets`` (trl): recognizing the LM head
  trl's SFTTrainer patches over a model's forward, and the datasets of the trainer doing it: an SCFT model refuses
  it (its loss would leave the head and RTO out), any patched model refuses it over data with RTO rows.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

WRITTEN_FOR = {"deepspeed": "0.19.8", "trl": "1.16.0", "transformers": "5.23.0"}


@contextlib.contextmanager
def master_weights_shared():
    """Inside it, a ZeRO-3 optimizer whose model weights are already float32 on its device uses them as its master
    weights instead of a second float32 copy (a no-op without deepspeed).

    ``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions`` is written to do so, but that branch never runs in
    deepspeed 0.19.8: it compares the partition's ``torch.device`` with ``self.device``, the accelerator's device
    name (a str), and a ``torch.device`` never equals a str. Every float32 ZeRO-3 run held one more float32 copy of
    its partition: 1/world_size of the model per rank (297 MiB per rank for the 156M Llama of
    benchmarks/bench_memory.py on 2 ranks). The construction runs with ``self.device`` as a ``torch.device``, so
    DeepSpeed's own branch decides; bf16 / fp16 models, optimizer offload and NVMe keep their copies. The optimizer
    then steps on the shared tensor in place. ``SCFTTrainer.train`` builds its engine inside it;
    tests/test_deepspeed.py checks that the copy is gone and that training, resume and export still equal one
    process."""
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


def partition_only_init(ds_config: dict):
    """``deepspeed.zero.Init`` whose parameters are partitioned without rank 0's broadcast of their initial values:
    that broadcast only makes random values agree across ranks, and receiving it would page in a full-size buffer
    per parameter on every rank but 0. For builds whose every value is read from a checkpoint next."""
    import deepspeed

    class PartitionOnlyInit(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    return PartitionOnlyInit(config_dict_or_path=ds_config)


# What DeepSpeed 0.19.8 pickles into its checkpoints besides tensors and plain containers (ZeRO 1-3, offload).
DEEPSPEED_CHECKPOINT_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                                "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                                "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                                "deepspeed.utils.tensor_fragment.fragment_address")


@contextlib.contextmanager
def deepspeed_loads_weights_only():
    """Inside it, DeepSpeed's torch checkpoint engine loads with ``torch.load(weights_only=True)``, the classes of
    ``DEEPSPEED_CHECKPOINT_GLOBALS`` allowed: a pickle that would run code is refused (``pickle.UnpicklingError``)
    instead of run. A no-op without deepspeed."""
    import importlib

    try:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    except ImportError:
        yield
        return
    allowed = []
    for name in DEEPSPEED_CHECKPOINT_GLOBALS:
        module, _, attribute = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attribute))
    original = TorchCheckpointEngine.load

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original


def is_trl_fused_lm_head(forward) -> bool:
    """Whether ``forward`` is the one trl's ``add_fused_lm_head`` puts on a model (trl 1.16,
    trl/trainer/utils.py): SFTTrainer's own loss, which never calls the model's forward."""
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)  # functools.wraps hides its names
    return (code is not None and code.co_name == "_fused_forward"
            and code.co_filename.replace(os.sep, "/").endswith("trl/trainer/utils.py"))


@contextlib.contextmanager
def fused_lm_head_allowed(model: nn.Module):
    """Inside it, trl may patch its fused LM head onto ``model`` (SCFTSFTTrainer, whose loss is the model's own
    forward, lets SFTTrainer's constructor do so)."""
    model.__dict__["_fused_lm_head_allowed"] = True
    try:
        yield
    finally:
        model.__dict__.pop("_fused_lm_head_allowed", None)


def sft_trainer_datasets() -> dict:
    """The datasets of the ``trl.SFTTrainer`` whose constructor is running on this thread's stack: trl 1.16 patches
    its LM head (add_fused_lm_head) from ``SFTTrainer.__init__`` once its locals ``train_dataset`` and
    ``eval_dataset`` are prepared (their extra columns kept). Empty outside such a constructor."""
    import inspect

    try:
        from trl import SFTTrainer
    except ImportError:
        return {}
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"), SFTTrainer):
            return {name: frame.f_locals.get(name) for name in ("train_dataset", "eval_dataset")}
        frame = frame.f_back
    return {}
