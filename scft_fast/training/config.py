"""Training configuration: dataclasses whose defaults run (the tiny preset on the embedded data, on CPU).

Each field's metadata is its `scft-fast train` flag and help (scft_fast.arguments.option): the CLI's flags are
built from these classes, so a field added here is a documented flag.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field

from ..arguments import (
    decay_rate,
    fraction,
    int_at_least,
    module_names,
    no_flag,
    non_empty_str,
    non_negative_float,
    non_negative_int,
    option,
    positive_float,
    positive_int,
    probability,
)
from ..constants import POOLS
from ..data.constants import CLS_LABELS, MAX_LENGTH, MIN_LENGTH, REFUSAL_STRING, TRUNCATIONS
from ..ops.backends import BACKENDS
from .reporting import REPORT_TO

TINY_PRESET = "tiny"


@dataclass
class ModelSpec:
    name_or_path: str = field(default=TINY_PRESET, metadata=option(
        "local HF causal LM or SCFT checkpoint directory, or a preset (default: %(default)r, a small "
        "random-initialized Llama over the embedded tokenizer; 'tiny-tied' ties its embeddings)", flag="--model"))
    pool: str = field(default="eos", metadata=option(
        "the classifier's token: eos (SCFT) or the one before it (free at inference; default: %(default)s)",
        choices=POOLS))
    lora_rank: int = field(default=0, metadata=option(
        "LoRA rank on the base model's linear layers, the head fully trained (default: %(default)s, full "
        "fine-tuning)", type=non_negative_int))
    lora_alpha: float | None = field(default=None, metadata=option(
        "LoRA scaling numerator, the update is alpha / rank * B A (default: 2 * rank)", type=positive_float))
    lora_dropout: float = field(default=0.0, metadata=option(
        "dropout on LoRA's input (default: %(default)g)", type=probability))
    # PEFT's target_modules: "all-linear" or module names.
    lora_target_modules: list[str] | str = field(default="all-linear", metadata=option(
        "comma-separated module names LoRA adapts, or all-linear (default); DeRTa's 70B recipe: --lora-rank 96 "
        "--lora-alpha 16 --lora-dropout 0.05 --lora-target-modules "
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", type=module_names, metavar="NAMES"))
    gradient_checkpointing: bool = field(default=False, metadata=option("recompute activations in backward"))
    # None: a checkpoint's head keeps its own; a new head has none (it then exports to
    # AutoModelForSequenceClassification, whose score layer has no bias).
    head_bias: bool | None = field(default=None, metadata=option(
        "give a new SCFT head a bias (default: none; a checkpoint's head keeps its own, and a different setting "
        "is refused)", action=argparse.BooleanOptionalAction))


@dataclass
class LossSpec:
    lm_coef: float = field(default=1.0, metadata=option(
        "weight of the LM term (default: %(default)g)", type=non_negative_float))
    transition_coef: float = field(default=1.0, metadata=option(
        "weight of DeRTa's RTO term (default: %(default)g)", type=non_negative_float))
    cls_coef: float = field(default=1.0, metadata=option(
        "weight of SCFT's classification term (default: %(default)g)", type=non_negative_float))
    backend: str = field(default="auto", metadata=option(
        "safety_loss backend (default: %(default)s; triton needs a CUDA GPU)", choices=BACKENDS))
    chunk_size: int | None = field(default=None, metadata=option(
        "safety_loss rows per chunk of the vocabulary pass (default: chosen from the shapes)", type=positive_int))


@dataclass
class DataSpec:
    files: list[str] | None = field(default=None, metadata=option(
        "training JSONL files (DeRTa, triple or chat format; default: the embedded dataset)", flag="--data",
        nargs="+", metavar="FILE"))
    eval_files: list[str] | None = field(default=None, metadata=option(
        "held-out JSONL files for the summary (default: the embedded eval split when --data is not given, else "
        "none)", flag="--eval-data", nargs="+", metavar="FILE"))
    max_length: int = field(default=MAX_LENGTH, metadata=option(
        f"longest sample in tokens, at least {MIN_LENGTH}; longer ones lose prompt tokens first (default: "
        "%(default)s)", type=int_at_least(MIN_LENGTH)))
    truncation: str = field(default="prompt", metadata=option(
        "a sample longer than --max-length: prompt: cut the prompt's start first, then the target's end | drop: "
        "leave it out (default: %(default)s)", choices=TRUNCATIONS))
    packing: bool = field(default=False, metadata=option(
        "pack several sequences per row (block-diagonal attention, no padding)"))
    max_tokens: int | None = field(default=None, metadata=option(
        "token budget of a packed micro-batch (with --packing; default: --micro-batch-size times the longest "
        "sample)", type=positive_int))
    micro_batch_size: int = field(default=16, metadata=option(
        "sequences per micro-batch and rank (default: %(default)s); with --packing the token budget is this times "
        "the longest sample unless --max-tokens is given", type=positive_int))
    # The demo's recipe (measured on the separate-generator split, README): DeRTa's sparse RTO and vanilla refusals,
    # which give the head (harmful request, refusal) pairs labeled safe.
    rto_keep: float = field(default=0.2, metadata=option(
        "fraction of RTO positions kept per sample, in (0, 1] (DeRTa's full-parameter recipe: 0.05; default: "
        "%(default)s)", type=fraction))
    vanilla_safety: bool = field(default=True, metadata=option(
        "also train each harmful triple's instruction -> refusal, labeled safe for the head (default: on)",
        action=argparse.BooleanOptionalAction))
    prefix_label: str | None = field(default=None, metadata=option(
        "head label of the harmful-prefix samples (harmful-response prefix as context, refusal as target; "
        "default: unlabeled)", choices=tuple(CLS_LABELS)))
    refusal_string: str = field(default=REFUSAL_STRING, metadata=option(
        "its first token is the RTO target (default: %(default)r)", type=non_empty_str))
    skip_invalid: bool = field(default=False, metadata=option(
        "skip and count invalid records instead of stopping at the first with its file and line"))
    eval_samples: int = field(default=1024, metadata=option(
        "held-out samples scored before and after training, 0: no evaluation (default: %(default)s)",
        type=non_negative_int))
    num_proc: int = field(default=1, metadata=option(
        "processes for tokenization (default: %(default)s)", type=positive_int))
    cache_dir: str | None = field(default=None, metadata=option(
        "cache of the tokenized datasets (default: the datasets library's)", metavar="DIR"))


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
_TINY, _FULL, _LORA = RECIPES.values()


@dataclass
class OptimSpec:
    lr: float = field(default=_TINY["lr"], metadata=option(
        f"peak learning rate (default: the recipe's: {_TINY['lr']:g} for a preset; with --model a checkpoint, "
        f"DeRTa's {_FULL['lr']:g} for full-parameter training, {_LORA['lr']:g} with --lora-rank)",
        type=positive_float, cli_default=None))
    weight_decay: float = field(default=_TINY["weight_decay"], metadata=option(
        "AdamW weight decay (default: the recipe's, 0 for each)", type=non_negative_float, cli_default=None))
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata=option(
        "AdamW's betas (default: 0.9 0.95)", type=decay_rate, nargs=2, metavar=("BETA1", "BETA2")))
    eps: float = field(default=1e-8, metadata=option("AdamW's epsilon (default: %(default)g)", type=positive_float))
    warmup_steps: int = field(default=_TINY["warmup_steps"], metadata=option(
        f"linear warmup steps (default: the recipe's: {_TINY['warmup_steps']} for a preset; for a checkpoint a "
        f"warmup ratio of {_FULL['warmup_ratio']} of the steps, as DeRTa)", type=non_negative_int, cli_default=None))
    # Set: warmup is ceil(ratio * total steps), warmup_steps unused.
    warmup_ratio: float | None = field(default=_TINY["warmup_ratio"], metadata=option(
        "linear warmup as a fraction of the steps, in (0, 1]; overrides --warmup-steps", type=fraction,
        cli_default=None))
    schedule: str = field(default="cosine", metadata=option(
        "LR schedule after warmup (default: cosine down to 10%%)", choices=("cosine", "constant")))
    # Also DeepSpeed's gradient_clipping (its own default is 1.0 too, stated here).
    grad_clip: float = field(default=1.0, metadata=option(
        "max gradient norm, 0: off (default: %(default)s)", type=non_negative_float))
    recipe: str = field(default="tiny preset", metadata=no_flag(
        "where lr / weight decay / warmup came from, for the summary: the CLI writes it"))

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
    output_dir: str = field(default="scft-output", metadata=option(
        "metrics, checkpoints, plot and final model (default: %(default)s)"))
    # None: run the epochs.
    max_steps: int | None = field(default=200, metadata=option(
        "optimizer steps (default: %(field_default)s unless --epochs is given); 0: run --epochs",
        type=non_negative_int, cli_default=None))
    epochs: int = field(default=1, metadata=option(
        "epochs to run when --max-steps is not given (default: %(field_default)s)", type=positive_int,
        cli_default=None))
    grad_accum: int = field(default=1, metadata=option(
        "micro-batches per optimizer step and rank (default: %(default)s)", type=positive_int))
    deepspeed: str | None = field(default=None, metadata=option(
        "DeepSpeed JSON config (training/zero1.json, zero2, zero3, zero3_offload, zero3_bf16); \"auto\" fields are "
        "filled from these flags. Needed for more than one rank; run under torchrun or the deepspeed launcher",
        metavar="CONFIG"))
    bf16: bool = field(default=False, metadata=option(
        "bfloat16 compute (autocast on one process, DeepSpeed's bf16 mode under --deepspeed)"))
    seed: int = field(default=0, metadata=option(
        "model init, data order and RTO sampling (default: %(default)s)", type=non_negative_int))
    resume: bool = field(default=False, metadata=option(
        "continue the run in --output-dir from its newest intact checkpoint (without it, a directory that already "
        "holds a run is refused)"))
    resume_override: bool = field(default=False, metadata=option(
        "with --resume: accept data, batch-geometry, model or seed settings that differ from the checkpoint's run "
        "(they change what the run means; the batches continue from the checkpoint's step under the new "
        "settings)"))
    save_every: int = field(default=100, metadata=option(
        "checkpoint every N steps, 0: never (default: %(default)s)", type=non_negative_int))
    keep_checkpoints: int = field(default=2, metadata=option(
        "checkpoints kept, 0: all (default: %(default)s)", type=non_negative_int))
    progress: bool = field(default=True, metadata=option("no tqdm bar", flag="--no-progress", action="store_false"))
    summary: bool = field(default=True, metadata=no_flag(
        "held-out evaluation before and after training: the CLI sets it from --eval-samples > 0"))
    report_to: str = field(default="none", metadata=option(
        "also log every step through transformers' integration: tensorboard (under OUTPUT_DIR/runs) or wandb "
        "(WANDB_MODE=offline for no account; untested) (default: %(default)s)", choices=REPORT_TO))

    def to_dict(self) -> dict:
        return asdict(self)
