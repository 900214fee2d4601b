"""SCFTSFTTrainer: TRL's SFTTrainer with its loss computed by the model's forward, that is by scft_fast's fused op.

    trainer = SCFTSFTTrainer(model=apply_scft_fast(model, SCFTConfig()), args=SFTConfig(...),
                             train_dataset=dataset, processing_class=tokenizer)   # LM + RTO + SCFT head
    trainer = SCFTSFTTrainer(model=apply_scft_fast(model), ...)                    # plain SFT

Why a trainer at all: trl 1.16's SFTTrainer patches its own fused LM head onto every model
(trl.trainer.utils.add_fused_lm_head) and computes its loss from that head's per-token log-probabilities of the LM
labels, never from the model's forward; that head knows no transition or classification target. An unmodified
SFTTrainer trains an apply_scft_fast model correctly, with TRL's head. Here the loss is the model's forward, with
SCFTTrainer's normalizers, logs, evaluation and saving (SCFTTrainerMixin). TRL's num_tokens metric is kept;
entropy and mean_token_accuracy come from the fused op's token statistics (computed in its sweeps, no logits).

With an SCFTConfig the dataset is in TRL's own forms: prompt/completion (standard or conversational) or messages,
plus two optional columns, a safety label (``label_column``, default "label": "safe" | "unsafe" | a class id |
-100 for none) and an RTO flag (``rto_column``, default "rto": a bool), the fields scft_fast.data's chat records
carry. TRL tokenizes the rows exactly as SFTTrainer does (chat template, completion_mask, assistant masks,
max_length truncation); each tokenized row then becomes a scft_fast.data row:

    labels             TRL's labels (completion_only_loss / assistant_only_loss decide, as in SFTTrainer);
                       all ignored on an RTO row
    transition_labels  on an RTO row, the refusal token (first token of DataConfig.refusal_string, "Sorry") at
                       ceil(rto_keep * m) of the m completion positions (the last assistant turn of a messages
                       row; its EOS included, as DeRTa's); ignored elsewhere
    cls_pos, cls_label the row's last EOS (pool="eos") or the token before it (pool="pre_eos"), and its class:
                       the label column, else unsafe for RTO rows and safe otherwise (scft_fast.data's
                       defaults); a row whose EOS max_length cut off has no class (its head term is dropped)

A dataset that already holds scft_fast.data rows (``transition_labels`` among its columns, e.g. from
``scft_fast.data.build_dataset``) is used as is. Batches are padded by SCFTDataCollator. TRL's ``packing`` and
``padding_free`` are refused with a head (TRL's packing keeps only input_ids and labels, and its padding-free
collator drops the safety targets). Without an SCFTConfig, TRL's data preparation and collator run unchanged.
"""
from __future__ import annotations

import logging

import torch
from transformers import Trainer
from trl import SFTTrainer
from trl.data_utils import common_prefix_length, get_dataset_column_names

from ..constants import IGNORE_INDEX
from ..data import SCFTDataCollator
from ..data.collate import INPUT_COLUMNS
from ..data.config import DataConfig
from ..data.constants import CLS_LABELS, SAFE, UNSAFE
from ..data.encode import refusal_token_id, rto_positions
from .patch import SCFTForCausalLM
from .peft import unwrap
from .private_patches import fused_lm_head_allowed
from .trainer import SCFTTrainerMixin

logger = logging.getLogger(__name__)

# Default dataset columns: the fields scft_fast.data's chat records carry.
LABEL_COLUMN = "label"
RTO_COLUMN = "rto"


def _cls_label(value, column: str, index: int, rto: bool) -> int:
    if value is None:
        return UNSAFE if rto else SAFE
    if isinstance(value, str) and value in CLS_LABELS:
        return CLS_LABELS[value]
    if isinstance(value, int) and not isinstance(value, bool) and (value >= 0 or value == IGNORE_INDEX):
        return value
    raise ValueError(f"column {column!r}, row {index}: unknown safety label {value!r}; expected one of "
                     f"{sorted(CLS_LABELS)}, a class id >= 0, {IGNORE_INDEX} (no label) or None (the default)")


def _rto_flag(value, column: str, index: int) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ValueError(f"column {column!r}, row {index}: expected true, false or null, got {value!r}")


