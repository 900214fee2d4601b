"""``scft-fast train --report-to``: transformers' own logging integrations, driven by our loop.

The loop is no Trainer, but Trainer's integrations (``TensorBoardCallback``, ``WandbCallback``, ...) only read a
``TrainingArguments``, a ``TrainerState`` and the logged dict: the Reporter hands them exactly those, on rank 0,
so a run logs the records of metrics.jsonl under the names and layout Trainer's runs use (``train/lm_loss``...).
"""
from __future__ import annotations

import os

REPORT_TO = ("none", "tensorboard", "wandb")


class Reporter:
    def __init__(self, report_to: str, output_dir: str, max_steps: int, model=None, enabled: bool = True):
        if report_to not in REPORT_TO:
            raise ValueError(f"--report-to must be one of {REPORT_TO}, got {report_to!r}")
        self.handler = None
        if report_to == "none" or not enabled:
            return
        from transformers import TrainingArguments
        from transformers.integrations import get_reporting_integration_callbacks
        from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

        self.args = TrainingArguments(output_dir=output_dir, report_to=[report_to], max_steps=max_steps,
                                      run_name=os.path.basename(os.path.abspath(output_dir)), logging_steps=1)
        self.state = TrainerState(max_steps=max_steps, is_local_process_zero=True, is_world_process_zero=True)
        self.control = TrainerControl()
        callbacks = [callback() for callback in get_reporting_integration_callbacks(self.args.report_to)]
        self.handler = CallbackHandler(callbacks, model, None, None, None)
        self.handler.on_train_begin(self.args, self.state, self.control)

    def log(self, record: dict) -> None:
        """One metrics.jsonl record; its ``step`` is the global step, its numbers are the logged values."""
        if self.handler is None:
            return
        self.state.global_step = record["step"]
        self.state.epoch = record.get("epoch")
        logs = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.handler.on_log(self.args, self.state, self.control, logs=logs)

    def close(self) -> None:
        if self.handler is not None:
            self.handler.on_train_end(self.args, self.state, self.control)
            self.handler = None
