"""Optimizer steps on one process (TorchEngine) or on DeepSpeed ZeRO 1/2/3 (DeepSpeedEngine), one interface.

Gradient normalization is the loop's business, not the engine's: the loop passes batch-wide token and label
counts to the model (num_items_in_batch / num_cls_in_batch) so each micro-batch's loss is already its share of
the large-batch loss. Neither engine divides by the accumulation steps; DeepSpeed's average over ranks is
undone by counts divided by the world size (see loop.py).
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.distributed as dist

from ..model import merged_state_dict
from .config import OptimSpec, TrainConfig


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies that keep tied tensors tied (one copy per storage), so that the HF save drops the tied key."""
    copies, out = {}, {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def lr_lambda(optim: OptimSpec, total_steps: int):
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, optim: OptimSpec, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, total_steps))
    return optimizer, scheduler


class TorchEngine:
    """A single process: AdamW, clipping, the LR schedule; bf16 through autocast over float32 weights."""

    world_size, rank = 1, 0

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
        """Called after every micro-batch's backward; DeepSpeed counts them, a single process does not need to."""

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

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return cpu_copy(merged_state_dict(self.module))

    def eval_forward(self, **batch):
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            return self.module(**batch)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)


def deepspeed_config(path: str, config: TrainConfig, world_size: int) -> dict:
    """The JSON config with our batch geometry, clipping and precision filled in wherever it says "auto"."""
    with open(path) as f:
        ds = json.load(f)
    mb, gas = config.data.micro_batch_size, config.grad_accum
    fill = {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": gas,
            "train_batch_size": mb * gas * world_size, "gradient_clipping": config.optim.grad_clip}
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ValueError(f"{path}: {key} = {ds[key]} disagrees with the command line ({value}); set it to \"auto\"")
    for precision in ("bf16", "fp16"):
        section = ds.setdefault(precision, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = config.bf16 if precision == "bf16" else False
    zero = ds.get("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # Our optimizer is torch's AdamW (identical on every engine, no C++ build); DeepSpeed's CPU Adam is an
        # optional speed-up it would otherwise insist on.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1/2/3 (+ offload) with our AdamW and schedule as client optimizer and scheduler."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, total_steps: int, device: torch.device):
        import deepspeed

        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        ds_config = deepspeed_config(config.deepspeed, config, self.world_size)
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        optimizer, scheduler = build_optimizer(model, config.optim, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            model_parameters=[p for p in model.parameters() if p.requires_grad])
        self.module = self.engine.module
        self.device = device

    def forward(self, **batch):
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def micro_step(self) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

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

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank must call this; rank 0 gets full-shape CPU tensors (others an empty dict)."""
        import deepspeed

        params = list(self.module.parameters())
        if self.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = cpu_copy(merged_state_dict(self.module))
        else:
            state = cpu_copy(merged_state_dict(self.module))
        return state if self.rank == 0 else {}

    def eval_forward(self, **batch):
        with torch.no_grad():
            return self.engine(**batch)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)
