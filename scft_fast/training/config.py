"""Training configuration: dataclasses whose defaults run (the tiny preset on the embedded data, on CPU)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..data.constants import MAX_LENGTH, REFUSAL_STRING

TINY_PRESET = "tiny"


@dataclass
class ModelSpec:
    name_or_path: str = TINY_PRESET  # a local HF causal LM / SCFT checkpoint, or a preset name (presets.py)
    pool: str = "eos"  # "eos" | "pre_eos"
    lora_rank: int = 0  # > 0: LoRA on the base model's linear layers, the head fully trained
    lora_alpha: float | None = None  # None: 2 * lora_rank
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"  # PEFT's target_modules ("all-linear" or module names)
    gradient_checkpointing: bool = False


@dataclass
class LossSpec:
    lm_coef: float = 1.0
    transition_coef: float = 1.0
    cls_coef: float = 1.0
    backend: str = "auto"


@dataclass
class DataSpec:
    files: list[str] | None = None  # JSONL files; None: the embedded dataset
    eval_files: list[str] | None = None  # None: the embedded eval split with the embedded data, else none
    max_length: int = MAX_LENGTH
    packing: bool = False  # several sequences per row, block-diagonal attention, no padding
    max_tokens: int | None = None  # packed micro-batch budget; None: micro_batch_size * longest sample
    micro_batch_size: int = 16
    # The demo's recipe (measured on the separate-generator split, README): DeRTa's sparse RTO and vanilla refusals,
    # which give the head (harmful request, refusal) pairs labeled safe.
    rto_keep: float = 0.2
    vanilla_safety: bool = True  # also train instruction -> refusal from each harmful triple, labeled safe
    refusal_string: str = REFUSAL_STRING
    eval_samples: int = 1024  # held-out samples of each eval set scored in the summary (0: no evaluation)
    num_proc: int = 1


# Optimizer defaults per kind of run, for what the command line leaves unset. The tiny preset's are sized for
# its random-initialized 2-layer model; on a pretrained checkpoint they wreck it (issue 10 measured lr 3e-3
# taking a 156M checkpoint's cls_loss from 0.79 to 7.64 in 3 steps). A checkpoint gets DeRTa's recipe:
# full-parameter lr 2e-5, LoRA lr 1e-4, cosine, warmup ratio 0.03, and weight decay 0 (the Stanford-Alpaca
# setting their training script follows).
RECIPES = {
    "tiny preset": dict(lr=3e-3, weight_decay=0.0, warmup_steps=10, warmup_ratio=None),
    "DeRTa full-parameter": dict(lr=2e-5, weight_decay=0.0, warmup_steps=0, warmup_ratio=0.03),
    "DeRTa LoRA": dict(lr=1e-4, weight_decay=0.0, warmup_steps=0, warmup_ratio=0.03),
}


@dataclass
class OptimSpec:
    lr: float = RECIPES["tiny preset"]["lr"]
    weight_decay: float = RECIPES["tiny preset"]["weight_decay"]
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = RECIPES["tiny preset"]["warmup_steps"]
    warmup_ratio: float | None = None  # set: warmup is ceil(ratio * total steps), warmup_steps unused
    schedule: str = "cosine"  # "cosine" (to 10% of lr) | "constant"
    grad_clip: float = 1.0  # also DeepSpeed's gradient_clipping (its own default is 1.0 too, stated here)
    recipe: str = "tiny preset"  # where lr / weight decay / warmup came from (the summary says it)

    def warmup_steps_for(self, total_steps: int) -> int:
        if self.warmup_ratio is None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * total_steps)


def default_recipe(model_is_preset: bool, lora_rank: int) -> str:
    if model_is_preset:
        return "tiny preset"
    return "DeRTa LoRA" if lora_rank > 0 else "DeRTa full-parameter"


@dataclass
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    output_dir: str = "scft-output"
    max_steps: int | None = 200  # None: run the epochs
    epochs: int = 1
    grad_accum: int = 1
    deepspeed: str | None = None  # a DeepSpeed JSON config (training/zero*.json)
    bf16: bool = False
    seed: int = 0
    resume: bool = False  # continue from the newest intact checkpoint in output_dir
    resume_override: bool = False  # resume even when the data, batch geometry or model differ (run_dir.py)
    save_every: int = 100  # checkpoint every N optimizer steps (0: never)
    keep_checkpoints: int = 2
    progress: bool = True  # tqdm bar on rank 0
    summary: bool = True  # held-out evaluation before and after training
    report_to: str = "none"  # transformers' logging integration: "none" | "tensorboard" | "wandb"

    def to_dict(self) -> dict:
        return asdict(self)
