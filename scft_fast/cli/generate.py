"""`scft-fast generate`: safety-gated generation (scft_fast.generation.generate_safe) from the command line."""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from dataclasses import asdict

import torch
from transformers import TextStreamer

from ..data.records import read_prompts
from ..errors import ConfigError
from ..generation import MODES, REFUSAL_TEXT, check_model_dir, generate_safe, load_model, resolve_threshold
from ..metrics import THRESHOLD
from .common import (
    add_debug_flag,
    cli_main,
    non_empty_str,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scft-fast generate",
        description="Generate responses with the SCFT head as a safety gate: a response whose p_unsafe exceeds the "
                    "threshold is replaced by the refusal text. Prints each response with its verdict.")
    parser.add_argument("--model", required=True, help="model directory written by `scft-fast train` (model, head "
                        "and tokenizer together)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a user message; repeat for several")
    source.add_argument("--prompts", metavar="FILE", help="JSONL of prompts: DeRTa's {\"question\": ...}, or "
                        "{\"instruction\": ...} / {\"prompt\": ...}")
    parser.add_argument("--threshold", type=probability, default=None,
                        help="block when p_unsafe > threshold, in [0, 1] (default: the threshold stored in the "
                        "model's SCFT config by `scft-fast eval --store-threshold`, else "
                        f"{THRESHOLD}); the one used is printed")
    parser.add_argument("--mode", choices=MODES, default="final", help="final: judge the finished response; "
                        "stream: also judge every --check-every tokens and stop at the first unsafe reading")
    parser.add_argument("--check-every", type=positive_int, default=1,
                        help="stream mode: tokens between readings (default 1)")
    parser.add_argument("--refusal-text", type=non_empty_str, default=REFUSAL_TEXT,
                        help=f"shown instead of a blocked response (default {REFUSAL_TEXT!r})")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128,
                        help="generate()'s max_new_tokens (default 128); a prompt that would run past the model's "
                        "positions loses its first tokens, with a warning, and is marked in the output")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=positive_float, default=None, help="sampling temperature")
    parser.add_argument("--top-p", type=probability, default=None, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=positive_int, default=None, help="top-k sampling")
    parser.add_argument("--repetition-penalty", type=positive_float, default=None,
                        help="generate()'s repetition_penalty")
    parser.add_argument("--generate-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="any other generate() argument, VALUE read as JSON when it parses (e.g. "
                        "min_new_tokens=8, no_repeat_ngram_size=3); repeat for several; overrides the flags above")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="torch seed for sampling (default 0)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts per generate() batch (default 8)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="weights dtype (default: as saved)")
    parser.add_argument("--live", action="store_true", help="print the single prompt's response as it is generated; "
                        "only tokens a reading has judged safe are printed (every --check-every tokens with "
                        "--mode stream, at the end with --mode final)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per response instead of text")
    add_debug_flag(parser)
    return parser


def parse_generate_arg(arg: str) -> tuple[str, object]:
    key, sep, value = arg.partition("=")
    if not sep or not key.isidentifier():
        raise ConfigError(f"--generate-arg expects KEY=VALUE with KEY a generate() argument name, got {arg!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def check_generate_args(generate_args: list[tuple[str, object]]) -> None:
    """Each KEY of --generate-arg names a generate() argument or a GenerationConfig field (generate() would
    otherwise fail after the model is loaded, on a model keyword it does not know)."""
    from transformers import GenerationConfig, GenerationMixin

    known = set(vars(GenerationConfig())) | set(inspect.signature(GenerationMixin.generate).parameters)
    for key, _ in generate_args:
        if key not in known:
            raise ConfigError(f"--generate-arg {key}=...: {key!r} is neither a generate() argument nor a "
                              f"GenerationConfig field")


@cli_main("scft-fast generate")
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt and not all(p.strip() for p in args.prompt):
        parser.error("argument --prompt: expected a non-empty message")
    generate_args = [parse_generate_arg(arg) for arg in args.generate_arg]
    prompts = args.prompt if args.prompt else read_prompts(args.prompts)
    if args.live and len(prompts) != 1:
        parser.error(f"argument --live: prints a single response; got {len(prompts)} prompts")
    check_model_dir(args.model)
    torch.manual_seed(args.seed)
    check_generate_args(generate_args)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    if not args.json:
        print("threshold {:.4f} ({})".format(*resolve_threshold(model, args.threshold)))
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                "repetition_penalty": args.repetition_penalty}
    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                           **{k: v for k, v in sampling.items() if v is not None})
    generate_kwargs.update(generate_args)  # the last word on any argument
    if args.live:
        generate_kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start: start + args.batch_size]
        results = generate_safe(model, tokenizer, chunk, threshold=args.threshold, mode=args.mode,
                                check_every=args.check_every, refusal_text=args.refusal_text, **generate_kwargs)
        for i, (prompt, result) in enumerate(zip(chunk, results), start):
            if args.json:
                print(json.dumps({"prompt": prompt, **asdict(result)}))
                continue
            verdict = (f"BLOCKED at token {result.blocked_at_token}" if result.blocked else "allowed")
            if result.truncated_prompt_tokens:
                verdict += f" (PROMPT TRUNCATED: its first {result.truncated_prompt_tokens} tokens dropped)"
            print(f"[{i}] {prompt}\n  -> {result.text}\n  {verdict}, p_unsafe={result.p_unsafe:.4f}"
                  + (f"\n  raw: {result.raw_text}" if result.blocked else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
