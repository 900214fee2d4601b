"""Op-level benchmark of ``scft_fast.safety_loss``: forward + backward against the anchors, one table.

Rows (every one computes the loss and the gradients of hidden (N, H) and lm_weight (V, H)):
  gemm x3            the three GEMMs the fused op must do on the loss rows, nothing else: the ceiling
  naive              logits = h @ W.T (N x V, materialized), .float(), F.cross_entropy: what HF does
  F.lce reference    torch.nn.functional.linear_cross_entropy, options=None (torch releases that have it)
  F.lce chunked      the same with LinearCrossEntropyOptions() (auto) and with chunking_method="aspect_ratio"
  scft LM-only       safety_loss(hidden, lm_weight, labels), per backend
  scft full          LM + RTO transition + classification head (C classes), per backend
  liger              Liger-Kernel's FLCE (CUDA, when installed): its default (grad_W accumulated in the input
                     dtype) and accum_dtype=float32 (like scft); it visits all N rows, prompt rows included
  cce                Cut Cross-Entropy (CUDA, when installed): impl="cce" (its default gradient filter,
                     filter_eps="high"), impl="cce" with filter_eps=None (exact), impl="torch_compile"
Every missing piece is skipped with a line saying so (the "not run" line and the JSON's "skipped").
The inputs and rows are op_rows.py, the peak memory op_memory.py, the statistics, targets and report
op_report.py; timing, environment and writers the shared harness.py.

FLOPs: every row is credited 6 * N_loss * H * V (three GEMMs over the rows that have a loss target),
whatever it actually computes: naive and F.lce also pay for the ignored rows, and that is the point.

Timing: rows are interleaved (each repetition runs every row once, in a rotated order) so that a
load spike on a shared machine hits all rows alike; CUDA times come from CUDA events, CPU times from
perf_counter.

    python benchmarks/bench_op.py                 # CPU default shape, writes benchmarks/results/op_cpu_*.json/.md
    python benchmarks/bench_op.py --quick         # smoke test, seconds, writes nothing
    python benchmarks/bench_op.py --device cuda   # GPU shape: bf16, N=8192, H=4096, V=128256
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

import torch

from harness import (
    REPO,
    RESULTS,
    ResultStream,
    StopRequest,
    add_device_argument,
    add_note_argument,
    check_device,
    command_line,
    device_name,
    git_commit,
    library_versions,
    load_average,
    result_stem,
    rotations,
    source_digest,
    time_call,
    utc_now,
    write_results,
)
from op_memory import CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, measure_memory, measure_memory_in_process
from op_report import add_paired_ratios, check_losses, evaluate_targets, render_markdown, row_stats
from op_rows import (
    DTYPES,
    Inputs,
    Row,
    available_backends,
    build_rows,
    clear_grads,
    make_inputs,
    problem_from_args,
    returned_grad_bytes,
)
from scft_fast.ops.chunked import accumulation_paths_run

# The shapes the targets are stated at.
TARGET_SHAPES = {
    "cpu": dict(rows=4096, hidden=512, vocab=32000, dtype="float32"),
    "cuda": dict(rows=8192, hidden=4096, vocab=128256, dtype="bfloat16"),
}
QUICK_SHAPE = dict(rows=512, hidden=64, vocab=2048)
# Where to flag a row as noisy: interquartile range over median.
DEFAULT_NOISE = 0.05


def run_timing(rows: list[Row], x: Inputs, device: torch.device, warmup: int, reps: int, progress: bool,
               stream: ResultStream | None, stop: StopRequest) -> None:
    """Interleaved: each repetition runs every row once, the order rotated by one each time. A repetition's times
    are kept (and streamed) when it completes, so that every row has the same repetitions for the paired ratios;
    a stop request ends the run there."""
    for row in rows:  # the first call also records the loss the row computes
        if stop.requested:
            return
        try:
            clear_grads(x)
            first = time_call(lambda r=row: setattr(r, "loss", float(r.step())), device)
            if row.family == "gemm":
                row.loss = None
        except Exception as e:  # a broken row is reported, the others still run
            first = None
            row.error = f"{type(e).__name__}: {e}"
            print(f"ERROR in row {row.key}: {row.error}", file=sys.stderr)
        if stream is not None:
            stream.write("row", key=row.key, label=row.label, family=row.family, backend=row.backend,
                         chunk=row.chunk, loss=row.loss, error=row.error, first_call_s=first,
                         grad_bytes=returned_grad_bytes(x, row.family))
    live = [r for r in rows if r.error is None]
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=(warmup + reps) * len(live), desc="fwd+bwd", unit="call", dynamic_ncols=True)
        except ImportError:
            pass
    for rep, order in enumerate(rotations(live, warmup + reps)):
        times = {}
        for row in order:
            if row.error is not None:
                continue
            if bar is not None:
                bar.set_postfix_str(f"{row.key}")
            try:
                clear_grads(x)
                times[row.key] = time_call(row.step, device)
            except Exception as e:
                row.error = f"{type(e).__name__}: {e}"
                print(f"ERROR in row {row.key}: {row.error}", file=sys.stderr)
                if stream is not None:
                    stream.write("error", key=row.key, rep=rep, error=row.error)
                continue
            if bar is not None:
                bar.update(1)
        if rep >= warmup:
            for row in live:
                if row.key in times:
                    row.times.append(times[row.key])
        if stream is not None:
            stream.write("rep", rep=rep, warmup=rep < warmup, times=times)
        if stop.requested:
            break
    if bar is not None:
        bar.close()
    clear_grads(x)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Benchmark scft_fast.safety_loss forward+backward against naive logits + cross-entropy, "
                    "torch.nn.functional.linear_cross_entropy, Liger-Kernel and Cut Cross-Entropy.",
)
    add_device_argument(ap, "the default shape, dtype, repetitions and backends")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="input dtype (default: float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--rows", "-N", type=int, default=None, help="N rows (tokens); default 4096 cpu, 8192 cuda")
    ap.add_argument("--hidden", "-H", type=int, default=None, help="H hidden size; default 512 cpu, 4096 cuda")
    ap.add_argument("--vocab", "-V", type=int, default=None, help="V vocabulary size; default 32000 cpu, "
                                                                     "128256 cuda")
    ap.add_argument("--prompt-frac", type=float, default=1 / 3,
                    help="share of rows that are prompt rows (ignore_index everywhere); default 1/3")
    ap.add_argument("--transition-frac", type=float, default=0.25,
                    help="full run: share of the non-prompt rows that carry an RTO target instead of an LM target; "
                         "default %(default)s")
    ap.add_argument("--seq-len", type=int, default=256, help="rows per sequence: S = N / seq_len pooled rows; default %(default)s")
    ap.add_argument("--classes", type=int, default=2, help="C, classes of the classification head; default %(default)s")
    ap.add_argument("--backends", default=None,
                    help="comma-separated scft_fast backends (torch, cpu, triton); default: those that run "
                         "here (triton and torch on cuda; torch and cpu on cpu, cpu if its C++ extension loads)")
    ap.add_argument("--chunk-sizes", default="",
                    help="comma-separated chunk sizes: extra scft_fast rows with chunk_size= forced, "
                         "beside the automatic one (e.g. 64,128,256,512,1024)")
    ap.add_argument("--only", default="",
                    help="comma-separated row keys or key prefixes to run (e.g. gemm,lce_auto,scft_); "
                         "default all. Keys: gemm naive lce_ref lce_auto lce_aspect "
                         "scft_lm:<backend>:<chunk|auto> scft_full:<backend>:<chunk|auto> liger liger:fp32 "
                         "cce:cce cce:exact cce:torch_compile")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per row; default 7 cpu, 30 cuda; "
                                                           "0 with --warmup 0: one call per row (loss check) "
                                                           "and the memory measurement only")
    ap.add_argument("--warmup", type=int, default=None, help="untimed repetitions per row before timing "
                                                              "(after one call that records the loss); "
                                                              "default 1 cpu, 3 cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default torch's own")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs; default %(default)s")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--noise-threshold", type=float, default=DEFAULT_NOISE,
                    help="flag a row '~' when its interquartile range exceeds this share of its median; "
                         "default %(default)s")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: N={QUICK_SHAPE['rows']}, H={QUICK_SHAPE['hidden']}, "
                         f"V={QUICK_SHAPE['vocab']}, 3 reps, no warm-up; writes no files unless --out-dir is given")
    ap.add_argument("--out-dir", default=None,
                    help=f"where the JSON and Markdown results go (default {RESULTS.relative_to(REPO)}; "
                         "none with --quick)")
    ap.add_argument("--tag", default="", help="suffix for the result file names")
    add_note_argument(ap)
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    ap.add_argument("--memory-rows", default=None,
                    help="internal: comma-separated row keys; measure their peak memory in this (fresh) process "
                         "and print 'MEMORY_RESULT {json}'; how the CPU memory measurement calls itself")
    args = ap.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    args.child_argv = raw

    kind = check_device(ap, args.device)
    target = TARGET_SHAPES[kind]
    base = QUICK_SHAPE if args.quick else target
    args.rows = args.rows or base["rows"]
    args.hidden = args.hidden or base["hidden"]
    args.vocab = args.vocab or base["vocab"]
    args.dtype = args.dtype or target["dtype"]
    if args.reps is None:
        args.reps = 3 if args.quick else 7 if kind == "cpu" else 30
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1 if kind == "cpu" else 3)
    args.at_target_shape = (args.rows, args.hidden, args.vocab, args.dtype) == (
        target["rows"], target["hidden"], target["vocab"], target["dtype"]) and abs(args.prompt_frac - 1 / 3) < 1e-6
    args.backends = ([b for b in args.backends.split(",") if b] if args.backends
                     else available_backends(torch.device(args.device)))
    args.chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    args.only = [k for k in args.only.split(",") if k]
    if args.out_dir is None and not args.quick:
        args.out_dir = str(RESULTS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_rows:
        peaks = measure_memory_in_process(args, args.memory_rows.split(","))
        print("MEMORY_RESULT " + json.dumps(peaks), flush=True)
        return 0

    device = torch.device(args.device)
    p = problem_from_args(args)
    started = utc_now()
    load_start = load_average()
    commit_start, sources_start = git_commit(), source_digest()
    x = make_inputs(p)
    rows, skipped = build_rows(p, x, args.backends, args.chunk_sizes)
    if args.only:
        rows = [r for r in rows if any(r.key == k or r.key.startswith(k) for k in args.only)]
    flops = 6.0 * x.n_loss * p.hidden * p.vocab
    progress = not args.no_progress
    shape = {"N": p.rows, "H": p.hidden, "V": p.vocab, "N_loss": x.n_loss, "N_transition": x.n_transition,
             "S": x.cls_index.numel(), "C": p.classes, "seq_len": p.seq_len}
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    stem = result_stem("op", slug, started, args.tag)
    stream = None
    if args.out_dir:
        stream = ResultStream(Path(args.out_dir) / f"{stem}.jsonl")
        stream.write("start", command=command_line(__file__, args.child_argv), commit=commit_start,
                     device=device_name(device), device_type=device.type, shape=shape, dtype=args.dtype,
                     reps=args.reps, warmup=args.warmup, flops_per_call=flops, at_target_shape=args.at_target_shape,
                     skipped=skipped, tag=args.tag)

    # benchmarks/gpu_run.py stops a step at its time limit with SIGINT: the run ends after the repetition in
    # progress and reports what it measured.
    stop = StopRequest()
    run_timing(rows, x, device, args.warmup, args.reps, progress, stream, stop)
    if not args.no_memory and not stop.requested:
        measure_memory(rows, x, args, progress)
        for row in rows:
            if stream is not None and row.family != "gemm":
                stream.write("memory", key=row.key, peak_bytes=row.peak_bytes, error=row.error)
    cut = None
    if stop.requested:
        cut = f"stopped (SIGINT) after {max((len(r.times) for r in rows), default=0)} of {args.reps} timed repetitions"
        print(f"\n{cut}", file=sys.stderr)
    load_end = load_average()
    sources_end = source_digest()

    stats = [row_stats(r, flops, returned_grad_bytes(x, r.family)) for r in rows]
    add_paired_ratios(stats)
    loss_warnings = check_losses(stats, args.dtype)
    targets = evaluate_targets(stats, device.type, args.at_target_shape)
    meta = {
        "date_utc": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command_line(__file__, args.child_argv),
        "commit": commit_start,
        "commit_end": git_commit(),
        "sources_digest": sources_start,
        "sources_changed_during_run": sources_end != sources_start,
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": shape,
        "dtype": args.dtype,
        "prompt_frac": p.prompt_frac,
        "transition_frac": p.transition_frac,
        "backends": args.backends,
        "skipped": skipped,
        "fp32_accumulation_paths": accumulation_paths_run(),
        "versions": library_versions(),
        "reps": args.reps,
        "warmup": args.warmup,
        "flops_per_call": flops,
        "flops_formula": "6 * N_loss * H * V (N_loss = rows with an LM or RTO target), credited to every row",
        "memory_method": None if args.no_memory else CUDA_MEMORY_METHOD if device.type == "cuda" else (
            CPU_MEMORY_METHOD + ("; --quick: one subprocess for all rows, so later rows may reuse pages freed by "
                                 "earlier ones (lower bounds)" if args.quick else "")),
        "timing_method": ("CUDA events around each call" if device.type == "cuda" else "time.perf_counter") +
                         "; rows interleaved, order rotated each repetition; median and quartiles",
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "note": args.note,
        "at_target_shape": args.at_target_shape,
        "cut": cut,
    }
    markdown = render_markdown(meta, stats, targets, loss_warnings, args.noise_threshold, sources_end)
    print("\n" + markdown)

    if args.out_dir:
        path = write_results(args.out_dir, stem, {"meta": meta, "rows": stats, "targets": targets,
                                                  "loss_warnings": loss_warnings}, markdown)
        stream.write("end", cut=cut)
        stream.close()
        print(f"wrote {path}.json, .md and .jsonl")
    failed = [st["key"] for st in stats if st["error"] or st.get("loss_mismatch")]
    if failed:
        print(f"FAILED rows: {', '.join(failed)}", file=sys.stderr)
    return 130 if cut else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
