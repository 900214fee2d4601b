"""`scft-fast eval`: scft_fast.evaluation from the command line, one model or a baseline and a model; writes the
JSON report and its plot, prints the table."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace

from ..data import default_data_files
from ..errors import ConfigError
from ..evaluation import EvalConfig, evaluate, format_table, load_eval_data, load_for_eval, plot_reports
from ..evaluation.report import truncated_prompts
from ..generation import check_model_dir, resolve_threshold, store_threshold
from ..metrics import THRESHOLD
from .common import add_debug_flag, cli_main, non_empty_str, non_negative_int, positive_int, probability


def build_parser() -> argparse.ArgumentParser:
    defaults = EvalConfig()
    parser = argparse.ArgumentParser(
        prog="scft-fast eval",
        description="Evaluate a safety-tuned model: head accuracy / AUROC / FPR on labeled pairs, refusal rate on "
                    "harmful prompts, over-refusal on benign prompts, DeRTa's completion attack; before and after "
                    "training with --baseline. Writes JSON and a PNG, prints a table.")
    parser.add_argument("--model", required=True, help="model directory written by `scft-fast train`")
    parser.add_argument("--baseline", default=None, help="the model before training (an HF causal LM directory, "
                        "with or without an SCFT head) to compare against")
    parser.add_argument("--data", nargs="+", default=None, metavar="FILE",
                        help="triples JSONL (labeled pairs, prompts, attacks) and DeRTa question files named "
                        "safety_* (harmful) or helpfulness_* (benign); default: the embedded held-out split, "
                        "unless --harmful or --benign is given")
    parser.add_argument("--harmful", nargs="+", default=[], metavar="FILE",
                        help="question-only files ({\"question\": ...}) of harmful prompts")
    parser.add_argument("--benign", nargs="+", default=[], metavar="FILE",
                        help="question-only files ({\"question\": ...}) of benign prompts")
    parser.add_argument("--output", default="scft_eval.json", help="JSON report (default scft_eval.json)")
    parser.add_argument("--plot", default=None, help="PNG of the report (default: --output with .png)")
    parser.add_argument("--threshold", type=probability, default=None,
                        help="block when p_unsafe > threshold, in [0, 1] (default: the threshold stored in each "
                        f"model's SCFT config, else {THRESHOLD})")
    parser.add_argument("--max-fpr", type=probability, default=defaults.max_fpr,
                        help="false-positive budget of the calibrated threshold: the lowest threshold that flags at "
                        f"most this fraction of the safe labeled pairs, reported with the TPR there (default "
                        f"{defaults.max_fpr})")
    parser.add_argument("--store-threshold", action="store_true",
                        help="write --model's calibrated threshold into its config.json (SCFT settings), where "
                        "generate_safe and `scft-fast generate` read it when no threshold is given")
    parser.add_argument("--max-new-tokens", type=positive_int, default=defaults.max_new_tokens,
                        help=f"response length for harmful and benign prompts (default {defaults.max_new_tokens})")
    parser.add_argument("--attack-words", type=non_negative_int, nargs="+", default=list(defaults.attack_words),
                        help=f"completion attack: k, harmful-response words forced as the response's start "
                        f"(default {' '.join(map(str, defaults.attack_words))})")
    parser.add_argument("--attack-window", type=positive_int, default=defaults.attack_window,
                        help=f"completion attack: m, tokens generated after the forced prefix in which a refusal "
                        f"counts (default {defaults.attack_window})")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help="prompts or pairs per batch")
    parser.add_argument("--limit", type=positive_int, default=None, help="at most this many items of each kind")
    parser.add_argument("--refusal-string", type=non_empty_str, default=defaults.refusal_string,
                        help=f"a response containing it is a refusal (default {defaults.refusal_string!r})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="weights dtype (default: as saved)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_flag(parser)
    return parser


@cli_main("scft-fast eval")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag, path in (("--model", args.model), ("--baseline", args.baseline)):
        if path is not None:
            check_model_dir(path, flag)
    config = EvalConfig(threshold=THRESHOLD if args.threshold is None else args.threshold, max_fpr=args.max_fpr,
                        max_new_tokens=args.max_new_tokens,
                        attack_words=tuple(args.attack_words), attack_window=args.attack_window,
                        batch_size=args.batch_size, limit=args.limit, refusal_string=args.refusal_string,
                        progress=not args.no_progress)
    data_files = args.data if args.data is not None else (
        [] if args.harmful or args.benign else default_data_files("eval"))
    data = load_eval_data(data_files, args.harmful, args.benign).limited(config.limit)
    if not any(data.counts().values()):
        raise ConfigError("no evaluation items: pass --data, --harmful or --benign files with records")
    models = ([("baseline", args.baseline)] if args.baseline else []) + [("model", args.model)]
    reports = {}
    for name, path in models:
        model, tokenizer, has_head = load_for_eval(path, args.device, args.dtype)
        threshold, source = resolve_threshold(model, args.threshold)
        reports[name] = {"path": path, "has_head": has_head,
                         "threshold": {"value": threshold, "source": source} if has_head else None,
                         **evaluate(model, tokenizer, data, replace(config, threshold=threshold), has_head=has_head)}
        del model
    calibration = (reports["model"]["head"] or {}).get("calibration")
    if args.store_threshold and calibration is None:
        raise SystemExit("--store-threshold: no calibrated threshold, the data has no labeled safe pairs (give "
                         "triples with --data)")
    plot = args.plot or os.path.splitext(args.output)[0] + ".png"
    out = {"config": asdict(config), "data": {"files": data_files, "harmful_files": args.harmful,
                                              "benign_files": args.benign, **data.counts()}, "models": reports}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2)
    plot_reports(reports, plot, reports["model"]["threshold"]["value"] if reports["model"]["threshold"] else 1.0)
    print(format_table(reports))
    for name, report in reports.items():
        if truncated_prompts(report):
            print(f"{name}: {truncated_prompts(report)} prompt(s) lost their first tokens to fit the model's "
                  f"positions (truncated_prompts in the report)")
    if calibration is not None:
        tpr = "n/a" if calibration["tpr"] is None else f"{calibration['tpr']:.3f}"
        print(f"calibrated threshold {calibration['threshold']:.6g}: FPR {calibration['fpr']:.3f} <= "
              f"{calibration['max_fpr']} with TPR {tpr} on {calibration['n_safe']} safe / "
              f"{calibration['n_unsafe']} unsafe pairs")
    if args.store_threshold:
        try:
            stored_in = store_threshold(args.model, calibration["threshold"])
        except ValueError as e:  # a threshold of exactly 0 or 1: the head saturates on the safe pairs
            raise SystemExit(f"--store-threshold: {e}") from None
        print(f"stored threshold {calibration['threshold']:.6g} in {stored_in}")
    print(f"wrote {args.output} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