def _completion_start(example: dict, index: int, processing_class, chat_template) -> int:
    """The first completion token of a TRL-tokenized row: where its completion_mask starts, or, for a messages row,
    where the last assistant turn starts (TRL's prompt/completion rule: the common prefix of the tokenized prompt,
    rendered with the generation prompt, and the whole conversation); else the first labeled token."""
    if "completion_mask" in example:
        return example["completion_mask"].index(1) if 1 in example["completion_mask"] else len(example["input_ids"])
    messages = example.get("messages")
    if messages:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError(f"column 'messages', row {index}: an RTO row needs an assistant turn to train")
        prompt = processing_class.apply_chat_template(messages[:last], tokenize=True, return_dict=True,
                                                      add_generation_prompt=True, chat_template=chat_template,
                                                      tools=example.get("tools"))["input_ids"]
        return common_prefix_length(prompt, example["input_ids"])
    labels = example["labels"]
    return next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def safety_row(example: dict, index: int, *, refusal_id: int, eos_id: int, data_config: DataConfig,
               label_column: str, rto_column: str, processing_class, chat_template=None) -> dict:
    """One TRL-tokenized row (input_ids, labels, the dataset's own columns) -> a scft_fast.data row."""
    ignore = data_config.ignore_index
    input_ids, labels = list(example["input_ids"]), list(example["labels"])
    n = len(input_ids)
    rto = _rto_flag(example.get(rto_column), rto_column, index)
    transition = [ignore] * n
    if rto:
        start = _completion_start(example, index, processing_class, chat_template)
        for j in rto_positions(n - start, data_config.rto_keep, [data_config.seed, index]) if start < n else ():
            transition[start + int(j)] = refusal_id
        labels = [ignore] * n
    cls_label = _cls_label(example.get(label_column), label_column, index, rto)
    eos = next((t for t in range(n - 1, -1, -1) if input_ids[t] == eos_id), None)
    if eos is None or (data_config.pool == "pre_eos" and eos == 0):
        cls_pos, cls_label = n - 1, ignore
    else:
        cls_pos = eos if data_config.pool == "eos" else eos - 1
    return {"input_ids": input_ids, "labels": labels, "transition_labels": transition, "cls_pos": cls_pos,
            "cls_label": cls_label}


def to_safety_rows(dataset, processing_class, data_config: DataConfig, *, label_column: str, rto_column: str,
                   chat_template=None, num_proc: int | None = None, name: str = "train"):
    """A TRL-prepared dataset -> scft_fast.data rows (the columns the collators read, INPUT_COLUMNS)."""
    from datasets import Dataset

    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: the classification head pools on each row's EOS")
    kwargs = dict(with_indices=True, remove_columns=[c for c in dataset.column_names if c not in INPUT_COLUMNS],
                  fn_kwargs=dict(refusal_id=refusal_token_id(tokenizer, data_config.refusal_string),
                                 eos_id=tokenizer.eos_token_id, data_config=data_config, label_column=label_column,
                                 rto_column=rto_column, processing_class=processing_class,
                                 chat_template=chat_template))
    if isinstance(dataset, Dataset):  # IterableDataset.map takes neither
        kwargs.update(num_proc=num_proc, desc=f"Adding safety targets to {name} dataset")
    rows = dataset.map(safety_row, **kwargs)
    if isinstance(rows, Dataset) and len(rows):
        unpooled = sum(1 for c in rows["cls_label"] if c == data_config.ignore_index)
        if unpooled:
            logger.warning("%s dataset: %d of %d rows carry no classification label (no EOS left after "
                           "truncation, or labeled %d)", name, unpooled, len(rows), data_config.ignore_index)
    return rows


# scft_fast.data rows' safety columns (besides input_ids and labels).
SAFETY_ROW_COLUMNS = ("transition_labels", "cls_pos", "cls_label")


def _refuse_safety_columns(datasets: dict, safety_columns: tuple[str, ...], trainer: str | None = None) -> None:
    """A model patched without an SCFTConfig (or ``trainer``'s own loss) trains LM targets only: rows meant for RTO
    or the head would be trained as ordinary completions (harmful ones included), so their columns are refused."""
    for name, dataset in datasets.items():
        for part, data in (dataset.items() if isinstance(dataset, dict) else [(None, dataset)]):
            if data is None:
                continue
            found = [c for c in safety_columns if c in (get_dataset_column_names(data) or ())]
            if found:
                where = name + (f"[{part!r}]" if part is not None else "")
                if trainer is not None:
                    raise ValueError(
                        f"{trainer}'s {where} has the safety column(s) {found}, which its loss ignores: the RTO rows' "
                        f"harmful completions would be trained as ordinary LM targets. Train them with "
                        f"scft_fast.SCFTSFTTrainer on apply_scft_fast(model, SCFTConfig(...)), or drop the columns "
                        f"for plain SFT")
                raise ValueError(
                    f"{where} has the safety column(s) {found}, but the model was patched without an SCFTConfig: "
                    f"its loss has no RTO target and no head, so RTO rows would be trained as ordinary LM "
                    f"targets. Patch it with apply_scft_fast(model, SCFTConfig(...)) to train them, or drop the "
                    f"columns for plain SFT (a column of another meaning: rename it)")


