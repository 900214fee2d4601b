"""`scft-fast train` / `python -m scft_fast.train`: argument parsing only; the work is scft_fast.training.train.

One process:       scft-fast train --max-steps 200
Several ranks:     torchrun --nproc_per_node 8 -m scft_fast.train --deepspeed training/zero3.json ...
                   deepspeed --num_gpus 8 --module scft_fast.train --deepspeed training/zero3.json ...
"""
from __future__ import annotations

import argparse

from .arguments import (
    add_debug_flag,
    cli_main,
    fraction,
    int_at_least,
    non_empty_str,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from .constants import POOLS
from .data.constants import MIN_LENGTH
from .ops.backends import BACKENDS
from .training.config import (
    LOSS_MODES,
    RECIPES,
    TINY_PRESET,
    DataSpec,
    LossSpec,
    ModelSpec,
    OptimSpec,
    TrainConfig,
    default_recipe,
)
from .training.presets import PRESETS
from .training.reporting import REPORT_TO

_D, _O, _T = DataSpec(), OptimSpec(), TrainConfig()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="scft-fast train", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=TINY_PRESET,
                   help=f"local HF causal LM or SCFT checkpoint directory, or a preset (default: {TINY_PRESET!r}, a "
                        "small random-initialized Llama over the embedded tokenizer; 'tiny-tied' ties its embeddings)")
    p.add_argument("--data", nargs="+", metavar="FILE", default=None,
                   help="training JSONL files (DeRTa, triple or chat format; default: the embedded dataset)")
    p.add_argument("--eval-data", nargs="+", metavar="FILE", default=None,
                   help="held-out JSONL files for the summary (default: the embedded eval split when --data is not "
                        "given, else none)")
    p.add_argument("--output-dir", default=_T.output_dir, help="metrics, checkpoints, plot and final model "
                                                               f"(default: {_T.output_dir})")
    p.add_argument("--max-steps", type=non_negative_int, default=None,
                   help=f"optimizer steps (default: {_T.max_steps} unless --epochs is given); 0: run --epochs")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"epochs to run when --max-steps is not given (default: {_T.epochs})")
    p.add_argument("--deepspeed", metavar="CONFIG", default=None,
                   help="DeepSpeed JSON config (training/zero1.json, zero2, zero3, zero3_offload, zero3_bf16); "
                        "\"auto\" fields are filled from these flags. Needed for more than one rank; run under "
                        "torchrun or the deepspeed launcher")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (autocast on one process, DeepSpeed's "
                                                        "bf16 mode under --deepspeed)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (default: the recipe's: 3e-3 for a preset; with --model a checkpoint, "
                        "DeRTa's 2e-5 for full-parameter training, 1e-4 with --lora-rank)")
    p.add_argument("--weight-decay", type=non_negative_float, default=None,
                   help="AdamW weight decay (default: the recipe's, 0 for each)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=None,
                   help="linear warmup steps (default: the recipe's: 10 for a preset; for a checkpoint a warmup "
                        "ratio of 0.03 of the steps, as DeRTa)")
    p.add_argument("--warmup-ratio", type=fraction, default=None,
                   help="linear warmup as a fraction of the steps, in (0, 1]; overrides --warmup-steps")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=_O.schedule,
                   help="LR schedule after warmup (default: cosine down to 10%%)")
    p.add_argument("--grad-clip", type=non_negative_float, default=_O.grad_clip,
                   help=f"max gradient norm, 0: off (default: {_O.grad_clip})")
    p.add_argument("--micro-batch-size", type=positive_int, default=_D.micro_batch_size,
                   help=f"sequences per micro-batch and rank (default: {_D.micro_batch_size}); with --packing the "
                        "token budget is this times the longest sample unless --max-tokens is given")
    p.add_argument("--grad-accum", type=positive_int, default=_T.grad_accum,
                   help="micro-batches per optimizer step and rank (default: 1)")
    p.add_argument("--max-length", type=int_at_least(MIN_LENGTH), default=_D.max_length,
                   help=f"longest sample in tokens, at least {MIN_LENGTH}; longer ones lose prompt tokens first "
                        f"(default: {_D.max_length})")
    p.add_argument("--packing", action="store_true", help="pack several sequences per row (block-diagonal "
                                                          "attention, no padding)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="token budget of a packed micro-batch (with --packing)")
    p.add_argument("--loss", choices=LOSS_MODES, default="full",
                   help="full: LM + RTO + safety head (fused) | fused-lm: the fused LM loss alone | hf: the "
                        "model's own loss over materialized logits (default: full)")
    p.add_argument("--lm-coef", type=non_negative_float, default=1.0, help="weight of the LM term (default: 1)")
    p.add_argument("--transition-coef", type=non_negative_float, default=1.0,
                   help="weight of DeRTa's RTO term (default: 1)")
    p.add_argument("--cls-coef", type=non_negative_float, default=1.0,
                   help="weight of SCFT's classification term (default: 1)")
    p.add_argument("--rto-keep", type=fraction, default=_D.rto_keep,
                   help="fraction of RTO positions kept per sample, in (0, 1] (DeRTa's full-parameter recipe: 0.05; "
                        f"default: {_D.rto_keep})")
    p.add_argument("--vanilla-safety", action=argparse.BooleanOptionalAction, default=_D.vanilla_safety,
                   help="also train each harmful triple's instruction -> refusal, labeled safe for the head (default: "
                        f"{'on' if _D.vanilla_safety else 'off'})")
    p.add_argument("--pool", choices=POOLS, default="eos",
                   help="the classifier's token: eos (SCFT) or the one before it (free at inference; default: eos)")
    p.add_argument("--refusal-string", type=non_empty_str, default=_D.refusal_string,
                   help=f"its first token is the RTO target (default: {_D.refusal_string!r})")
    p.add_argument("--lora-rank", type=non_negative_int, default=0,
                   help="LoRA rank on the base model's linear layers, the head fully trained (default: 0, full "
                        "fine-tuning)")
    p.add_argument("--lora-alpha", type=positive_float, default=None,
                   help="LoRA scaling numerator, the update is alpha / rank * B A (default: 2 * rank)")
    p.add_argument("--lora-dropout", type=probability, default=0.0, help="dropout on LoRA's input (default: 0)")
    p.add_argument("--lora-target-modules", type=non_empty_str, default="all-linear", metavar="NAMES",
                   help="comma-separated module names LoRA adapts, or all-linear (default); DeRTa's 70B recipe: "
                        "--lora-rank 96 --lora-alpha 16 --lora-dropout 0.05 --lora-target-modules "
                        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="safety_loss backend (default: auto; triton needs a CUDA GPU)")
    p.add_argument("--seed", type=non_negative_int, default=_T.seed,
                   help="model init, data order and RTO sampling (default: 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its newest intact checkpoint (without it, a "
                        "directory that already holds a run is refused)")
    p.add_argument("--resume-override", action="store_true",
                   help="with --resume: accept data, batch-geometry, model or seed settings that differ from the "
                        "checkpoint's run (they change what the run means; the batches continue from the "
                        "checkpoint's step under the new settings)")
    p.add_argument("--save-every", type=non_negative_int, default=_T.save_every,
                   help=f"checkpoint every N steps, 0: never (default: {_T.save_every})")
    p.add_argument("--keep-checkpoints", type=non_negative_int, default=_T.keep_checkpoints,
                   help=f"checkpoints kept, 0: all (default: {_T.keep_checkpoints})")
    p.add_argument("--eval-samples", type=non_negative_int, default=_D.eval_samples,
                   help=f"held-out samples scored before and after training, 0: no evaluation (default: "
                        f"{_D.eval_samples})")
    p.add_argument("--num-proc", type=positive_int, default=1, help="processes for tokenization (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--report-to", choices=REPORT_TO, default="none",
                   help="also log every step through transformers' integration: tensorboard (under "
                        "OUTPUT_DIR/runs) or wandb (WANDB_MODE=offline for no account; untested) (default: none)")
    add_debug_flag(p)
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def optim_from_args(args: argparse.Namespace) -> OptimSpec:
    """The flags given, the recipe's defaults for the rest (a preset's, or DeRTa's for a checkpoint)."""
    recipe = default_recipe(args.model in PRESETS, args.lora_rank)
    values = dict(RECIPES[recipe])
    given = {"lr": args.lr, "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
             "warmup_ratio": args.warmup_ratio}
    values.update({k: v for k, v in given.items() if v is not None})
    if args.warmup_steps is not None and args.warmup_ratio is None:
        values["warmup_ratio"] = None  # explicit steps replace the recipe's ratio
    overridden = sorted(k for k, v in given.items() if v is not None)
    label = recipe + (f" defaults, {', '.join(overridden)} from the command line" if overridden else " defaults")
    return OptimSpec(**values, schedule=args.schedule, grad_clip=args.grad_clip, recipe=label)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    max_steps = args.max_steps
    if max_steps is None:
        max_steps = None if args.epochs else _T.max_steps
    targets = args.lora_target_modules
    return TrainConfig(
        model=ModelSpec(name_or_path=args.model, pool=args.pool, lora_rank=args.lora_rank,
                        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        lora_target_modules=targets if targets == "all-linear" else targets.split(","),
                        gradient_checkpointing=args.gradient_checkpointing),
        loss=LossSpec(mode=args.loss, lm_coef=args.lm_coef, transition_coef=args.transition_coef,
                      cls_coef=args.cls_coef, backend=args.backend),
        data=DataSpec(files=args.data, eval_files=args.eval_data, max_length=args.max_length, packing=args.packing,
                      max_tokens=args.max_tokens, micro_batch_size=args.micro_batch_size, rto_keep=args.rto_keep,
                      vanilla_safety=args.vanilla_safety,
                      refusal_string=args.refusal_string, eval_samples=args.eval_samples, num_proc=args.num_proc),
        optim=optim_from_args(args),
        output_dir=args.output_dir, max_steps=max_steps if max_steps and max_steps > 0 else None,
        epochs=args.epochs or _T.epochs, grad_accum=args.grad_accum, deepspeed=args.deepspeed, bf16=args.bf16,
        seed=args.seed, resume=args.resume, resume_override=args.resume_override, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress, summary=args.eval_samples > 0,
        report_to=args.report_to)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_tokens is not None and not args.packing:
        parser.error("argument --max-tokens: applies to packed micro-batches only; add --packing")
    if args.resume_override and not args.resume:
        parser.error("argument --resume-override: applies only with --resume")
    return args


@cli_main("scft-fast train")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .training import train

    summary = train(config_from_args(args))
    if summary is not None:
        print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
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
                           ("head_fpr", "head FPR (argmax verdict)"), ("head_tpr", "head TPR (argmax verdict)"),
                           ("refusal_prob_rto", "P(refusal token) on RTO positions")):
            lines.append(f"  {label:36s}" + "".join(f"  {cell(name, key):18s}" for name in titles))
    o = s.get("optimizer")
    if o:
        lines.append(f"  optimizer: {o['optimizer']}, lr {o['lr']:g}, weight decay {o['weight_decay']:g}, schedule "
                     f"{o['scheduler']}, warmup {o['warmup_steps']} steps ({o['recipe']})")
    if s["tokens_per_s"] is not None:
        lines.append(f"  tokens/s {s['tokens_per_s']:.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
