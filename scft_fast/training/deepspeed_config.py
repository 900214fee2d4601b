"""DeepSpeed JSON configs resolved the way transformers' Trainer resolves them.

transformers' ``HfTrainerDeepSpeedConfig`` does the work: ``trainer_config_process`` fills batch geometry,
clipping, precision and the optimizer / scheduler parameters from the training arguments and records every
value set in the JSON that disagrees with them; ``trainer_config_finalize`` fills the bucket sizes, prefetch
and persistence threshold from the model's hidden size and the scheduler's step counts, and raises on the
disagreements. We hand it the values of a ``TrainingArguments`` that our flags stand for. The object is also
transformers' ``HfDeepSpeedConfig``: while it is alive, ``from_pretrained`` / ``_from_config`` build the model
under ``deepspeed.zero.Init`` when the stage is 3 (each rank allocates its partition only).
"""
from __future__ import annotations

import json
from types import SimpleNamespace

from ..errors import ConfigError
from .config import TrainConfig


def read_deepspeed_file(path: str) -> dict:
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed {path}: no such file (the shipped configs are training/zero*.json)") from None
    except IsADirectoryError:
        raise ConfigError(f"--deepspeed {path} is a directory: pass a DeepSpeed JSON file such as "
                          f"training/zero2.json") from None
    except ValueError as e:
        raise ConfigError(f"--deepspeed {path} is not valid JSON ({e}): fix it, or start from training/zero*.json") \
            from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed {path} holds a JSON {type(ds).__name__}: a DeepSpeed config is one JSON "
                          f"object ({{\"zero_optimization\": {{\"stage\": 2}}, ...}}), as in training/zero*.json")
    return ds


def training_arguments(config: TrainConfig, world_size: int, warmup_steps: int) -> SimpleNamespace:
    """The ``TrainingArguments`` fields ``HfTrainerDeepSpeedConfig`` reads, as our flags set them."""
    optim = config.optim
    return SimpleNamespace(
        world_size=world_size, per_device_train_batch_size=config.data.micro_batch_size,
        gradient_accumulation_steps=config.grad_accum, max_grad_norm=optim.grad_clip, learning_rate=optim.lr,
        adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_epsilon=optim.eps,
        weight_decay=optim.weight_decay, save_on_each_node=False, fp16=False, fp16_full_eval=False,
        bf16=config.bf16, bf16_full_eval=False, get_warmup_steps=lambda total_steps: warmup_steps)


def _auto_keys(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _auto_keys(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


def _processed(path: str, config: TrainConfig, world_size: int, warmup_steps: int):
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args = training_arguments(config, world_size, warmup_steps)
    resolved = HfTrainerDeepSpeedConfig(read_deepspeed_file(path))
    resolved.trainer_config_process(args)
    return resolved, args


def check_deepspeed_config(path: str, config: TrainConfig, world_size: int) -> None:
    """What can be refused before the data and the model exist: an unreadable file, a value that contradicts the
    command line (the hidden-size and step-count fields are checked by resolve_deepspeed_config)."""
    resolved, _ = _processed(path, config, world_size, config.optim.warmup_steps)
    if resolved.mismatches:
        raise ConfigError(f"{path}: values that contradict the command line (set them to \"auto\"): "
                          + "; ".join(m.removeprefix("- ") for m in resolved.mismatches))


def resolve_deepspeed_config(path: str, config: TrainConfig, world_size: int, total_steps: int,
                             model_config):
    """The HfTrainerDeepSpeedConfig of ``path`` with every "auto" filled; keep it alive while the model is built
    and trained (transformers finds it through a weak reference). ``model_config``: the model's HF config."""
    resolved, args = _processed(path, config, world_size, config.optim.warmup_steps_for(total_steps))
    try:
        resolved.trainer_config_finalize(args, SimpleNamespace(config=model_config), total_steps)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    left = _auto_keys(resolved.config)
    if left:  # a field nobody fills would reach DeepSpeed as the string "auto"
        raise ConfigError(f"{path}: {', '.join(left)} = \"auto\", which transformers' rules do not fill; set a "
                          f"value")
    ds = resolved.config
    zero = ds.get("zero_optimization", {})
    if "optimizer" not in ds and zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # Without an optimizer section ours is torch's AdamW (the same on every engine, no C++ build); DeepSpeed
        # insists on its CPU Adam with optimizer offload unless told otherwise.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10 ** 9)
    return resolved
