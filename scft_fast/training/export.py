"""Saving the trained model: one implementation for ``SCFTTrainer.save_model`` and ``scft-fast train``.

``full_state_dict`` is collective under ZeRO-3 (every rank gathers the partitions; rank 0 keeps full-shape CPU
copies); ``save_scft_model`` then writes, on one rank, what ``SCFTForCausalLM.from_pretrained`` (and
``AutoModelForCausalLM``) load: ``model.save_merged``'s checkpoint (LoRA deltas merged, ``score.*``, the SCFT
settings under config.json's "scft" key) and the tokenizer.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..model import merged_state_dict, save_merged


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
