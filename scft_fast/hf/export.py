"""Saving the trained model: one implementation for ``SCFTTrainer.save_model`` and ``scft-fast train``.

``export_model`` writes, on rank 0, what ``SCFTForCausalLM.from_pretrained`` (and ``AutoModelForCausalLM``) load:
``model.save_merged``'s checkpoint (LoRA deltas merged, ``score.*``, the SCFT settings under config.json's "scft"
key) and the tokenizer.

Under ZeRO-3, ``save_zero3_merged`` writes the same files without a full gather: one unit at a time (a decoder layer, i.e. a class in the model's ``_no_split_modules``; else the
embedding, the final norm, the LM head, the SCFT head, each on its own) is gathered with
``GatheredParameters(modifier_rank=None)``: read-only, so nothing is broadcast back when it ends. Rank 0 alone
copies the unit's merged tensors (LoRA folded in, as ``merged_state_dict`` does for a whole model) to CPU,
appends them to the current shard and writes the shard once it reaches ``max_shard_bytes``: by default the
smaller of 1 GiB and the model's size over the number of ranks, so that rank 0's copies never add up to the whole
model. No rank holds more than one unit's full weights on the device side, and rank 0 no more than one shard (at
most its share of the model) plus one unit on the host.
The files are what ``save_pretrained`` writes: ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` +
``model.safetensors.index.json``), ``config.json`` with the SCFT settings, ``generation_config.json``.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch import nn

from ..model import merged_state_dict, save_merged, unwrap

MAX_SHARD_BYTES = 2 ** 30  # the largest shard a ZeRO-3 export writes (smaller on a model of < world_size GiB)


def export_model(model: torch.nn.Module, path: str, tokenizer=None) -> None:
    """What ``SCFTForCausalLM.from_pretrained`` (and ``AutoModelForCausalLM``) load, written by rank 0, with the
    tokenizer. Every rank calls it: ZeRO-3 partitions (parameters with a ``ds_id``) are gathered one unit at a
    time (``save_zero3_merged``); otherwise every rank holds the weights and rank 0 writes ``save_merged``."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        save_zero3_merged(model, path, rank)
    elif rank == 0:
        save_merged(model, path)
    if rank == 0 and tokenizer is not None:
        tokenizer.save_pretrained(path)


def export_units(base: nn.Module) -> list[str]:
    """Module names of ``base`` (the causal LM) whose weights are gathered together, in state-dict order, covering
    every parameter and persistent buffer exactly once."""
    try:  # a LoRA layer (base weight + A + B) and PEFT's copy of the head merge within themselves
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper

        merged_in_place = (LoraLayer, ModulesToSaveWrapper)
    except ImportError:
        merged_in_place = ()
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    units: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(unit + ".") for unit in units if unit):
            continue
        whole = type(module).__name__ in layer_classes or isinstance(module, merged_in_place)
        owns = next(module.parameters(recurse=False), None) is not None or any(
            n not in module._non_persistent_buffers_set for n, _ in module.named_buffers(recurse=False))
        if whole or owns:
            units.append(name)
    return units


def _tied_keys(base: nn.Module) -> set[str]:
    """Keys that save_pretrained drops because their parameter is another key's (tied embeddings)."""
    tied = getattr(base, "all_tied_weights_keys", None) or {}
    return {target for target, source in tied.items()
            if base.get_parameter(target) is base.get_parameter(source)}


def zero3_shard_bytes(model: nn.Module, world_size: int) -> int:
    """The default shard size of a ZeRO-3 export: min(1 GiB, the model's bytes / world_size), at least 1 byte."""
    size = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    return max(1, min(MAX_SHARD_BYTES, -(-size // max(1, world_size))))


def save_zero3_merged(model: nn.Module, path: str, rank: int, max_shard_bytes: int | None = None) -> None:
    """Every rank calls this (the gathers are collective); rank 0 writes ``path``. ``max_shard_bytes``: default
    ``zero3_shard_bytes``."""
    import deepspeed
    from safetensors.torch import save_file

    base = unwrap(model)
    if max_shard_bytes is None:
        max_shard_bytes = zero3_shard_bytes(base, dist.get_world_size() if dist.is_initialized() else 1)
    skip = _tied_keys(base)
    shard: dict[str, torch.Tensor] = {}
    files: list[tuple[str, list[str]]] = []
    total = 0
    if rank == 0:
        os.makedirs(path, exist_ok=True)

    def flush() -> None:
        name = f"model-part-{len(files):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        files.append((name, list(shard)))
        shard.clear()

    for unit in export_units(base):
        params = list(base.get_submodule(unit).parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                for key, tensor in merged_state_dict(model, unit).items():
                    if key in skip:
                        continue
                    shard[key] = tensor.detach().to("cpu", copy=True).contiguous()
                    total += shard[key].numel() * shard[key].element_size()
        if rank == 0 and sum(t.numel() * t.element_size() for t in shard.values()) >= max_shard_bytes:
            flush()
    if rank == 0:
        if shard or not files:
            flush()
        _finish(base, path, files, total)
    dist.barrier()


def _finish(base, path: str, files: list[tuple[str, list[str]]], total: int) -> None:
    """Gives the shards save_pretrained's names (and its index when there are several), writes the configs."""
    if len(files) == 1:
        os.replace(os.path.join(path, files[0][0]), os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for i, (name, keys) in enumerate(files):
            final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(os.path.join(path, name), os.path.join(path, final))
            weight_map.update(dict.fromkeys(keys, final))
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = base.config
    config.architectures = [type(base).__name__]
    config.dtype = next(base.parameters()).dtype
    config.save_pretrained(path)
    if base.can_generate() and getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(path)
