"""`scft-fast train`: argument parsing only; the work is scft_fast.training.train. Every flag is a field of
scft_fast.training.TrainConfig (its specs: model, loss, data, optimizer), documented there.

One process:       scft-fast train --max-steps 200
Several ranks:     torchrun --nproc_per_node 8 -m scft_fast.cli.train --deepspeed training/zero3.json ...
                   deepspeed --num_gpus 8 --module scft_fast.cli.train --deepspeed training/zero3.json ...
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from ..arguments import add_config_arguments, add_debug_flag, cli_main, dataclass_from_args
from ..training.config import RECIPES, OptimSpec, TrainConfig, default_recipe
from ..training.presets import PRESETS

SECTIONS = {"optim": "optimizer"}  # the --help group of each spec: its field name, or this title


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="scft-fast train", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, TrainConfig, SECTIONS)
    add_debug_flag(p)
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def optim_from_args(args: argparse.Namespace, config: TrainConfig) -> OptimSpec:
    """The flags given, the recipe's defaults for the rest (a preset's, or DeRTa's for a checkpoint)."""
    recipe = default_recipe(config.model.name_or_path in PRESETS, config.model.lora_rank)
    given = {key: getattr(args, f"optim.{key}") for key in RECIPES[recipe]}
    values = {**RECIPES[recipe], **{k: v for k, v in given.items() if v is not None}}
    if given["warmup_steps"] is not None and given["warmup_ratio"] is None:
        values["warmup_ratio"] = None  # explicit steps replace the recipe's ratio
    overridden = sorted(k for k, v in given.items() if v is not None)
    label = recipe + (f" defaults, {', '.join(overridden)} from the command line" if overridden else " defaults")
    return replace(config.optim, **values, recipe=label)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    config = dataclass_from_args(TrainConfig, args)
    # --epochs without --max-steps, or --max-steps 0: the epochs decide.
    max_steps = None if args.max_steps is None and args.epochs else config.max_steps or None
    return replace(config, optim=optim_from_args(args, config), max_steps=max_steps,
                   summary=config.data.eval_samples > 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "data.max_tokens") is not None and not getattr(args, "data.packing"):
        parser.error("argument --max-tokens: applies to packed micro-batches only; add --packing")
    if args.resume_override and not args.resume:
        parser.error("argument --resume-override: applies only with --resume")
    return args


@cli_main("scft-fast train")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ..training import train
    from ..training.reporting import format_summary

    summary = train(config_from_args(args))
    if summary is not None:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
