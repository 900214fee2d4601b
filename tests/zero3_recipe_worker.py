"""Runs training/zero3_trainer.py (its text unchanged, as torchrun runs it) and records, right after each
``from_pretrained`` returns, how its parameters are held: the ZeRO-3 partitioning zero.Init did while reading the
checkpoint, before DeepSpeed's engine exists. Arguments: OUT_FILE_PREFIX, then the script's own arguments."""
import json
import os
import runpy
import sys

import torch
from transformers import AutoModelForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "training", "zero3_trainer.py")


def record_partitions(prefix: str) -> None:
    load = AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        model = load(cls, *args, **kwargs)
        held = {name: {"ds_id": getattr(p, "ds_id", None), "ds_numel": getattr(p, "ds_numel", None),
                       "numel": p.numel(), "ds_tensor_numel": p.ds_tensor.numel() if hasattr(p, "ds_tensor") else None,
                       "persist": getattr(p, "ds_persist", None)}
                for name, p in model.named_parameters()}
        with open(f"{prefix}_rank{torch.distributed.get_rank()}.json", "w") as f:
            json.dump(held, f)
        return model

    AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)


if __name__ == "__main__":
    torch.set_num_threads(1)
    record_partitions(sys.argv[1])
    sys.argv = [SCRIPT, *sys.argv[2:]]
    runpy.run_path(SCRIPT, run_name="__main__")
