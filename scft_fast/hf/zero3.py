"""A ZeRO-3 build of a checkpoint directory in which no rank ever holds the whole model, not even while loading.

transformers' ZeRO-3 route (``from_pretrained`` with an ``HfDeepSpeedConfig`` alive) reads the checkpoint's whole
state dict into rank 0's memory and gathers each module whole on every rank to copy it in. ``load_partitioned``
instead:

1. builds the model from its config inside transformers' own construction contexts (``get_init_context``: the
   dtype, no weight initialization, ``deepspeed.zero.Init``), with zero.Init's construction broadcast left out
   (``private_patches.partition_only_init``): that broadcast only makes random initial values agree across ranks, every value is
   read from the checkpoint next, and receiving it would page in a full-size buffer per parameter on every rank
   but 0;
2. copies into each parameter's partition (``param.ds_tensor``: flat elements [r * n, (r + 1) * n) of the
   parameter on rank r, zero padding past the end) exactly that range of the checkpoint tensor, read from its
   safetensors file a block of rows at a time. The file is opened per block, so that its memory map (which
   counts in the process's RSS while it is open) never covers more than one block;
3. maps checkpoint keys onto the model's names with transformers' renamings for the architecture
   (``get_model_conversion_mapping``, the base-model prefix added or stripped as transformers does); a tied
   parameter is read once, under whichever of its names the checkpoint has; a persistent buffer is read whole
   (ZeRO-3 does not partition buffers);
4. initializes a new SCFT head with ``init_head`` (rank 0 draws, as one process does after transformers' load), so
   the same seed gives the same head as ``SCFTForCausalLM.from_pretrained`` on one process.

A checkpoint that needs more than renamings (transformers' ``WeightConverter`` fusions, e.g. per-expert MoE
weights into one tensor), one without safetensors weights, or a config that keeps parameters on NVMe or in
hpZeRO secondary partitions goes through transformers' loader instead (``partitioned_load_refusal`` says why).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch import nn

from .callbacks import say
from .config import HEAD_PREFIX, SCFT_CONFIG_KEY, SCFTConfig
from .patch import SCFTForCausalLM, scft_class
from .private_patches import partition_only_init

BLOCK_BYTES = 8 * 2 ** 20  # the largest piece of a checkpoint tensor in memory at once (plus one row)
INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"


def checkpoint_files(path: str) -> list[str] | None:
    """The safetensors files of a checkpoint directory (the index's, or model.safetensors); None if it has none."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(path, name) for name in json.load(f)["weight_map"].values()})
    single = os.path.join(path, SINGLE_FILE)
    return [single] if os.path.exists(single) else None


def partitioned_load_refusal(path: str, ds_config: dict) -> str | None:
    """Why ``load_partitioned`` cannot build this checkpoint under this DeepSpeed config, or None if it can."""
    if checkpoint_files(path) is None:
        return f"{path} has no {SINGLE_FILE} or {INDEX_FILE}"
    zero = ds_config.get("zero_optimization", {})
    if (zero.get("offload_param") or {}).get("device") == "nvme":
        return "parameters offloaded to NVMe"
    if zero.get("zero_hpz_partition_size", 1) > 1:
        return "hpZeRO secondary partitions (zero_hpz_partition_size > 1)"
    return None


class CheckpointTensors:
    """Where each tensor of a safetensors checkpoint lives (file, shape), read a range at a time."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open

        self.file: dict[str, str] = {}
        self.shape: dict[str, list[int]] = {}
        self.itemsize: dict[str, int] = {}
        for name in files:
            with safe_open(name, framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    self.file[key], self.shape[key] = name, tensor.get_shape()
                    self.itemsize[key] = tensor[0:0].element_size() if self.shape[key] else 0  # no data read

    def read_whole(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.file[key], framework="pt") as f:
            return f.get_tensor(key)

    def read_flat(self, key: str, start: int, out: torch.Tensor) -> None:
        """Copies flat elements [start, start + out.numel()) of the row-major tensor ``key`` into ``out`` (1-D)."""
        from safetensors import safe_open

        shape = self.shape[key]
        if len(shape) == 0:
            out.copy_(self.read_whole(key).reshape(-1)[start:start + out.numel()])
            return
        stop = start + out.numel()
        row_numel = math.prod(shape[1:])
        rows_per_block = max(1, BLOCK_BYTES // (row_numel * self.itemsize[key]))
        row, last_row = start // row_numel, -(-stop // row_numel)
        while row < last_row:
            end_row = min(row + rows_per_block, last_row)
            with safe_open(self.file[key], framework="pt") as f:
                block = f.get_slice(key)[row:end_row].reshape(-1)
            lo, hi = max(start, row * row_numel), min(stop, end_row * row_numel)
            out[lo - start:hi - start].copy_(block[lo - row * row_numel:hi - row * row_numel])
            del block  # before the next block is read: one in memory at a time
            row = end_row


class _NeedsConversion(Exception):
    """A checkpoint key that transformers converts (fuses, splits) rather than renames."""


def _key_map(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> model state-dict name, by transformers' renamings for this architecture; raises
    _NeedsConversion when a key needs one of its WeightConverters."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = dict.fromkeys(model.state_dict(keep_vars=True), True)
    mapping = {}
    for key in keys:
        name, converter = rename_source_key(key, renamings, converters, base_model_prefix=model.base_model_prefix,
                                            meta_state_dict=names)
        if converter is not None:
            raise _NeedsConversion(f"{key} (pattern {converter!r})")
        mapping[key] = name
    return mapping


def _construct(target: type, config, files: list[str]):
    """The model, partitioned, with no value set: transformers' from_pretrained construction under our zero.Init."""
    import deepspeed
    from transformers.integrations import deepspeed_config
    from transformers.modeling_utils import ContextManagers, _get_dtype
    from transformers.monkey_patching import patch_output_recorders

    config, dtype = _get_dtype("auto", files, config, None, None, True)
    contexts = [partition_only_init(deepspeed_config()) if isinstance(c, deepspeed.zero.Init) else c
                for c in target.get_init_context(dtype, False, False, None)]
    with ContextManagers(contexts):
        model = target(config)
        patch_output_recorders(model)
    model.tie_weights()
    return model


def load_partitioned(path: str, scft: SCFTConfig, init_head: bool) -> nn.Module:
    """The SCFT model of checkpoint directory ``path`` (its architecture's patched class, head ``scft``), built
    partitioned under the live ZeRO-3 HfDeepSpeedConfig; through transformers' loader when
    ``partitioned_load_refusal`` or a weight conversion says so. ``init_head``: the checkpoint has no head, make
    one. Every rank calls it; a missing, unexpected or mismatched tensor is a ValueError naming it and its file."""
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights
    from transformers.integrations import deepspeed_config
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    refusal = partitioned_load_refusal(path, deepspeed_config())
    if refusal is None:
        config = AutoConfig.from_pretrained(path)
        setattr(config, SCFT_CONFIG_KEY, asdict(scft))
        target = scft_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
        tensors = CheckpointTensors(checkpoint_files(path))
        with torch.device("meta"), no_init_weights():  # names only: the key map is settled before any allocation
            planned = target(config)
        try:
            key_map = _key_map(planned, list(tensors.file))
        except _NeedsConversion as e:
            refusal = f"checkpoint key {e} needs transformers' weight conversion"
        del planned
    if refusal is not None:
        if dist.get_rank() == 0:
            say(f"ZeRO-3 build through transformers' loader (rank 0 reads the whole checkpoint): {refusal}")
        return SCFTForCausalLM.from_pretrained(path, init_head=init_head, config=scft, _transformers_loader=True)
    config.name_or_path = path
    model = _construct(target, config, checkpoint_files(path))
    _fill(model, tensors, key_map, path, init_head, f"{target.__name__} with SCFT head {scft}")
    if os.path.exists(os.path.join(path, "generation_config.json")):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()  # as from_pretrained leaves it
    return model


def _fill(model: nn.Module, tensors: CheckpointTensors, key_map: dict[str, str], path: str, init_head: bool,
          what: str) -> None:
    """Every rank reads its partition of every parameter, and every persistent buffer whole."""
    by_name: dict[str, list[str]] = {}
    for key, name in key_map.items():
        by_name.setdefault(name, []).append(key)
    unused, missing = set(key_map), set()
    for names, param in _named_parameters(model):
        keys = [key for name in names for key in by_name.get(name, [])]
        unused.difference_update(keys)  # a tied parameter saved under both its names is read once
        if not keys:
            missing.update(names)
            continue
        _check_shape(tensors, keys[0], list(param.ds_shape), names[0])
        partition = param.ds_tensor
        start = partition.numel() * dist.get_rank(group=param.ds_process_group)
        count = max(0, min(partition.numel(), param.ds_numel - start))  # the last partition's tail is padding
        with torch.no_grad():
            tensors.read_flat(keys[0], start, partition.narrow(0, 0, count))
    for name, buffer in _persistent_buffers(model):
        keys = by_name.get(name, [])
        unused.difference_update(keys)
        if not keys:
            missing.add(name)
            continue
        _check_shape(tensors, keys[0], list(buffer.shape), name)
        with torch.no_grad():
            buffer.copy_(tensors.read_whole(keys[0]))
    names_unused = {key_map[key]: key for key in unused}
    missing, unexpected = _ignored_by_architecture(model, missing, set(names_unused))
    head = {name for name in missing if name.startswith(HEAD_PREFIX)}
    if init_head and head:
        missing -= head
        model.init_head()
    if missing:
        raise ValueError(f"{path}: no tensor for {sorted(missing)[:5]} of {what} in {sorted(set(tensors.file.values()))}")
    if unexpected:
        keys = sorted(names_unused[name] for name in unexpected)
        raise ValueError(f"{tensors.file[keys[0]]}: tensor {keys[0]} is not a weight of {what}"
                         + (f" (nor are {keys[1:5]})" if len(keys) > 1 else ""))


def _check_shape(tensors: CheckpointTensors, key: str, expected: list[int], name: str) -> None:
    if list(tensors.shape[key]) != expected:
        raise ValueError(f"{tensors.file[key]}: tensor {key} has shape {tuple(tensors.shape[key])}, but the model's "
                         f"{name} is {tuple(expected)}")


def _named_parameters(model: nn.Module) -> list[tuple[list[str], nn.Parameter]]:
    """Each parameter once, with every name it has (tied weights have several)."""
    groups: dict[int, tuple[list[str], nn.Parameter]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), ([], param))[0].append(name)
    return list(groups.values())


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(f"{prefix}.{name}" if prefix else name, buffer)
            for prefix, module in model.named_modules() for name, buffer in module.named_buffers(recurse=False)
            if name not in module._non_persistent_buffers_set]


def _ignored_by_architecture(model, missing: set[str], unexpected: set[str]) -> tuple[set[str], set[str]]:
    """Drops the keys the architecture declares optional or obsolete, by transformers' own rules."""
    from transformers.modeling_utils import LoadStateDictInfo

    info = LoadStateDictInfo(missing_keys=set(missing), error_msgs=[], unexpected_keys=set(unexpected),
                             mismatched_keys=set(), conversion_errors={}, skipped_pp_keys=set())
    model._adjust_missing_and_unexpected_keys(info)
    return info.missing_keys, info.unexpected_keys
