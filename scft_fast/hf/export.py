"""Saving the trained model, for ``SCFTTrainer.save_model``, ``scft-fast train`` and users: ``save_merged`` (one full
checkpoint, LoRA merged, the head beside the causal LM's weights), ``export_sequence_classifier`` (the head as an
``AutoModelForSequenceClassification``), ``export_model`` (either written by rank 0; under ZeRO-3 gathered one unit at
a time).

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

from .config import HEAD_PREFIX, SCFT_CONFIG_KEY
from .peft import unwrap

MAX_SHARD_BYTES = 2 ** 30  # the largest shard a ZeRO-3 export writes (smaller on a model of < world_size GiB)


def merged_state_dict(model: nn.Module, submodule: str = "") -> dict[str, torch.Tensor]:
    """The causal LM's state dict under its own key names, LoRA deltas merged in and PEFT's copy of the head
    unwrapped, without touching the model. ``submodule`` (a module name of the causal LM, e.g. "model.layers.3"):
    only that module's entries, under their full names (a ZeRO-3 export gathers one module at a time)."""
    base = unwrap(model)
    root = base.get_submodule(submodule)
    state = root.state_dict(prefix=f"{submodule}." if submodule else "")
    if base is model:
        return state
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    state = {k: v for k, v in state.items() if ".lora_" not in k}
    for name, module in root.named_modules(prefix=submodule):
        if isinstance(module, LoraLayer):
            merged = state.pop(f"{name}.base_layer.weight").clone()
            for adapter in module.active_adapters:
                merged += module.get_delta_weight(adapter).to(merged.dtype)
            state[f"{name}.weight"] = merged
        elif isinstance(module, ModulesToSaveWrapper):
            trained = f"{name}.modules_to_save.{module.active_adapters[0]}."
            for key in [k for k in state if k.startswith(f"{name}.")]:
                tensor = state.pop(key)
                if key.startswith(trained):
                    state[f"{name}." + key[len(trained):]] = tensor
    return {k.replace(".base_layer.", "."): v for k, v in state.items()}


def save_merged(model: nn.Module, path: str, state_dict: dict[str, torch.Tensor] | None = None,
                **save_kwargs) -> None:
    """A full checkpoint that ``SCFTForCausalLM.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained``
    load: the causal LM with LoRA merged, ``score.*`` beside its weights, the SCFT settings under config.json's
    "scft" key. ``state_dict`` (e.g. gathered from ZeRO-3 shards) overrides the model's own tensors and holds the
    keys of ``merged_state_dict(model)``. Without PEFT this is ``model.save_pretrained``."""
    base = unwrap(model)
    state = state_dict if state_dict is not None else (None if base is model else merged_state_dict(model))
    if state is not None and getattr(base, "scft_config", None) is not None and HEAD_PREFIX + "weight" not in state:
        raise ValueError(f"state_dict must hold the head ({HEAD_PREFIX}weight); got keys like {list(state)[:3]}")
    base.save_pretrained(path, state_dict=state, **save_kwargs)


def export_sequence_classifier(model: nn.Module, path: str, tokenizer=None, pad_token_id: int | None = None,
                               **save_kwargs) -> None:
    """Writes the SCFT head as a checkpoint that ``AutoModelForSequenceClassification.from_pretrained`` loads and
    that gives the head's class probabilities.

    transformers' sequence-classification models apply a bias-free ``score`` to the rightmost token that is not
    ``pad_token_id``. The head's token is the EOS (pool="eos"), so the export needs a pad token other than EOS
    (``pad_token_id``, else the tokenizer's, else the model's): inputs must end with EOS and be padded with that
    pad token.
    For pool="pre_eos" the export pads with EOS itself, so that the rightmost non-pad token is the one before the
    EOS. A head trained with a bias cannot be written into that bias-free layer: train with
    ``SCFTConfig(head_bias=False)`` (the default) or the export is refused."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    base = unwrap(model)
    scft = getattr(base, "scft_config", None)
    if scft is None:
        raise ValueError("the model has no SCFT head to export (apply_scft_fast(model, SCFTConfig()) adds one)")
    state = merged_state_dict(model)
    bias = state.pop(HEAD_PREFIX + "bias", None)
    if bias is not None and bool(bias.detach().float().abs().max() > 0):
        raise ValueError("the SCFT head has a non-zero bias, which AutoModelForSequenceClassification's bias-free "
                         "score layer cannot hold; train with SCFTConfig(head_bias=False) to export the head")
    text_config = base.config.get_text_config()
    eos = text_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if scft.pool == "pre_eos":
        pad = eos
    else:
        candidates = [pad_token_id, getattr(tokenizer, "pad_token_id", None), text_config.pad_token_id]
        pad = next((c for c in candidates if c is not None and c != eos), None)
        if pad is None:
            raise ValueError("pool='eos' reads the EOS token, which AutoModelForSequenceClassification skips when "
                             "it is also the pad token: pass pad_token_id= (a token other than EOS) or a tokenizer "
                             "whose pad token is not EOS")
    config = base.config.__class__.from_dict(base.config.to_dict())
    config.num_labels = scft.num_labels
    config.id2label = {i: name for i, name in enumerate(["safe", "unsafe"][:scft.num_labels])} \
        if scft.num_labels == 2 else {i: f"LABEL_{i}" for i in range(scft.num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    config.pad_token_id = pad
    if hasattr(config, SCFT_CONFIG_KEY):
        delattr(config, SCFT_CONFIG_KEY)
    classifier_class = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    classifier = classifier_class(config)
    prefix = classifier.base_model_prefix
    # The causal LM's decoder keys (model.*) are the classifier's; the LM head is not part of it.
    lm_head_keys = {n for n, _ in base.named_parameters() if n.startswith("lm_head.")}
    weights = {k: v for k, v in state.items() if k.startswith(prefix + ".") or k == HEAD_PREFIX + "weight"}
    expected = set(classifier.state_dict())
    if set(weights) != expected:
        raise ValueError(f"cannot map {type(base).__name__}'s weights onto {classifier_class.__name__}: missing "
                         f"{sorted(expected - set(weights))[:5]}, extra "
                         f"{sorted(set(weights) - expected - lm_head_keys)[:5]}")
    classifier.load_state_dict(weights)
    classifier.save_pretrained(path, **save_kwargs)
    if tokenizer is not None:
        tokenizer = _copy_with_pad(tokenizer, pad)
        tokenizer.save_pretrained(path)


def _copy_with_pad(tokenizer, pad: int):
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    return tokenizer


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
