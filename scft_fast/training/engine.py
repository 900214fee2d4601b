"""Optimizer steps on one process (TorchEngine) or on DeepSpeed ZeRO 1/2/3 (DeepSpeedEngine), one interface.

Gradient normalization is the loop's business, not the engine's: the loop passes batch-wide token and label
counts to the model (num_items_in_batch / num_cls_in_batch) so each micro-batch's loss is already its share of
the large-batch loss. Neither engine divides by the accumulation steps; DeepSpeed's average over ranks is
undone by counts divided by the world size (see loop.py).
"""
from __future__ import annotations

import math
import os

import torch

from .config import OptimSpec, TrainConfig
from .export import export_model
from .zero_memory import master_weights_shared


def lr_lambda(optim: OptimSpec, total_steps: int):
    warmup = optim.warmup_steps_for(total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, optim: OptimSpec, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay, foreach=False)
    return optimizer, build_scheduler(optimizer, optim, total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSpec, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, total_steps))


def restate_optim(scheduler, optim: OptimSpec) -> None:
    """After loading a checkpoint: the command line's lr and weight decay replace the checkpoint's (LambdaLR
    restores its base_lrs, the optimizer its groups' hyperparameters); the schedule's lambda is always the new
    one. Unchanged settings give back the saved values bit for bit (the same product LambdaLR computes)."""
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler.base_lrs = [optim.lr] * len(scheduler.base_lrs)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"], group["lr"], group["weight_decay"] = optim.lr, optim.lr * factor, optim.weight_decay
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class TorchEngine:
    """A single process: AdamW, clipping, the LR schedule; bf16 through autocast over float32 weights."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, total_steps: int, device: torch.device):
        self.module = model.to(device)
        self.device = device
        self.config = config
        self.optimizer, self.scheduler = build_optimizer(model, config.optim, total_steps)

    def forward(self, **batch):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for p in self.module.parameters() if p.requires_grad]
        clip = self.config.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def micro_step(self) -> None:
        """Called after each micro-batch's backward but the step's last, which ``step`` closes; DeepSpeed counts
        them, a single process does not need to."""

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: str) -> None:
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, os.path.join(directory, "engine.pt"))

    def load(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, "engine.pt"), map_location=self.device, weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restate_optim(self.scheduler, self.config.optim)

    def save_model(self, path: str) -> None:
        export_model(self.module, path)

    def eval_forward(self, **batch):
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            return self.module(**batch)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1/2/3 (+ offload). The JSON's optimizer / scheduler sections, when present, are DeepSpeed's
    to build (their "auto" fields filled from our flags); otherwise our AdamW and schedule are the client
    optimizer and scheduler. ``ds_config``: resolve_deepspeed_config's result (its ``.config`` dict)."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, total_steps: int, device: torch.device,
                 ds_config: dict):
        import deepspeed

        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if "optimizer" in ds_config:
            optimizer = None
        else:
            optimizer, _ = build_optimizer(model, config.optim, total_steps)
        # A callable: DeepSpeed calls it on the optimizer it ends up with (ours or the JSON's).
        scheduler = None if "scheduler" in ds_config else (lambda opt: build_scheduler(opt, config.optim,
                                                                                      total_steps))
        with master_weights_shared():  # no second float32 copy under ZeRO-3 (zero_memory.py)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                model_parameters=[p for p in model.parameters() if p.requires_grad])
        self.module = self.engine.module
        self.device, self.optim = device, config.optim
        self.own_schedule = "scheduler" not in ds_config  # restate_optim knows our LambdaLR only

    def forward(self, **batch):
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def micro_step(self) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> float | None:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, directory: str) -> None:
        # Every rank writes its own ZeRO partition of the optimizer (and, under ZeRO-3, of the weights).
        self.engine.save_checkpoint(directory, tag="engine", save_latest=False)

    def load(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/engine")
        if self.own_schedule:
            restate_optim(self.scheduler, self.optim)

    def save_model(self, path: str) -> None:
        """Every rank must call this. ZeRO-3: gathered one layer at a time, written by rank 0 in shards
        (export.save_zero3_merged); ZeRO-1/2: every rank holds the weights, rank 0 writes them."""
        export_model(self.module, path)

    def eval_forward(self, **batch):
        with torch.no_grad():
            return self.engine(**batch)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)