class _ModelLossSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is the model's forward with labels, as in Trainer, not SFTTrainer's own LM head (see
    the module doc); TRL's num_tokens metric is kept."""

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        if mode == "train":  # as TRL counts: real tokens, or a padding-free row's length
            mask = inputs.get("attention_mask")
            local = mask.sum() if mask is not None else torch.tensor(inputs["position_ids"].size(1),
                                                                     device=inputs["position_ids"].device)
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(local).sum()) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss


class SCFTSFTTrainer(SCFTTrainerMixin, _ModelLossSFTTrainer):
    """``trl.SFTTrainer`` (same constructor) whose loss is the forward of a model ``apply_scft_fast`` patched: with an
    ``SCFTConfig``, LM + RTO + the SCFT head from TRL's dataset forms and the safety columns (see the module doc);
    without one, plain SFT, TRL's data preparation and collator unchanged (packing and padding-free included).
    Keyword-only extras: ``data_config`` (scft_fast.data's DataConfig: refusal string, rto_keep, seed; ``pool``
    defaults to the model's), ``label_column``, ``rto_column``."""

    _tag_names = ["trl", "sft", "scft_fast"]
    LOG_NAMES = {"token_accuracy": "mean_token_accuracy"}  # TRL's name; "entropy" is the same

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, *trl_args, data_config: DataConfig | None = None,
                 label_column: str = LABEL_COLUMN, rto_column: str = RTO_COLUMN, **trl_kwargs):
        base = unwrap(model)
        if not isinstance(base, SCFTForCausalLM):
            raise ValueError(f"model: SCFTSFTTrainer trains through scft_fast's fused loss; pass "
                             f"apply_scft_fast(model, SCFTConfig(...)) (or apply_scft_fast(model) for plain SFT), "
                             f"got an unpatched {type(base).__name__}")
        self.scft_config = base.scft_config
        self.label_column, self.rto_column = label_column, rto_column
        self.data_config = None
        if self.scft_config is None:
            _refuse_safety_columns({"train_dataset": train_dataset, "eval_dataset": eval_dataset},
                                   (rto_column, label_column, *SAFETY_ROW_COLUMNS))
        else:
            self.data_config = data_config or DataConfig(pool=self.scft_config.pool)
            if self.data_config.pool != self.scft_config.pool:
                raise ValueError(f"data_config.pool={self.data_config.pool!r} but the model's head pools "
                                 f"{self.scft_config.pool!r} at inference; make them equal")
            data_collator = self._safety_collator(args, data_collator, processing_class)
        with fused_lm_head_allowed(base):  # SFTTrainer patches in its LM head; our loss never calls it
            super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, *trl_args,
                             **trl_kwargs)

    def _safety_collator(self, args, data_collator, processing_class):
        for flag in ("packing", "padding_free"):
            if getattr(args, flag, False):
                raise ValueError(f"args.{flag}=True is not supported with an SCFT head: TRL's {flag} keeps only "
                                 f"input_ids and labels, the safety targets would be dropped")
        if processing_class is None:
            raise ValueError("processing_class: SCFTSFTTrainer needs the tokenizer (each row's EOS is its pooled "
                             "token, its pad id pads the batches)")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        refusal = refusal_token_id(tokenizer, self.data_config.refusal_string)
        if self.scft_config.refusal_token_id not in (None, refusal):
            raise ValueError(f"data_config.refusal_string {self.data_config.refusal_string!r} is token {refusal}, "
                             f"but the model's SCFTConfig.refusal_token_id is {self.scft_config.refusal_token_id}")
        if data_collator is not None:
            return data_collator
        return SCFTDataCollator(tokenizer, ignore_index=self.data_config.ignore_index)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if self.data_config is None:  # plain SFT
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if "transition_labels" in get_dataset_column_names(dataset):
            return dataset  # scft_fast.data rows already
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        return to_safety_rows(prepared, processing_class, self.data_config, label_column=self.label_column,
                              rto_column=self.rto_column, chat_template=self.chat_template,
                              num_proc=args.dataset_num_proc, name=dataset_name)
