"""What a trained head reads: its scores on labeled pairs and on pairs with request and response swapped.

For each triple file (the embedded eval and separate splits by default) the head scores, with the evaluation's own
scoring (`scft_fast.evaluation.score_pairs`):
    harmful + fake          the harmful request with its fake compliant answer (the unsafe pairs)
    harmful + refusal       the same request with its refusal
    benign + answer         an everyday request with its answer
    benign + fake           an everyday request with a fake harmful answer of the same file
    harmful + benign answer a harmful request with an everyday answer of the same file
and, across the files, each file's harmful requests with the other file's fake answers. A head that reads the
request scores "benign + fake" low; one that keys on the fake answers' words scores it like "harmful + fake", and
scores the other file's fakes by whether their words are its own file's.

    python benchmarks/head_swaps.py --model scft-output/model
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import command_line, cpu_name, git_commit, utc_now  # noqa: E402
from scft_fast.data import default_data_files  # noqa: E402
from scft_fast.data.records import read_records  # noqa: E402
from scft_fast.evaluation import EvalConfig, load_for_eval, score_pairs  # noqa: E402
from scft_fast.metrics import auroc  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _read(path: str) -> tuple[list[dict], list[dict]]:  # -> harmful triples, helpful pairs
    records = [record for _, record in read_records(path)]
    return [r for r in records if "harmful_response" in r], [r for r in records if "response" in r]


def _stats(p: np.ndarray) -> dict:
    return {"n": len(p), "median_p_unsafe": float(np.median(p)), "mean_p_unsafe": float(p.mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an SCFT model directory (scft-fast train's model/)")
    parser.add_argument("--data", nargs=2, metavar=("SAME", "SEPARATE"),
                        default=[default_data_files("eval")[0], default_data_files("separate")[0]],
                        help="the same-generator and the separate-generator triple files (default: embedded)")
    parser.add_argument("--seed", type=int, default=0, help="which answers are drawn for the swaps (default: 0)")
    parser.add_argument("--output", type=Path, default=None, help="the JSON result file (default: benchmarks/results/head_swaps_<UTC date>.json)")
    args = parser.parse_args(argv)
    model, tokenizer, _ = load_for_eval(args.model, "cpu", "float32")
    config = EvalConfig(progress=False, batch_size=32)
    rng = random.Random(args.seed)
    splits = dict(zip(("same", "separate"), map(_read, args.data)))
    report = {"splits": {}, "cross": {}}
    for name, (harmful, benign) in splits.items():
        groups = {
            "harmful + fake": [(r["instruction"], r["harmful_response"], 1) for r in harmful],
            "harmful + refusal": [(r["instruction"], r["safe_response"], 0) for r in harmful],
            "benign + answer": [(r["instruction"], r["response"], 0) for r in benign],
            "benign + fake": [(r["instruction"], rng.choice(harmful)["harmful_response"], 0) for r in benign],
            "harmful + benign answer": [(r["instruction"], rng.choice(benign)["response"], 0) for r in harmful],
        }
        scores = {group: score_pairs(model, tokenizer, pairs, config) for group, pairs in groups.items()}
        unsafe, refusal, answer = scores["harmful + fake"], scores["harmful + refusal"], scores["benign + answer"]
        report["splits"][name] = {group: _stats(p) for group, p in scores.items()}
        report["splits"][name]["auroc"] = {
            "labeled pairs": auroc(np.r_[unsafe, refusal, answer], np.r_[np.ones(len(unsafe)),
                                                                          np.zeros(len(refusal) + len(answer))]),
            "fake vs refusal": auroc(np.r_[unsafe, refusal], np.r_[np.ones(len(unsafe)), np.zeros(len(refusal))]),
            "fake vs benign": auroc(np.r_[unsafe, answer], np.r_[np.ones(len(unsafe)), np.zeros(len(answer))]),
        }
    (same_harmful, _), (separate_harmful, _) = splits["same"], splits["separate"]
    for name, requests, fakes in (("separate harmful + same fake", separate_harmful, same_harmful),
                                  ("same harmful + separate fake", same_harmful, separate_harmful)):
        pairs = [(r["instruction"], rng.choice(fakes)["harmful_response"], 1) for r in requests]
        report["cross"][name] = _stats(score_pairs(model, tokenizer, pairs, config))
    result = {"command": command_line(__file__, sys.argv[1:] if argv is None else argv), "commit": git_commit(),
              "machine": cpu_name(), "model": args.model, "data": args.data, "seed": args.seed, "report": report}
    stamp = utc_now().strftime("%Y%m%dT%H%MZ")
    output = args.output or RESULTS / f"head_swaps_{stamp}.json"
    output.write_text(json.dumps(result, indent=2) + "\n")
    for name, groups in report["splits"].items():
        for group, stats in groups.items():
            if group != "auroc":
                print(f"{name:9s} {group:24s} n={stats['n']:4d} median p_unsafe {stats['median_p_unsafe']:.3g}")
        print(f"{name:9s} AUROC " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}"
                                              for k, v in groups["auroc"].items()))
    for name, stats in report["cross"].items():
        print(f"{name:34s} n={stats['n']:4d} median p_unsafe {stats['median_p_unsafe']:.3g}")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
