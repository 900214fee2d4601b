"""The run's settings as dataclasses that ``transformers.HfArgumentParser`` turns into ``scft-fast train``'s flags:
``ModelArguments`` (the model and its SCFT head: an ``SCFTConfig``), ``DataArguments`` (the data recipe: a
``DataConfig``, whose defaults it reads) and ``SCFTTrainingArguments`` (``TrainingArguments`` with the optimizer
recipe's defaults). Each TrainingArguments field is its own flag (``--learning_rate`` / ``--learning-rate``);
the flags older releases of ``scft-fast train`` had keep working as aliases (``--lr``, ``--micro-batch-size``).

The optimizer recipe depends on the model (``RECIPES``): the tiny preset's values are sized for its
random-initialized 2-layer model; a checkpoint gets DeRTa's (lr 2e-5 full-parameter, 1e-4 with LoRA, warmup 3% of
the steps, weight decay 0); a flag given on the command line wins.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import torch
from transformers import TrainingArguments

from ..constants import POOLS
from ..data.config import DataConfig
from ..data.constants import CLS_LABELS, MIN_LENGTH, TRUNCATIONS
from ..errors import ConfigError
from ..ops.backends import BACKENDS
from .config import SCFTConfig

PRESETS = ("tiny", "tiny-tied")
DATA = DataConfig()  # the data recipe's defaults, which the flags take
HEAD = SCFTConfig()

# lr / weight decay / warmup per kind of run, for what the command line leaves unset. On a pretrained checkpoint
# the tiny preset's would wreck it (lr 3e-3 took a 156M checkpoint's cls_loss from 0.79 to 7.64 in 3 steps).
RECIPES = {
    "tiny preset": dict(learning_rate=3e-3, weight_decay=0.0, warmup_steps=10),
    "DeRTa full-parameter": dict(learning_rate=2e-5, weight_decay=0.0, warmup_steps=0.03),
    "DeRTa LoRA": dict(learning_rate=1e-4, weight_decay=0.0, warmup_steps=0.03),
}


def recipe_of(model: str, lora_rank: int) -> str:
    if model in PRESETS:
        return "tiny preset"
    return "DeRTa LoRA" if lora_rank > 0 else "DeRTa full-parameter"


def _help(text: str, *aliases: str) -> dict:
    return {"help": text, **({"aliases": list(aliases)} if aliases else {})}


@dataclass
class ModelArguments:
    model: str = field(default="tiny", metadata=_help(
        "local HF causal LM or SCFT checkpoint directory, or a preset: 'tiny' (a small random-initialized Llama "
        "over the embedded tokenizer), 'tiny-tied' (its embeddings tied)"))
    pool: Literal[POOLS] = field(default=HEAD.pool, metadata=_help(
        "the classifier's token: eos (SCFT) or the one before it (free at inference)"))
    head_bias: bool | None = field(default=None, metadata={**_help(
        "give a new SCFT head a bias (default: none, so that it exports to AutoModelForSequenceClassification; "
        "a checkpoint's head keeps its own; --no-head-bias: refuse a head with one)"), "nargs": "?", "const": True})
    lm_coef: float = field(default=HEAD.lm_coef, metadata=_help("weight of the LM term"))
    transition_coef: float = field(default=HEAD.transition_coef, metadata=_help("weight of DeRTa's RTO term"))
    cls_coef: float = field(default=HEAD.cls_coef, metadata=_help("weight of SCFT's classification term"))
    backend: Literal[BACKENDS] = field(default=HEAD.backend, metadata=_help(
        "safety_loss backend (triton needs a CUDA GPU, or TRITON_INTERPRET=1)"))
    chunk_size: int | None = field(default=None, metadata=_help(
        "safety_loss rows per chunk of the vocabulary pass (default: chosen from the shapes)"))
    lora_rank: int = field(default=0, metadata=_help(
        "LoRA rank on the base model's linear layers, the head trained fully (0: full fine-tuning)"))
    lora_alpha: float | None = field(default=None, metadata=_help(
        "LoRA scaling numerator, the update is alpha / rank * B A (default: 2 * rank)"))
    lora_dropout: float = field(default=0.0, metadata=_help("dropout on LoRA's input"))
    lora_target_modules: str = field(default="all-linear", metadata=_help(
        "comma-separated module names LoRA adapts, or all-linear; DeRTa's 70B recipe: --lora-rank 96 --lora-alpha "
        "16 --lora-dropout 0.05 --lora-target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"))

    def __post_init__(self):
        for name in ("lm_coef", "transition_coef", "cls_coef", "lora_dropout"):
            _check(name, getattr(self, name), "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
        _check("lora_dropout", self.lora_dropout, "a number in [0, 1]", lambda v: v <= 1)
        _check("lora_rank", self.lora_rank, "a non-negative integer", lambda v: v >= 0)
        if self.lora_alpha is not None:
            _check("lora_alpha", self.lora_alpha, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)
        if self.chunk_size is not None:
            _check("chunk_size", self.chunk_size, "a positive integer", lambda v: v > 0)
        if not self.lora_target_modules.strip():
            raise ConfigError("argument --lora-target-modules: expected module names or all-linear, got ''")

    def scft_config(self, refusal_token_id: int, saved: SCFTConfig | None = None) -> SCFTConfig:
        """The head's settings: a checkpoint's head keeps its shape (classes, bias), these flags say how it trains."""
        head = saved or SCFTConfig()
        if self.head_bias is not None and saved is not None and self.head_bias != head.head_bias:
            raise ConfigError(f"--{'' if self.head_bias else 'no-'}head-bias: the SCFT head of {self.model} has "
                              f"{'no' if self.head_bias else 'a'} bias, and a checkpoint's head keeps its shape")
        return SCFTConfig(**{**asdict(head), "refusal_token_id": refusal_token_id, "pool": self.pool,
                             "lm_coef": self.lm_coef, "transition_coef": self.transition_coef,
                             "cls_coef": self.cls_coef, "backend": self.backend, "chunk_size": self.chunk_size,
                             "head_bias": head.head_bias if self.head_bias is None else self.head_bias})

    @property
    def target_modules(self) -> list[str] | str:
        text = self.lora_target_modules.strip()
        return text if text == "all-linear" else [m.strip() for m in text.split(",") if m.strip()]


@dataclass
class DataArguments:
    data: list[str] | None = field(default=None, metadata=_help(
        "training JSONL files (DeRTa, triple or chat format; default: the embedded dataset)"))
    eval_data: list[str] | None = field(default=None, metadata=_help(
        "held-out JSONL files for the before/after summary (default: the embedded eval and separate splits when "
        "--data is not given, else none)"))
    eval_samples: int = field(default=1024, metadata=_help(
        "held-out samples scored before and after training per split, 0: no summary"))
    max_length: int = field(default=DATA.max_length, metadata=_help(
        f"longest sample in tokens, at least {MIN_LENGTH}; longer ones lose prompt tokens first"))
    truncation: Literal[TRUNCATIONS] = field(default=DATA.truncation, metadata=_help(
        "a sample longer than --max-length: prompt: cut the prompt's start first, then the target's end | drop: "
        "leave it out"))
    packing: bool = field(default=False, metadata=_help(
        "pack each micro-batch's sequences into one row (block-diagonal attention, no padding)"))
    rto_keep: float = field(default=DATA.rto_keep, metadata=_help(
        "fraction of RTO positions kept per sample, in (0, 1] (DeRTa's full-parameter recipe: 0.05)"))
    vanilla_safety: bool = field(default=DATA.vanilla_safety, metadata=_help(
        "also train each harmful triple's instruction -> refusal, labeled safe for the head "
        "(--no-vanilla-safety: off)"))
    prefix_label: Literal[tuple(CLS_LABELS)] | None = field(default=DATA.prefix_label, metadata=_help(
        "head label of the harmful-prefix samples (harmful-response prefix as context, refusal as target; default: "
        "unlabeled)"))
    refusal_string: str = field(default=DATA.refusal_string, metadata=_help("its first token is the RTO target"))
    skip_invalid: bool = field(default=False, metadata=_help(
        "skip and count invalid records instead of stopping at the first with its file and line"))
    num_proc: int = field(default=DATA.num_proc, metadata=_help("processes for tokenization"))
    cache_dir: str | None = field(default=None, metadata=_help(
        "cache of the tokenized datasets (default: the datasets library's)"))

    def __post_init__(self):
        _check("rto_keep", self.rto_keep, "a number in (0, 1]", lambda v: 0 < v <= 1)
        _check("max_length", self.max_length, f"an integer >= {MIN_LENGTH}", lambda v: v >= MIN_LENGTH)
        _check("eval_samples", self.eval_samples, "a non-negative integer", lambda v: v >= 0)
        _check("num_proc", self.num_proc, "a positive integer", lambda v: v > 0)
        if not self.refusal_string.strip():
            raise ConfigError("argument --refusal-string: expected a non-empty string")

    def data_config(self, pool: str, seed: int) -> DataConfig:
        shared = {f.name: getattr(self, f.name) for f in fields(DataConfig) if hasattr(self, f.name)}
        return DataConfig(**{**shared, "pool": pool, "seed": seed})


@dataclass
class SCFTTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the recipe's defaults for a safety fine-tuning run: the tiny preset's optimizer
    settings (``RECIPES``), AdamW's beta2 0.95, cosine decay to 10% of the peak, a log every step with NaN kept
    visible (``logging_nan_inf_filter`` off), a checkpoint every 100 steps, two kept."""

    output_dir: str | None = field(default="scft-output", metadata=_help(
        "metrics, checkpoints, plot, summary and the final model (model/)"))
    max_steps: int = field(default=200, metadata=_help(
        "optimizer steps; -1 (or 0): run --num-train-epochs"))
    num_train_epochs: float = field(default=1.0, metadata=_help(
        "epochs to run when --max-steps is -1", "--epochs"))
    per_device_train_batch_size: int = field(default=16, metadata=_help(
        "sequences per micro-batch and rank", "--micro-batch-size"))
    per_device_eval_batch_size: int = field(default=16, metadata=_help("sequences per evaluation batch and rank"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "micro-batches per optimizer step and rank", "--grad-accum"))
    learning_rate: float = field(default=RECIPES["tiny preset"]["learning_rate"], metadata=_help(
        "peak learning rate (default: the recipe's: 3e-3 for a preset; for a checkpoint DeRTa's 2e-5, or 1e-4 "
        "with --lora-rank)", "--lr"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (default: the recipe's, 0)"))
    warmup_steps: float = field(default=RECIPES["tiny preset"]["warmup_steps"], metadata=_help(
        "linear warmup: steps, or a fraction of the steps below 1 (default: the recipe's: 10 for a preset, 0.03 of "
        "the steps for a checkpoint)"))
    adam_beta2: float = field(default=0.95, metadata=_help("AdamW's beta2"))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW's epsilon", "--eps"))
    max_grad_norm: float = field(default=1.0, metadata=_help("max gradient norm, 0: off", "--grad-clip"))
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata=_help(
        "learning-rate schedule after warmup (transformers' names; default: cosine down to min_lr_rate 0.1 of the "
        "peak, set by --lr-scheduler-kwargs)"))
    lr_scheduler_kwargs: dict | str | None = field(default_factory=lambda: {"min_lr_rate": 0.1}, metadata=_help(
        "the schedule's keyword arguments, as JSON"))
    logging_steps: float = field(default=1, metadata=_help("log every N steps"))
    logging_nan_inf_filter: bool = field(default=False, metadata=_help(
        "log the running mean in place of a NaN or infinite loss (off: a divergence shows, and stops the run)"))
    save_steps: float = field(default=100, metadata=_help("checkpoint every N steps", "--save-every"))
    save_total_limit: int | None = field(default=2, metadata=_help(
        "checkpoints kept (None: all)", "--keep-checkpoints"))
    report_to: None | str | list[str] = field(default="none", metadata=_help(
        "also log through transformers' integrations: tensorboard (under OUTPUT_DIR/runs), wandb, ..."))
    seed: int = field(default=0, metadata=_help("model init, data order and RTO sampling"))
    disable_tqdm: bool | None = field(default=None, metadata=_help("no progress bar (also: --no-progress)"))
    # Without CUDA, accelerate starts torchrun's ranks over gloo only when told use_cpu; otherwise every rank would
    # set up a one-process run of its own and train the whole data alone.
    use_cpu: bool = field(default=not torch.cuda.is_available(), metadata=_help(
        "train on the CPU (default: when no CUDA device is visible)"))
    activation_checkpointing_kwargs: dict | str | None = field(default_factory=lambda: {"use_reentrant": False},
                                                               metadata=_help(
        "activation (gradient) checkpointing's keyword arguments, as JSON (default: non-reentrant, which LoRA and "
        "ZeRO-3 need)"))

    def __post_init__(self):
        finite = math.isfinite
        for name, expected, ok in (
                ("max_steps", "an integer >= -1", lambda v: v >= -1),
                ("num_train_epochs", "a finite number > 0", lambda v: finite(v) and v > 0),
                ("per_device_train_batch_size", "a positive integer", lambda v: v > 0),
                ("per_device_eval_batch_size", "a positive integer", lambda v: v > 0),
                ("gradient_accumulation_steps", "a positive integer", lambda v: v > 0),
                ("learning_rate", "a finite number > 0", lambda v: finite(v) and v > 0),
                ("weight_decay", "a finite number >= 0", lambda v: finite(v) and v >= 0),
                ("warmup_steps", "a number >= 0 (steps, or a fraction of them below 1)", lambda v: finite(v) and v >= 0),
                ("adam_epsilon", "a finite number > 0", lambda v: finite(v) and v > 0),
                ("adam_beta1", "a number in [0, 1)", lambda v: 0 <= v < 1),
                ("adam_beta2", "a number in [0, 1)", lambda v: 0 <= v < 1),
                ("max_grad_norm", "a finite number >= 0", lambda v: finite(v) and v >= 0),
                ("save_steps", "a number >= 0", lambda v: finite(v) and v >= 0),
                ("logging_steps", "a number > 0", lambda v: finite(v) and v > 0)):
            _check(name, getattr(self, name), expected, ok, type(self))
        if self.save_total_limit is not None:
            _check("save_total_limit", self.save_total_limit, "a non-negative integer", lambda v: v >= 0, type(self))
        if self.max_steps == 0:
            self.max_steps = -1  # 0: the epochs decide
        if self.save_steps == 0:
            self.save_strategy = "no"  # --save-every 0: no checkpoint
        if self.save_total_limit == 0:
            self.save_total_limit = None  # --keep-checkpoints 0: all
        super().__post_init__()


def flag_of(kind, name: str) -> str:
    """The command-line flag of field ``name`` of dataclass ``kind``: its first alias, else ``--name-with-dashes``."""
    field_ = kind.__dataclass_fields__.get(name)
    aliases = (field_.metadata.get("aliases") if field_ is not None else None) or []
    return aliases[0] if aliases else "--" + name.replace("_", "-")


def _check(name: str, value, expected: str, ok, kind=None) -> None:
    if value is None or not ok(value):
        flag = flag_of(kind, name) if kind is not None else "--" + name.replace("_", "-")
        raise ConfigError(f"argument {flag}: expected {expected}, got {value}")
