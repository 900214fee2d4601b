"""SCFTTrainer: ``transformers.Trainer`` training SCFT + DeRTa (or plain SFT) through the fused loss.

    model = apply_scft_fast(AutoModelForCausalLM.from_pretrained(...), SCFTConfig(refusal_token_id=...))
    trainer = SCFTTrainer(model=model, args=TrainingArguments(...), train_dataset=safety_dataset(tokenizer),
                          data_collator=SCFTDataCollator(tokenizer))

What it changes in Trainer, all in ``SCFTTrainerMixin`` so that other Trainer subclasses (TRL's SFTTrainer) take
it too: ``class SCFTSFTTrainer(SCFTTrainerMixin, trl.SFTTrainer)``.
- Normalizers: ``get_batch_samples`` counts LM + RTO targets and labeled sequences over the step's micro-batches
  (``hf/accounting.py``, the model's own counting), summed over ranks when
  ``average_tokens_across_devices`` (Trainer's ``loss *= world_size`` then undoes the gradient average); the
  model gets them as ``num_items_in_batch`` / ``num_cls_in_batch``. Trainer's own count sees LM labels only.
- Columns: the dataset's raw columns (``cls_pos``, ``cls_label``, ...) reach the collator under the default
  ``remove_unused_columns=True``: they join Trainer's signature columns when the collator names them.
- Logs: ``lm_loss``, ``transition_loss``, ``cls_loss``, ``head_accuracy``, sums over the logging window and ranks.
- Evaluation: ``eval_loss`` over the whole evaluation set taken as one batch (not a mean of batch means), the
  three terms, ``eval_head_accuracy`` and ``eval_head_auroc`` (``scft_fast.metrics``; absent with one class).
- Saving: ``save_model`` writes what ``SCFTForCausalLM.from_pretrained`` loads (``hf/export.py``): the
  full model, ZeRO-3 partitions gathered, LoRA merged under PEFT. A PEFT run's checkpoints stay Trainer's
  adapter checkpoints (adapters + the head, which ``apply_scft_fast`` adds to ``modules_to_save``).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..constants import IGNORE_INDEX
from ..errors import ConfigError
from ..evaluation.held_out import held_out_metrics
from ..metrics import p_unsafe
from .accounting import STEP_STATS, output_stats, stat_means, step_targets
from .distributed_checks import check_distributed
from .export import export_model
from .peft import train_head_with_adapter, unwrap, write_adapter_scft_config
from .private_patches import deepspeed_loads_weights_only, master_weights_shared


def refuse_loss_replacements(trainer) -> None:
    """Trainer settings that take the loss away from the model's forward, where the fused SCFT loss is computed:
    the label smoother and ``compute_loss_func`` pop the labels and compute a loss of their own over the logits
    (the fused forward builds none; without labels the head and RTO terms would not train at all), Liger-Kernel
    replaces the forward. Each is refused, naming the setting."""
    args = trainer.args
    if args.label_smoothing_factor:
        raise ConfigError(
            f"label_smoothing_factor={args.label_smoothing_factor}: Trainer's label smoother computes its own loss "
            f"over the logits, which the fused SCFT loss never builds, and would train neither the head nor RTO; "
            f"set label_smoothing_factor=0 (scft_fast.safety_loss takes label_smoothing= for the LM and RTO terms)")
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ConfigError("compute_loss_func: SCFTTrainer's loss is the model's fused SCFT loss (LM + RTO + head); a "
                         "loss function of one's own would replace it. Leave compute_loss_func unset, or override "
                         "compute_loss in a subclass")
    if getattr(args, "use_liger_kernel", False):
        raise ConfigError("use_liger_kernel=True: Liger-Kernel replaces the model's forward, and with it the fused "
                         "SCFT loss, which already fuses the LM head; set use_liger_kernel=False")


class SCFTTrainerMixin:
    """The SCFT parts of ``SCFTTrainer``; put it before the Trainer class it extends."""

    LOG_NAMES: dict[str, str] = {}  # a logged figure's name, where the trainer has its own (TRL's)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_distributed(self.args, self.accelerator)
        refuse_loss_replacements(self)
        # Before the optimizer exists: a head PEFT froze (apply_scft_fast before get_peft_model, or TRL's
        # peft_config=) joins the adapter's modules_to_save and trains.
        train_head_with_adapter(self.model)
        # The normalizers below always reach the model's forward, whatever its signature says.
        self.model_accepts_loss_kwargs = True
        self._num_cls_in_batch: torch.Tensor | None = None
        self._train_stats: torch.Tensor | None = None  # (len(STEP_STATS),) since the last training log
        self._train_tokens: torch.Tensor | int = 0  # real tokens of this rank since the last training log
        self._last_log_time: float | None = None
        self._eval_stats: torch.Tensor | None = None
        self._eval_scores: list[torch.Tensor] = []  # (n, 2) [p_unsafe, label] of labeled evaluation sequences

    def train(self, *args, **kwargs):
        # Accelerate builds the DeepSpeed engine inside train(): under ZeRO-3 with float32 weights, without a
        # second float32 copy of them (hf/private_patches.py).
        self._last_log_time = time.perf_counter()
        with master_weights_shared(), deepspeed_loads_weights_only():  # a DeepSpeed resume unpickles nothing
            return super().train(*args, **kwargs)

    # -- the SCFT model under the wrappers ------------------------------------------------------------------------
    def _scft_model(self):
        return unwrap(self.accelerator.unwrap_model(self.model))

    @property
    def scft_ignore_index(self) -> int:
        config = getattr(self._scft_model(), "scft_config", None)
        return config.ignore_index if config is not None else IGNORE_INDEX

    def _coefs(self) -> dict:
        config = getattr(self._scft_model(), "scft_config", None)
        if config is None:
            return {}
        return dict(lm_coef=config.lm_coef, transition_coef=config.transition_coef, cls_coef=config.cls_coef)

    # -- columns --------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in getattr(self.data_collator, "input_columns", ()):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    # -- normalizers ----------------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples:
            self._num_cls_in_batch = None
            return batch_samples, None
        counts = step_targets(batch_samples, self.scft_ignore_index).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
        self._num_cls_in_batch = counts[1]
        return batch_samples, counts[0]

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if num_items_in_batch is not None and self._num_cls_in_batch is not None:
            inputs = {**inputs, "num_cls_in_batch": self._num_cls_in_batch}
        if model.training and self._token_stats(inputs):
            inputs = {**inputs, "return_token_stats": True}  # token accuracy and entropy, inside the op's sweeps
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if model.training:
            stats = output_stats(outputs, inputs.get("cls_labels"), self.scft_ignore_index)
            self._train_stats = stats if self._train_stats is None else self._train_stats + stats
            mask = inputs.get("attention_mask")
            tokens = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
            self._train_tokens = self._train_tokens + tokens.to(stats.device, torch.float64)
        return (loss, outputs) if return_outputs else loss

    def _token_stats(self, inputs: dict) -> bool:
        """Whether the model's forward computes the op's token statistics: an apply_scft_fast model with LM labels."""
        return inputs.get("labels") is not None and hasattr(self._scft_model(), "scft_loss")

    # -- logging --------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # "loss" marks Trainer's training log, which every rank reaches at the same step: the reduce is collective.
        if "loss" in logs and self._train_stats is not None:
            stats = self.accelerator.reduce(torch.cat([self._train_stats, self._train_tokens[None]]), reduction="sum")
            self._train_stats, self._train_tokens = None, 0
            now = time.perf_counter()
            logs = {**logs, **{self.LOG_NAMES.get(k, k): v for k, v in stat_means(stats[:-1]).items() if v is not None}}
            if self._last_log_time is not None:  # real tokens (all ranks) per second since the last log
                logs["tokens_per_s"] = float(stats[-1]) / (now - self._last_log_time)
            self._last_log_time = now
        super().log(logs, *args, **kwargs)

    # -- evaluation -----------------------------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """One evaluation batch through the fused loss with its own normalizers; the sums it adds to are what
        ``evaluation_loop`` reports. Returns no logits: the fused loss never builds them."""
        if all(inputs.get(k) is None for k in ("labels", "transition_labels", "cls_labels")):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
        ignore = self.scft_ignore_index
        cls_labels = inputs.get("cls_labels")
        stats = output_stats(outputs, cls_labels, ignore)
        self._eval_stats = stats if self._eval_stats is None else self._eval_stats + stats
        if outputs.cls_logits is not None and cls_labels is not None:
            labeled = cls_labels != ignore
            scores = p_unsafe(outputs.cls_logits[labeled])
            self._eval_scores.append(torch.stack([scores, cls_labels[labeled].float()], 1).cpu())
        return outputs.loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        from accelerate.utils import gather_object

        self._eval_stats, self._eval_scores = None, []
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        stats = self._eval_stats
        if stats is None:
            stats = torch.zeros(len(STEP_STATS), dtype=torch.float64, device=self.args.device)
        stats = self.accelerator.reduce(stats, reduction="sum")
        scores = gather_object([torch.cat(self._eval_scores)] if self._eval_scores else [])
        self._eval_stats, self._eval_scores = None, []
        if not any(stats[STEP_STATS.index(count)] for count in ("n_lm", "n_tr", "n_cls")):
            return output  # no batch carried a target: Trainer's own result stands
        scores = torch.cat(scores).numpy() if scores else np.zeros((0, 2))
        metrics = held_out_metrics(stats.cpu(), scores[:, 0], scores[:, 1].astype(np.int64), **self._coefs())
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in metrics.items() if v is not None})
        return output

    # -- saving ---------------------------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        model = self.accelerator.unwrap_model(self.model)
        # An adapter checkpoint: the head's settings beside PEFT's files, by the writer alone (under DeepSpeed every
        # rank comes here, and Trainer's own _save returns early on the others).
        if self.args.should_save and unwrap(model) is not model:
            write_adapter_scft_config(model, output_dir if output_dir is not None else self.args.output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """What ``SCFTForCausalLM.from_pretrained`` loads, with the tokenizer and the training arguments. Every rank
        calls it (Trainer does): ZeRO-3 partitions are gathered one layer at a time, the main process writes."""
        model = self.accelerator.unwrap_model(self.model)
        if _internal_call and unwrap(model) is not model:
            # A PEFT run's checkpoints stay PEFT's adapter files (the head is among its modules_to_save): what
            # Trainer resumes from. The final save_model() writes the merged model.
            return super().save_model(output_dir, _internal_call=True)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        # ZeRO-3: around the export's gathers, what DeepSpeed does around its own (the engine's consolidated state
        # dict, save_checkpoint): every parameter partitioned first, the persistent ones gathered again after. A
        # forward without its backward (HeldOutSummary's evaluation after training) leaves the parameters ZeRO-3
        # prefetched for the backward in flight, and gathering one of them fails ("Cannot partition a param in
        # flight").
        optimizer = getattr(self.model_wrapped, "optimizer", None)
        checkpoint_event = hasattr(optimizer, "checkpoint_event_prologue")
        if checkpoint_event:
            optimizer.checkpoint_event_prologue()
        try:
            export_model(model, output_dir, tokenizer if self.args.should_save else None)
        finally:
            if checkpoint_event:
                optimizer.checkpoint_event_epilogue()
        if self.args.should_save:
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)


class SCFTTrainer(SCFTTrainerMixin, Trainer):
    """``transformers.Trainer`` (same constructor) for a model ``apply_scft_fast`` patched; see the module doc."""
