"""The pieces the loop composes: tokenizer + model, datasets, and the global order of micro-batches."""
from __future__ import annotations

import os
from dataclasses import fields, replace

import numpy as np
import torch

from ..data import (
    DataConfig,
    PackedBatchSampler,
    PackedCollator,
    PaddedCollator,
    build_dataset,
    default_data_files,
    load_default_tokenizer,
    refusal_token_id,
)
from ..data.collate import rank_share
from ..errors import ConfigError
from ..model import SCFT_CONFIG_KEY, SCFTConfig, SCFTForCausalLM
from .config import TrainConfig
from .presets import PRESETS, build_preset, preset_config
from .zero_load import load_partitioned


def build_tokenizer(config: TrainConfig):
    """(tokenizer, refusal token id): the embedded tokenizer for a preset, else the checkpoint's."""
    from transformers import AutoTokenizer

    name = config.model.name_or_path
    if name in PRESETS:
        tokenizer = load_default_tokenizer()
    elif os.path.isdir(name):
        tokenizer = AutoTokenizer.from_pretrained(name)
    else:
        raise ConfigError(f"--model {name!r} is neither a preset ({sorted(PRESETS)}) nor a local directory "
                         f"holding a Hugging Face causal LM")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pooling never reads pad ids, so EOS padding is safe
    return tokenizer, refusal_token_id(tokenizer, config.data.refusal_string)


def model_config(config: TrainConfig, tokenizer):
    """The model's HF config, read before the model is built (DeepSpeed's "auto" sizes come from it)."""
    from transformers import AutoConfig

    name = config.model.name_or_path
    return preset_config(name, tokenizer) if name in PRESETS else AutoConfig.from_pretrained(name)


