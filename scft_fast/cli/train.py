"""`scft-fast train`: SCFT + DeRTa fine-tuning on SCFTTrainer. Parsing only: the work is scft_fast.hf.run.train.

One process:       scft-fast train --max-steps 200
Several ranks:     torchrun --nproc_per_node 8 -m scft_fast.cli.train --deepspeed training/zero3.json ...
                   deepspeed --num_gpus 8 --module scft_fast.cli.train --deepspeed training/zero3.json ...

The flags are the fields of ModelArguments (the model and its SCFT head), DataArguments (the data recipe) and
SCFTTrainingArguments (transformers' TrainingArguments with the recipe's defaults: every TrainingArguments field is
a flag, under its own name with - or _), plus --resume, --resume-override and --debug.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys

from ..errors import ConfigError
from .common import add_debug_flag, cli_main

# glibc's M_MMAP_THRESHOLD: blocks at least this large are mmapped and go back to the system when freed. The
# dynamic default rises to 32 MiB after the first large free, after which a rank's freed DeepSpeed buffers and
# ZeRO-3 gathers stay in its heap. Measured on 2 gloo ranks (156M Llama, benchmarks/README.md), per-rank peak RSS
# with the threshold fixed against glibc's default: ZeRO-3 2293 MiB (0.74x one process; 1.08x without it on the
# earlier training loop), ZeRO-2 2738 against 3063 MiB, ZeRO-1 3309 against 3552 MiB. Without DeepSpeed the dynamic
# default is kept: with the threshold fixed, a CPU training step maps and faults its activations afresh
# (bench_train, one process: 21-35% slower steps, fused-lm 919.8 ms against 705.6 ms).
MMAP_THRESHOLD_BYTES = 128 * 1024
_M_MMAP_THRESHOLD = -3


def configure_allocator(training=None) -> bool:
    """Under DeepSpeed (``training``: TrainingArguments with a ``deepspeed`` config; None: unconditionally), sets
    glibc's mmap threshold (``MMAP_THRESHOLD_BYTES``) for this process. False where it was not set (no DeepSpeed,
    no glibc)."""
    if training is not None and not getattr(training, "deepspeed", None):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


# Flags of earlier releases that Trainer's own replace (README, "Training"): named with their replacement.
REMOVED_FLAGS = {
    "--betas": "use --adam-beta1 and --adam-beta2",
    "--warmup-ratio": "use --warmup-steps with a value below 1 (a fraction of the steps, e.g. --warmup-steps 0.03)",
    "--schedule": "use --lr-scheduler-type (with --lr-scheduler-kwargs)",
    "--max-tokens": "use --packing (each micro-batch's rows packed into one row) and --micro-batch-size",
}

# TrainingArguments fields whose default follows the recipe of the model (scft_fast.hf.arguments.RECIPES).
RECIPE_FIELDS = ("learning_rate", "weight_decay", "warmup_steps")


def build_parser():
    from transformers import HfArgumentParser

    from ..hf.arguments import DataArguments, ModelArguments, SCFTTrainingArguments

    # "resolve": our --debug (the traceback) replaces TrainingArguments' --debug (its debug modes).
    parser = HfArgumentParser((ModelArguments, DataArguments, SCFTTrainingArguments), prog="scft-fast train",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              conflict_handler="resolve")
    parser.add_argument("--no-head-bias", dest="head_bias", action="store_false",
                        help="refuse a head bias (a checkpoint whose head has one is an error)")
    parser.add_argument("--no-progress", dest="disable_tqdm", action="store_true", help="no progress bar")
    parser.add_argument("--resume", action="store_true", help=(
        "continue the run in --output-dir from its newest intact checkpoint (without it, a directory that already "
        "holds a run is refused)"))
    parser.add_argument("--resume-override", action="store_true", help=(
        "with --resume: accept data, batch-geometry, model or seed settings that differ from the checkpoint's run"))
    add_debug_flag(parser, dest="show_traceback")
    parser.set_defaults(**dict.fromkeys(RECIPE_FIELDS))  # None: not given, the recipe decides
    # An error is one line: argparse would print the whole usage, every TrainingArguments flag, before it.
    parser.print_usage = lambda file=None: None
    return parser


def given_dests(parser: argparse.ArgumentParser, argv: list[str], dests: tuple[str, ...]) -> set[str]:
    """Which of ``dests`` the command line sets, under any spelling argparse accepts (an alias, ``--flag=value``, an
    abbreviation): ``argv`` parsed again with those defaults suppressed."""
    actions = [a for a in parser._actions if a.dest in dests]
    defaults = [a.default for a in actions]
    try:
        for action in actions:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in zip(actions, defaults):
            action.default = default
    return {dest for dest in dests if hasattr(namespace, dest)}


def parse_args(argv: list[str] | None = None):
    """(ModelArguments, DataArguments, SCFTTrainingArguments, namespace of --resume / --resume-override)."""
    from ..hf.arguments import RECIPES, DataArguments, ModelArguments, SCFTTrainingArguments, recipe_of

    argv = sys.argv[1:] if argv is None else list(argv)  # `python -m scft_fast.cli.train` (torchrun) passes None
    parser = build_parser()
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in REMOVED_FLAGS:
            parser.error(f"argument {flag}: removed; {REMOVED_FLAGS[flag]}")
    namespace = parser.parse_args(argv)
    if namespace.resume_override and not namespace.resume:
        parser.error("argument --resume-override: applies only with --resume")
    if namespace.resume_from_checkpoint is not None:
        parser.error("argument --resume-from-checkpoint: scft-fast train resumes with --resume (from the newest "
                     "intact checkpoint of --output-dir, verified against its checksums)")
    given = vars(namespace)
    explicit = given_dests(parser, argv, ("max_steps", "num_train_epochs"))
    if explicit == {"num_train_epochs"}:
        given["max_steps"] = -1  # --epochs alone: the epochs decide
    parts = []
    try:
        model = ModelArguments(**_values(ModelArguments, given))
        parts.append(model)
        parts.append(DataArguments(**_values(DataArguments, given)))
        recipe = RECIPES[recipe_of(model.model, model.lora_rank)]
        values = _values(SCFTTrainingArguments, given)
        values.update({k: recipe[k] for k in RECIPE_FIELDS if values[k] is None})
        parts.append(SCFTTrainingArguments(**values))
    except ConfigError as e:
        parser.error(str(e))
    except ValueError as e:  # TrainingArguments' own checks
        parser.error(f"{e}")
    training = parts[-1]
    for flag, value in (("--label-smoothing-factor", training.label_smoothing_factor),
                        ("--use-liger-kernel", training.use_liger_kernel)):
        if value:  # SCFTTrainer refuses them too (hf/trainer.py): here before any heavy work
            parser.error(f"argument {flag}: it takes the loss away from the model's fused SCFT forward (LM + RTO + "
                         f"head), which would then not train the head or RTO; drop it")
    return (*parts, namespace)


def _values(kind, given: dict) -> dict:
    """The parsed values of ``kind``'s fields (a field without a flag keeps its default)."""
    import dataclasses

    return {f.name: given[f.name] for f in dataclasses.fields(kind) if f.init and f.name in given}


