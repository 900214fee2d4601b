"""Saving the trained model: one implementation for ``SCFTTrainer.save_model`` and ``scft-fast train``.

``full_state_dict`` is collective under ZeRO-3 (every rank gathers the partitions; rank 0 keeps full-shape CPU
copies); ``save_scft_model`` then writes, on one rank, what ``SCFTForCausalLM.from_pretrained`` (and
``AutoModelForCausalLM``) load: ``model.save_merged``'s checkpoint (LoRA deltas merged, ``score.*``, the SCFT
settings under config.json's "scft" key) and the tokenizer.

``save_zero3_merged`` writes the same files from a ZeRO-3 model without a full gather (``scft-fast train``'s
export): one unit at a time (a decoder layer, i.e. a class in the model's ``_no_split_modules``; else the
embedding, the final norm, the LM head, the SCFT head, each on its own) is gathered with
``GatheredParameters(modifier_rank=None)``: read-only, so nothing is broadcast back when it ends. Rank 0 alone
copies the unit's merged tensors (LoRA folded in, as ``merged_state_dict`` does for a whole model) to CPU,
appends them to the current shard and writes the shard once it reaches ``max_shard_bytes``. No rank holds more
than one unit's full weights on the device side, and rank 0 no more than one shard plus one unit on the host.
The files are what ``save_pretrained`` writes: ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` +
``model.safetensors.index.json``), ``config.json`` with the SCFT settings, ``generation_config.json``.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.distributed as dist
from torch import nn

from ..model import merged_state_dict, save_merged, unwrap

MAX_SHARD_BYTES = 2 ** 30  # rank 0's host-side ceiling during the export (plus the unit being written)


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies that keep tied tensors tied (one copy per storage), so that the HF save drops the tied key."""
    copies, out = {}, {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``merged_state_dict(model)`` as full-shape CPU tensors on rank 0, an empty dict on
    the other ranks. Every rank must call it: ZeRO-3 partitions (parameters with a ``ds_id``) are gathered."""
    params = list(model.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        state = cpu_copy(merged_state_dict(model))
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return state if rank == 0 else {}


def save_scft_model(model: torch.nn.Module, path: str, state_dict: dict[str, torch.Tensor],
                    tokenizer=None) -> None:
    """Writes ``state_dict`` (from ``full_state_dict``) as what ``SCFTForCausalLM.from_pretrained`` loads."""
    save_merged(model, path, state_dict=state_dict)
    if tokenizer is not None:
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


def save_zero3_merged(model: nn.Module, path: str, rank: int, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Every rank calls this (the gathers are collective); rank 0 writes ``path``."""
    import deepspeed
    from safetensors.torch import save_file

    base = unwrap(model)
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