def build_model(config: TrainConfig, tokenizer, refusal: int):
    """The SCFT model (PEFT-wrapped with LoRA) for a preset name or a local HF / SCFT checkpoint directory.

    With a ZeRO-3 HfDeepSpeedConfig alive (resolve_deepspeed_config) it is built inside ``deepspeed.zero.Init``:
    every parameter, the head's included, is partitioned as it is created; a checkpoint is read into the
    partitions by ``zero_load.load_partitioned`` (each rank reads its own slice of every tensor), a preset is
    initialized by transformers one module at a time. No rank holds the whole model."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    spec, loss = config.model, config.loss
    saved = getattr(model_config(config, tokenizer), SCFT_CONFIG_KEY, None)
    # A checkpoint's head keeps its shape (classes, bias); the command line sets how it is trained.
    head = SCFTConfig.from_dict(saved) if saved else SCFTConfig()
    if spec.head_bias is not None and saved and spec.head_bias != head.head_bias:
        raise ConfigError(f"--{'' if spec.head_bias else 'no-'}head-bias: the SCFT head of {spec.name_or_path} "
                          f"has {'no' if spec.head_bias else 'a'} bias, and a checkpoint's head keeps its shape")
    scft = replace(head, refusal_token_id=refusal, pool=spec.pool, lm_coef=loss.lm_coef,
                   transition_coef=loss.transition_coef, cls_coef=loss.cls_coef, backend=loss.backend,
                   chunk_size=loss.chunk_size, head_bias=head.head_bias if spec.head_bias is None else spec.head_bias)
    if spec.name_or_path in PRESETS:
        model = build_preset(spec.name_or_path, tokenizer, scft)
    elif is_deepspeed_zero3_enabled():
        model = load_partitioned(spec.name_or_path, scft, init_head=not saved)
    else:
        model = SCFTForCausalLM.from_pretrained(spec.name_or_path, init_head=not saved, config=scft)
    model._check_logits_match()
    if spec.lora_rank > 0:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=spec.lora_rank, lora_alpha=spec.lora_alpha if spec.lora_alpha is not None else 2 * spec.lora_rank,
            lora_dropout=spec.lora_dropout, target_modules=spec.lora_target_modules,
            exclude_modules=["score"]))  # the head trains fully (modules_to_save), never through LoRA
        model = SCFTForCausalLM.from_causal_lm(model, scft)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def data_config_of(config: TrainConfig) -> DataConfig:
    """The data layer's config: DataSpec's fields of the same name, the pool of the model's head, the run's
    seed."""
    spec = config.data
    shared = {f.name: getattr(spec, f.name) for f in fields(DataConfig) if hasattr(spec, f.name)}
    return DataConfig(**shared, pool=config.model.pool, seed=config.seed)


def build_data(config: TrainConfig, tokenizer):
    """(train dataset, {name: (eval dataset, column title)}, train DataStats). Eval sets keep every RTO position.
    With the embedded data: "eval", held out from the training generator, and "separate", written by a separate
    generator; with --data: "eval" from --eval-data, if given."""
    spec = config.data
    data_config = data_config_of(config)
    train_files = spec.files or default_data_files("train")
    train_set, stats = build_dataset(train_files, tokenizer, data_config)
    if spec.eval_files:
        sources = {"eval": (spec.eval_files, "--eval-data")}
    elif spec.files is None:
        sources = {"eval": (default_data_files("eval"), "same generator"),
                   "separate": (default_data_files("separate"), "separate generator")}
    else:
        sources = {}
    eval_sets = {}
    if spec.eval_samples > 0:
        for name, (files, title) in sources.items():
            # Vanilla refusals on: the head is scored on (harmful request, refusal) pairs too, as scft-fast eval does.
            eval_set, _ = build_dataset(files, tokenizer, replace(data_config, rto_keep=1.0, vanilla_safety=True))
            eval_sets[name] = (eval_set.select(range(min(spec.eval_samples, len(eval_set)))), title)
    return train_set, eval_sets, stats


class BatchPlan:
    """The global order of micro-batches, a pure function of (seed, epoch): resuming at step s needs no sampler
    state. Rank r takes its ``rank_share`` of an epoch's micro-batches (r, r + world, ...: the sampler's sharding),
    and step s its [s * gas, (s + 1) * gas) slice of those, so the step's micro-batches over all ranks are
    [s * gas * world, (s + 1) * gas * world) of the epoch. A single process with gas * world accumulation steps
    therefore sees exactly the batches of a world-rank run."""

    def __init__(self, dataset, config: TrainConfig, pad_token_id: int, world_size: int):
        spec = config.data
        self.dataset, self.seed = dataset, config.seed
        self.lengths = np.asarray(dataset["length"], dtype=np.int64)
        self.micro_per_step = config.grad_accum * world_size
        self.gas, self.world_size = config.grad_accum, world_size
        self.micro_batch_size = spec.micro_batch_size
        self.packing = spec.packing
        if spec.packing:
            self.max_tokens = spec.max_tokens or spec.micro_batch_size * int(self.lengths.max())
            self.collate = PackedCollator(self.max_tokens)
        else:
            self.collate = PaddedCollator(pad_token_id)
        self._epochs: dict[int, list[list[int]]] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            if self.packing:
                sampler = PackedBatchSampler(self.lengths, self.max_tokens, shuffle=True, seed=self.seed)
                sampler.set_epoch(epoch)
                batches = list(sampler)
            else:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths)).tolist()
                size = self.micro_batch_size
                batches = [order[i:i + size] for i in range(0, len(order) - size + 1, size)]
            self._epochs = {epoch: batches}
        return self._epochs[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.epoch_batches(epoch)) // self.micro_per_step

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a global step."""
        epoch = 0
        while step >= self.steps_in_epoch(epoch):
            if self.steps_in_epoch(epoch) == 0:
                raise ConfigError(f"an epoch has fewer micro-batches ({len(self.epoch_batches(epoch))}) than one "
                                  f"step needs ({self.micro_per_step}): lower --micro-batch-size or --grad-accum")
            step -= self.steps_in_epoch(epoch)
            epoch += 1
        return epoch, step

    def micro_batches(self, step: int, rank: int) -> list[dict]:
        epoch, within = self.locate(step)
        mine = rank_share(self.epoch_batches(epoch), rank, self.world_size)
        return [self.fetch(indices) for indices in mine[within * self.gas:(within + 1) * self.gas]]

    def fetch(self, indices: list[int]) -> dict:
        columns = self.dataset[indices]
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        return self.collate(rows)


def padded_batches(dataset, pad_token_id: int, micro_batch_size: int) -> list[dict]:
    collate = PaddedCollator(pad_token_id)
    batches = []
    for start in range(0, len(dataset), micro_batch_size):
        columns = dataset[start:start + micro_batch_size]
        batches.append(collate([dict(zip(columns, values)) for values in zip(*columns.values())]))
    return batches


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
