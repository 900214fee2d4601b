"""Checks that a Trainer's ranks train what was asked, for the set-ups accelerate 1.15 changes without an error:

- ranks launched (torchrun, deepspeed, accelerate launch: ``WORLD_SIZE`` > 1) that ``TrainingArguments`` sees as
  one process. On a machine without an accelerator, accelerate starts no process group of its own unless
  ``use_cpu=True`` (``PartialState._prepare_backend`` finds no backend), so every rank trains the whole data set
  alone and all of them write the same ``output_dir``. Refused.
- ``TrainingArguments(fsdp=...)`` on CPU ranks: ``AcceleratorState`` attaches the FSDP plugin only for GPU-like
  distributed types, so on MULTI_CPU Trainer wraps the model in DistributedDataParallel. The results equal FSDP's;
  the memory (every rank holding the whole model and optimizer state) does not. Warned.
"""
from __future__ import annotations

import logging
import os

from ..errors import ConfigError

logger = logging.getLogger(__name__)


def check_distributed(args, accelerator) -> None:
    """``args``: the Trainer's ``TrainingArguments``; ``accelerator``: the ``Accelerator`` Trainer built from them."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size == 1:
        raise ConfigError(
            f"launched as {launched} ranks (WORLD_SIZE={launched}) but TrainingArguments set up 1 process on "
            f"device {args.device}: every rank would train the whole data set alone. Pass "
            f"TrainingArguments(use_cpu=True): without an accelerator, accelerate starts the ranks (gloo) only then")
    fsdp_config = args.fsdp_config or {}
    if args.fsdp and not fsdp_config.get("xla") and getattr(accelerator.state, "fsdp_plugin", None) is None:
        logger.warning(
            "TrainingArguments(fsdp=...) is not applied: accelerate sets up FSDP only on GPU-like devices, and on "
            "these %s ranks Trainer trains DistributedDataParallel (the same results; every rank holds the whole "
            "model and optimizer state). To shard on CPU: torch.distributed.fsdp.fully_shard on the model, or "
            "DeepSpeed ZeRO-3 (TrainingArguments(deepspeed=...))", accelerator.distributed_type.value)