def format_summary(s: dict) -> str:
    """The run's summary as printed: losses, held-out splits side by side, the optimizer."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"trained {s['steps']} steps ({s['world_size']} rank(s)); model: {s.get('model_dir')}"]
    first, last = s["losses_first_10pct"], s["losses_last_10pct"]
    for key in first:
        lines.append(f"  {key:16s} {fmt(first[key])} -> {fmt(last[key])}  (mean of the first / last 10% of steps)")
    titles = s.get("eval_sets") or {}

    def cell(name, key):
        return f"{fmt(s[f'{name}_before'][key])} -> {fmt(s[f'{name}_after'][key])}"

    if titles:
        lines.append(f"  {'held-out, before -> after':38s}" + "".join(f"  {t:18s}" for t in titles.values()))
        for key, label in (("head_accuracy", "head accuracy"), ("head_auroc", "head AUROC"),
                           ("head_fpr", "head FPR (p_unsafe > 0.5)"), ("head_tpr", "head TPR (p_unsafe > 0.5)"),
                           ("refusal_prob_rto", "P(refusal token) on RTO positions (*)")):
            lines.append(f"  {label:38s}" + "".join(f"  {cell(name, key):18s}" for name in titles))
        lines.append("  (*) geometric mean over the positions: exp(-transition loss)")
    o = s.get("optimizer")
    if o:
        lines.append(f"  optimizer: {o['optimizer']}, lr {o['lr']:g}, weight decay {o['weight_decay']:g}, schedule "
                     f"{o['scheduler']} {o['scheduler_kwargs'] or ''}, warmup {o['warmup_steps']:g}")
    if s.get("tokens_per_s") is not None:
        lines.append(f"  tokens/s {s['tokens_per_s']:.0f}")
    return "\n".join(lines)


@cli_main("scft-fast train")
def main(argv: list[str] | None = None) -> int:
    model, data, training, namespace = parse_args(argv)
    configure_allocator(training)
    from ..hf.run import train

    summary = train(model, data, training, resume=namespace.resume, resume_override=namespace.resume_override)
    if summary is not None:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
