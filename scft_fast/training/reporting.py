"""How a run reports: its summary as text for the terminal (format_summary), and ``scft-fast train --report-to``,
transformers' own logging integrations driven by our loop.

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


def format_summary(s: dict) -> str:
    """train()'s summary as the lines `scft-fast train` prints: losses, held-out sets side by side, optimizer."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"trained {s['steps']} steps ({s['loss_mode']} loss, {s['world_size']} rank(s)); model: {s['model_dir']}"]
    first, last = s["losses_first_10pct"], s["losses_last_10pct"]
    for key in first:
        lines.append(f"  {key:16s} {fmt(first[key])} -> {fmt(last[key])}  (mean of the first / last 10% of steps)")
    titles = s.get("eval_sets") or {}  # one column per held-out set: same generator, separate generator

    def cell(name, key):
        return f"{fmt(s[f'{name}_before'][key])} -> {fmt(s[f'{name}_after'][key])}"

    if titles:
        lines.append(f"  {'held-out, before -> after':36s}" + "".join(f"  {t:18s}" for t in titles.values()))
        for key, label in (("head_accuracy", "head accuracy"), ("head_auroc", "head AUROC"),
                           ("head_fpr", "head FPR (p_unsafe > 0.5)"), ("head_tpr", "head TPR (p_unsafe > 0.5)"),
                           ("refusal_prob_rto", "P(refusal token) on RTO positions")):
            lines.append(f"  {label:36s}" + "".join(f"  {cell(name, key):18s}" for name in titles))
    o = s.get("optimizer")
    if o:
        lines.append(f"  optimizer: {o['optimizer']}, lr {o['lr']:g}, weight decay {o['weight_decay']:g}, schedule "
                     f"{o['scheduler']}, warmup {o['warmup_steps']} steps ({o['recipe']})")
    if s["tokens_per_s"] is not None:
        lines.append(f"  tokens/s {s['tokens_per_s']:.0f}")
    return "\n".join(lines)
