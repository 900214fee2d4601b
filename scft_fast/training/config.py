"""Training configuration: dataclasses whose defaults run (the tiny preset on the embedded data, on CPU)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..data.constants import MAX_LENGTH, REFUSAL_STRING

LOSS_MODES = ("full", "fused-lm", "hf")
TINY_PRESET = "tiny"


@dataclass
class ModelSpec:
    name_or_path: str = TINY_PRESET  # a local HF causal LM / SCFT checkpoint, or a preset name (presets.py)
    pool: str = "eos"  # "eos" | "pre_eos"
    lora_rank: int = 0  # > 0: LoRA on the base model's linear layers, the head fully trained
    gradient_checkpointing: bool = False


@dataclass
class LossSpec:
    mode: str = "full"  # "full": LM + RTO + head | "fused-lm": fused LM loss only | "hf": the model's own loss
    lm_coef: float = 1.0
    transition_coef: float = 1.0
    cls_coef: float = 1.0
    backend: str = "auto"

    def __post_init__(self):
        if self.mode not in LOSS_MODES:
            raise ValueError(f"loss mode must be one of {LOSS_MODES}, got {self.mode!r}")


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


@dataclass
class OptimSpec:
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: str = "cosine"  # "cosine" (to 10% of lr) | "constant"
    grad_clip: float = 1.0  # also DeepSpeed's gradient_clipping (its own default is 1.0 too, stated here)


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
