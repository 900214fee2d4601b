"""The SCFT head under PEFT: every LoRA route trains it (``train_head_with_adapter``: it joins the adapter's
``modules_to_save``), adapter directories carry it (with ``scft_config.json`` beside PEFT's files) and load with it
(``SCFTForCausalLM.from_pretrained(adapter_dir)``); a loader that dropped it is named wherever the head is used next.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, replace

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from .config import HEAD_NAME, HEAD_PREFIX, SCFT_CONFIG_KEY, SCFTConfig
from .loading import _read_head

# What every error about an adapter loaded without its head tells the user to do instead.
ADAPTER_LOADER_HINT = ("load SCFT adapters with scft_fast.SCFTForCausalLM.from_pretrained(adapter_dir), which "
                       "builds the base with a head and loads the adapter's trained head into it "
                       "(AutoPeftModelForCausalLM and AutoModelForCausalLM build the base without one)")


ADAPTER_CONFIG = "adapter_config.json"


ADAPTER_SCFT_CONFIG = "scft_config.json"  # the SCFT settings beside an adapter (PEFT's files have no place for them)


# How PEFT names the head (a modules_to_save copy) in adapter_model.safetensors.
ADAPTER_HEAD_PREFIX = "base_model.model." + HEAD_PREFIX


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model under an optional PEFT wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def train_head_with_adapter(peft_model: nn.Module) -> None:
    """Makes the SCFT head of a PEFT model train fully and ride in its adapter checkpoints: ``score`` joins every
    active adapter's ``modules_to_save``. A head that PEFT gave LoRA layers of its own ("all-linear" matches it)
    gets its plain layer back first: the fused op reads the head's weight, never a low-rank delta, so LoRA there
    would log a head loss for weights that never move. Idempotent; a no-op on a model without a head."""
    base = unwrap(peft_model)
    if base is peft_model or getattr(base, "scft_config", None) is None:
        return
    from peft.utils.other import set_additional_trainable_modules

    if _lora_wrapped(base.score):
        base.score = base.score.get_base_layer()
        names = getattr(peft_model.base_model, "targeted_module_names", None)
        if names is not None:
            names[:] = [n for n in names if n.rpartition(".")[2] != HEAD_NAME]
    for adapter in peft_model.active_adapters:
        peft_config = peft_model.peft_config[adapter]
        targets = peft_config.target_modules
        if isinstance(targets, (set, list)) and HEAD_NAME in targets:
            peft_config.target_modules = type(targets)(t for t in targets if t != HEAD_NAME)
        modules = list(getattr(peft_config, "modules_to_save", None) or [])
        if HEAD_NAME not in modules:
            peft_config.modules_to_save = modules + [HEAD_NAME]
        set_additional_trainable_modules(peft_model, peft_config, base.config, adapter)


def _lora_wrapped(module: nn.Module) -> bool:
    """Whether PEFT injected adapter layers (LoRA and its kin) into ``module``: they keep the original layer as
    ``base_layer``; PEFT's modules_to_save copy (``original_module`` + ``modules_to_save``) does not."""
    return getattr(module, "base_layer", None) is not None


def _refuse_dropped_head(peft_model: nn.Module, base: nn.Module) -> None:
    """An adapter trained with an SCFT head lists it among ``modules_to_save``; a loader that built the base
    without a head (``AutoPeftModelForCausalLM``, ``PeftModel.from_pretrained`` on an unpatched base) dropped the
    trained head without a word. Adding a new, untrained head on top would hide that."""
    if getattr(base, "scft_config", None) is not None:
        return
    for name, peft_config in getattr(peft_model, "peft_config", {}).items():
        if HEAD_NAME in (getattr(peft_config, "modules_to_save", None) or ()):
            raise ValueError(f"adapter {name!r} was trained with an SCFT head ({HEAD_NAME!r} is among its "
                             f"modules_to_save), but the base model it was loaded onto has none, so its loader "
                             f"dropped the trained head: {ADAPTER_LOADER_HINT}")


def scft_base(model: nn.Module, what: str) -> PreTrainedModel:
    """The SCFT model with a head under ``model`` (PEFT-wrapped or not), or a ValueError saying why there is none
    and how to load one; ``what`` names the caller."""
    base = unwrap(model)
    if base is not model:
        _refuse_dropped_head(model, base)
    if getattr(base, "scft_config", None) is None:
        from .patch import SCFTForCausalLM

        why = ("was patched without an SCFTConfig" if isinstance(base, SCFTForCausalLM)
               else "is a plain transformers model (AutoModelForCausalLM drops the score.* weights)")
        raise ValueError(f"{what} needs a model with an SCFT head, but {type(base).__name__} {why}: load a saved SCFT "
                         f"model with scft_fast.SCFTForCausalLM.from_pretrained(path) (an adapter directory "
                         f"included), or add a head with apply_scft_fast(model, SCFTConfig())")
    return base


def write_adapter_scft_config(model: nn.Module, path: str) -> None:
    """Writes the SCFT settings of a PEFT model's head beside its adapter files in ``path``, where
    ``SCFTForCausalLM.from_pretrained(path)`` reads them back (pool, threshold, coefficients)."""
    scft = getattr(unwrap(model), "scft_config", None)
    if scft is not None:
        with open(os.path.join(path, ADAPTER_SCFT_CONFIG), "w") as f:
            json.dump(asdict(scft), f, indent=2, sort_keys=True)


def _load_adapter(path: str, *args, config: SCFTConfig | None = None, base_model: str | None = None,
                  is_trainable: bool = False, **kwargs) -> nn.Module:
    """``SCFTForCausalLM.from_pretrained`` of a PEFT adapter directory (see there)."""
    from peft import PeftConfig, PeftModel

    from .patch import SCFTForCausalLM

    peft_config = PeftConfig.from_pretrained(path)
    base_path = base_model or peft_config.base_model_name_or_path
    if not base_path or not os.path.isfile(os.path.join(base_path, "config.json")):
        raise ValueError(f"{os.path.join(path, ADAPTER_CONFIG)}: its base model {base_path!r} is not a local model "
                         f"directory; pass base_model=PATH (the directory the adapter was trained on)")
    head = _read_head(path, prefix=ADAPTER_HEAD_PREFIX)
    if head is None:
        raise ValueError(f"{path}: the adapter holds no SCFT head ({ADAPTER_HEAD_PREFIX}weight): it was trained "
                         f"without one; load it with peft.PeftModel.from_pretrained(base, {path!r})")
    if config is None and os.path.isfile(os.path.join(path, ADAPTER_SCFT_CONFIG)):
        with open(os.path.join(path, ADAPTER_SCFT_CONFIG)) as f:
            config = SCFTConfig.from_dict(json.load(f))
    if config is None:
        saved = getattr(AutoConfig.from_pretrained(base_path), SCFT_CONFIG_KEY, None)
        config = SCFTConfig.from_dict(saved) if saved else SCFTConfig()
    config = replace(config, num_labels=head["weight"].shape[0], head_bias="bias" in head)
    base = SCFTForCausalLM.from_pretrained(base_path, *args, init_head=True, config=config, **kwargs)
    model = PeftModel.from_pretrained(base, path, is_trainable=is_trainable)
    score = unwrap(model).score
    if any(not torch.equal(getattr(score, k).detach().cpu(), v.to(getattr(score, k).dtype)) for k, v in head.items()):
        raise ValueError(f"{path}: the adapter's SCFT head did not load into the model (PEFT's modules_to_save "
                         f"{peft_config.modules_to_save!r} do not name {HEAD_NAME!r})")
    return model
