"""What safety_loss's options cost: forward + backward of each option beside the default call, and
reduction="none" beside the peers' per-row losses. Not a timed test: a table, and result files.

Rows, per scft backend (LM + RTO transition targets, no head: reduction="none" takes none):
  default             safety_loss(h, W, labels, transition_labels=...) -> loss.backward()
  return_lse          + return_lse=True                 (a store per row)
  return_token_stats  + return_token_stats=True         (an argmax and an entropy sum in the lse sweep)
  z_loss              + z_loss=1e-4
  label_smoothing     + label_smoothing=0.1
  sum                 reduction="sum"
  none                reduction="none", loss.backward(g) for per-row weights g (the backward recomputes the chunk
                      loop: 8 N H V FLOPs instead of 6)
each with its paired ratio to the default row (per repetition, then the median). Then reduction="none" with LM
targets only, loss.backward(g), against the same thing elsewhere:
  none_lm             safety_loss(h, W, labels, reduction="none"), per backend
  naive_none          logits = h @ W.T, F.cross_entropy(reduction="none")   (materialized logits)
  lce_none            torch's F.linear_cross_entropy(reduction="none")     (torch releases that have it)
  liger_none          Liger-Kernel's LigerFusedLinearCrossEntropyLoss(reduction="none")   (CUDA, when installed)
  cce_none            Cut Cross-Entropy's linear_cross_entropy(reduction="none")          (CUDA, when installed)
with each peer's median over the first backend's none_lm median. A peer that cannot run is a "not run: <reason>"
line in the table and the files.

The options add work only in the epilogue, a small part of the call beside its three GEMMs; so that their cost
shows where whole calls vary more than that (a shared CPU), the epilogue alone is timed too, on one logits chunk
of the op's own size at this shape (real logits of the loss rows), per backend, with the arguments each option
passes it: default; return_lse (row_stats); return_token_stats (row_stats, token_stats); z_loss (z_scale,
row_stats); label_smoothing; none_forward (row_stats, no gradient sweep), each with its paired ratio to default.

Every row checks its loss (the sum of the rows for "none") against the first backend's default / none_lm row.

Files, in --out-dir: op_options_<device>_<date>.jsonl gets one line per measurement the moment it is taken (the
run's settings first, then every timed call, then each row's summary), so a run stopped by a time limit keeps what
it measured; the .json and .md (the table) are written at the end.

    python benchmarks/bench_op_options.py                        # CPU: N=4096, H=512, V=32000, float32
    python benchmarks/bench_op_options.py --device cuda          # N=8192, H=4096, V=128256, bfloat16, triton
    python benchmarks/bench_op_options.py --smoke --out-dir DIR  # tiny shapes, 2 repetitions: the plumbing
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from harness import (
    RESULTS,
    ResultStream,
    StopRequest,
    add_device_argument,
    check_device,
    device_name,
    load_average_text,
    quartiles,
    result_stem,
    rotations,
    run_record,
    spread,
    time_call,
    utc_now,
    write_results,
)
from op_rows import DTYPES, Problem, available_backends, clear_grads, make_inputs
from scft_fast import IGNORE_INDEX, safety_loss
from scft_fast.ops.backends import resolve_backend
from scft_fast.ops.chunked import default_chunk_size
from scft_fast.ops.safety_epilogue import ROW_STATS

SHAPES = {"cpu": dict(rows=4096, hidden=512, vocab=32000, dtype="float32", reps=5, warmup=1),
          "cuda": dict(rows=8192, hidden=4096, vocab=128256, dtype="bfloat16", reps=20, warmup=3),
          "smoke": dict(rows=256, hidden=32, vocab=512, reps=2, warmup=0)}
OPTIONS = {"default": {}, "return_lse": dict(return_lse=True), "return_token_stats": dict(return_token_stats=True),
           "z_loss": dict(z_loss=1e-4), "label_smoothing": dict(label_smoothing=0.1), "sum": dict(reduction="sum"),
           "none": dict(reduction="none")}
# The epilogue's arguments for each option (safety_epilogue.py's contract), as the op passes them.
EPILOGUE_OPTIONS = {"default": {}, "return_lse": dict(row_stats=True),
                    "return_token_stats": dict(row_stats=True, token_stats=True),
                    "z_loss": dict(z_scale=True, row_stats=True), "label_smoothing": dict(label_smoothing=0.1),
                    "none_forward": dict(row_stats=True, compute_grad=False)}


# The row whose loss each option's row must give (summed for "none"): z_loss and label_smoothing change the loss, so
# they are checked against themselves on the first backend.
SAME_LOSS_AS = {"default": "default", "return_lse": "default", "return_token_stats": "default", "z_loss": "z_loss",
                "label_smoothing": "label_smoothing", "sum": "sum", "none": "sum"}


class Row:
    def __init__(self, key: str, family: str, step: Callable[[], torch.Tensor], baseline: str | None,
                 same_loss_as: str):
        self.key, self.family, self.step = key, family, step
        self.baseline = baseline  # the row its time is divided by, or None
        self.same_loss_as = same_loss_as  # the row whose loss it must give
        self.setup: Callable[[], object] = lambda: None  # untimed, before each call
        self.times: list[float] = []
        self.loss: float | None = None
        self.error: str | None = None


def build_rows(x, upstream: torch.Tensor, backends: list[str], device: torch.device) -> tuple[list[Row], list[dict]]:
    """Returns (rows, not_run): not_run names each peer that cannot run here, and why."""
    h, w = x.hidden, x.lm_weight

    def backward(loss: torch.Tensor) -> torch.Tensor:
        loss.backward(upstream if loss.dim() else None)
        return loss.detach().sum()

    rows, not_run = [], []
    for backend in backends:
        for name, options in OPTIONS.items():
            rows.append(Row(f"{name}:{backend}", "options", lambda b=backend, o=options: backward(safety_loss(
                h, w, x.full_labels, transition_labels=x.transition_labels, backend=b, **o).loss),
                baseline=None if name == "default" else f"default:{backend}",
                same_loss_as=f"{SAME_LOSS_AS[name]}:{backends[0]}"))
    first = f"none_lm:{backends[0]}"
    for backend in backends:
        rows.append(Row(f"none_lm:{backend}", "none", lambda b=backend: backward(
            safety_loss(h, w, x.labels, backend=b, reduction="none").loss), baseline=None, same_loss_as=first))
    peers = [("naive_none", lambda: F.cross_entropy((h @ w.T).float(), x.labels, ignore_index=IGNORE_INDEX,
                                                     reduction="none"))]
    if hasattr(F, "linear_cross_entropy"):
        peers.append(("lce_none", lambda: F.linear_cross_entropy(h, w, x.labels, ignore_index=IGNORE_INDEX,
                                                                 reduction="none")))
    else:
        not_run.append({"row": "lce_none", "reason": f"torch {torch.__version__} has no F.linear_cross_entropy"})
    if device.type != "cuda":
        not_run += [{"row": "liger_none", "reason": "Liger-Kernel runs on CUDA only"},
                    {"row": "cce_none", "reason": "Cut Cross-Entropy runs on CUDA only"}]
    else:
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except Exception as e:  # an optional peer that fails to import (ImportError, or a triton mismatch) is skipped
            not_run.append({"row": "liger_none", "reason": f"not importable ({type(e).__name__}: {e})"})
        else:
            liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")
            peers.append(("liger_none", lambda: liger(w, h, x.labels)))
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except Exception as e:
            not_run.append({"row": "cce_none", "reason": f"not importable ({type(e).__name__}: {e})"})
        else:
            peers.append(("cce_none", lambda: cce(h, w, x.labels, ignore_index=IGNORE_INDEX, reduction="none")))
    for key, per_row_loss in peers:
        rows.append(Row(key, "none", lambda f=per_row_loss: backward(f()), baseline=first, same_loss_as=first))
    return rows, not_run


def build_epilogue_rows(x, backends: list[str], device: torch.device) -> tuple[list[Row], int]:
    """One row per (backend, option): the epilogue on a fresh copy of one logits chunk (the copy is not timed: the
    step restores the chunk, the timed call is the epilogue). Returns (rows, chunk rows)."""
    rows_per_chunk = default_chunk_size(x.n_loss, x.hidden.shape[1], x.lm_weight.shape[0], x.hidden.dtype, device)
    index = x.loss_rows[:rows_per_chunk]
    with torch.no_grad():
        pristine = x.hidden[index] @ x.lm_weight.T
    lm, tr = x.full_labels[index], x.transition_labels[index]
    scale = torch.full((), 1.0 / x.n_loss, device=device)
    buffer = torch.empty_like(pristine)
    stats = torch.empty(rows_per_chunk, ROW_STATS, device=device)
    rows = []
    for backend in backends:
        epilogue = resolve_backend(backend, device).epilogue
        for name, o in EPILOGUE_OPTIONS.items():
            def call(epilogue=epilogue, o=o):
                return epilogue(buffer, lm, tr, scale, scale, None, IGNORE_INDEX, o.get("label_smoothing", 0.0),
                                scale if o.get("z_scale") else None, stats if o.get("row_stats") else None,
                                o.get("token_stats", False), o.get("compute_grad", True))

            row = Row(f"epilogue:{name}:{backend}", "epilogue", call,
                      baseline=None if name == "default" else f"epilogue:default:{backend}",
                      same_loss_as=f"epilogue:{'label_smoothing' if o.get('label_smoothing') else 'default'}:"
                                   f"{backends[0]}")
            row.setup = lambda: buffer.copy_(pristine)
            rows.append(row)
    return rows, rows_per_chunk


def measure(rows: list[Row], x, device: torch.device, warmup: int, reps: int, stream: ResultStream,
            stop: StopRequest) -> None:
    """Interleaved: each repetition runs every row once, the order rotated each time, so that a load spike on a
    shared machine hits every row alike; each timed call goes to the stream as it is taken. A stop request (SIGINT:
    gpu_run.py's time limit) ends it between repetitions, the figures taken so far kept."""
    for row in rows:  # the first call records the loss (and compiles what compiles)
        if stop.requested:
            return
        try:
            clear_grads(x)
            row.setup()
            row.loss = float(row.step().sum())
        except Exception as e:  # a broken row is reported, the others still run
            row.error = f"{type(e).__name__}: {e}"
            stream.write("error", row=row.key, error=row.error)
    live = [r for r in rows if r.error is None]
    for rep, order in enumerate(rotations(live, warmup + reps)):
        if stop.requested:
            break
        for row in order:
            clear_grads(x)
            row.setup()
            seconds = time_call(row.step, device)
            if rep >= warmup:
                row.times.append(seconds)
                stream.write("sample", row=row.key, rep=rep - warmup, seconds=seconds)
    clear_grads(x)


def summarize(rows: list[Row], tolerance: float) -> list[dict]:
    by_key = {r.key: r for r in rows}
    out = []
    for row in rows:
        st = {"row": row.key, "family": row.family, "loss": row.loss, "error": row.error, "times_s": row.times}
        if row.times:
            st.update(spread(row.times))
        base = by_key.get(row.baseline) if row.baseline else None
        if base is not None and row.times and len(base.times) == len(row.times):
            q1, med, q3 = quartiles([t / b for t, b in zip(row.times, base.times)])
            st.update(baseline=base.key, ratio=med, ratio_q1=q1, ratio_q3=q3)
        ref = by_key[row.same_loss_as]
        if ref is not row and ref.loss is not None and row.loss is not None:
            st["loss_rel_diff"] = abs(row.loss - ref.loss) / max(abs(ref.loss), 1e-30)
            st["loss_mismatch"] = not st["loss_rel_diff"] <= tolerance
        out.append(st)
    return out


def render(meta: dict, stats: list[dict]) -> str:
    shape = meta["shape"]
    lines = [f"# safety_loss options: forward + backward, {meta['device']}", "",
             f"N={shape['N']} (rows with a target {shape['N_loss']}, of them RTO {shape['N_transition']}), "
             f"H={shape['H']}, V={shape['V']}, {meta['dtype']}; torch {meta['torch']}; commit {meta['commit']}; "
             f"{meta['reps']} timed repetitions after {meta['warmup']} warm-up, interleaved (the epilogue rows "
             f"{meta['epilogue_reps']}, on a ({meta['epilogue_chunk'][0]}, {meta['epilogue_chunk'][1]}) chunk); "
             f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}"
             + (f"; **{meta['cut']}**" if meta["cut"] else ""), "",
             f"    {meta['command']}", "",
             "| row | median (ms) | IQR / median | ratio (paired median) | against | loss |",
             "|---|---:|---:|---:|---|---|"]
    for st in stats:
        if st["error"]:
            lines.append(f"| {st['row']} | error: {st['error']} | | | | |")
            continue
        if "median_s" not in st:
            lines.append(f"| {st['row']} | not timed: {meta['cut']} | | | | |")
            continue
        ratio = f"{st['ratio']:.3f}" if "ratio" in st else ""
        check = "" if "loss_mismatch" not in st else ("MISMATCH" if st["loss_mismatch"] else "ok")
        lines.append(f"| {st['row']} | {st['median_s'] * 1e3:,.1f} | {st['spread']:.3f} | {ratio} | "
                     f"{st.get('baseline', '')} | {check} |")
    for skipped in meta["not_run"]:
        lines.append(f"| {skipped['row']} | not run: {skipped['reason']} | | | | |")
    lines += ["", "ratio: the row's time over the baseline's, per repetition, then the median (options and "
              "epilogue rows: over the same backend's default; peers of reduction=\"none\": over the first backend's none_lm, so > 1 means "
              "slower than scft). loss: the row's loss (summed for \"none\") against the first backend's row that "
              "computes the same loss (sum for none; default for return_lse and return_token_stats)."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_argument(ap, "the shape, dtype, repetitions and backends")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repetitions: the plumbing (seconds)")
    ap.add_argument("--rows", "-N", type=int, help="N rows (default 4096 cpu, 8192 cuda, 256 smoke)")
    ap.add_argument("--hidden", "-H", type=int, help="H (default 512 cpu, 4096 cuda, 32 smoke)")
    ap.add_argument("--vocab", "-V", type=int, help="V (default 32000 cpu, 128256 cuda, 512 smoke)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--backends", help="comma-separated scft backends (default: those that run here; triton on cuda)")
    ap.add_argument("--reps", type=int, help="timed repetitions per row (default 5 cpu, 20 cuda, 2 smoke)")
    ap.add_argument("--warmup", type=int, help="untimed repetitions per row (default 1 cpu, 3 cuda, 0 smoke)")
    ap.add_argument("--epilogue-reps", type=int, help="timed repetitions per epilogue row (default 3 x --reps)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default torch's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the .jsonl, .json and .md go "
                                                            "(default benchmarks/results)")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    kind = check_device(ap, args.device)
    base = {**SHAPES[kind], **(SHAPES["smoke"] if args.smoke else {})}
    for name in ("rows", "hidden", "vocab", "dtype", "reps", "warmup"):
        if getattr(args, name) is None:
            setattr(args, name, base[name])
    args.epilogue_reps = args.epilogue_reps or 3 * args.reps
    args.device = kind
    if args.backends:
        args.backends = [b for b in args.backends.split(",") if b]
    elif kind == "cuda":
        args.backends = ["triton"]
    else:
        args.backends = available_backends(torch.device(kind))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = utc_now()
    problem = Problem(rows=args.rows, hidden=args.hidden, vocab=args.vocab, dtype=DTYPES[args.dtype], device=device,
                      prompt_frac=1 / 3, transition_frac=0.25, seq_len=256, classes=2, seed=args.seed)
    x = make_inputs(problem)
    upstream = torch.rand(args.rows, generator=torch.Generator().manual_seed(args.seed)).to(device) + 0.5
    rows, not_run = build_rows(x, upstream, args.backends, device)
    epilogue_rows, chunk_rows = build_epilogue_rows(x, args.backends, device)

    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    stem = result_stem("op_options", slug, started, args.tag or ("smoke" if args.smoke else ""))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stream = ResultStream(out_dir / f"{stem}.jsonl")
    stop = StopRequest()
    meta = {**run_record(__file__, args.argv, device, started), "torch": torch.__version__,
            "shape": {"N": args.rows, "H": args.hidden, "V": args.vocab, "N_loss": x.n_loss,
                      "N_transition": x.n_transition},
            "dtype": args.dtype, "backends": args.backends, "reps": args.reps, "warmup": args.warmup,
            "epilogue_chunk": [chunk_rows, args.vocab], "epilogue_reps": args.epilogue_reps,
            "smoke": args.smoke, "upstream": "reduction='none': loss.backward(g), g ~ U(0.5, 1.5) per row",
            "timing": ("CUDA events" if device.type == "cuda" else "time.perf_counter") +
                      " around one forward + backward; rows interleaved, order rotated each repetition",
            "not_run": not_run, "loadavg_start": load_average_text()}
    stream.write("meta", **meta)
    for skipped in not_run:
        stream.write("not_run", **skipped)
    measure(epilogue_rows, x, device, args.warmup, args.epilogue_reps, stream, stop)
    measure(rows, x, device, args.warmup, args.reps, stream, stop)
    meta["loadavg_end"] = load_average_text()
    meta["cut"] = "stopped (SIGINT): the rows' repetitions taken so far" if stop.requested else None
    rows = epilogue_rows + rows
    stats = summarize(rows, tolerance=1e-4 if args.dtype == "float32" else 2e-2)
    for st in stats:
        stream.write("row", **{k: v for k, v in st.items() if k != "times_s"})
    stream.write("end", cut=meta["cut"])
    stream.close()
    markdown = render(meta, stats)
    print(markdown)
    write_results(out_dir, stem, {"meta": meta, "rows": stats}, markdown)
    print(f"wrote {out_dir / stem}.jsonl, .json and .md")
    failed = [st["row"] for st in stats if st["error"] or st.get("loss_mismatch")]
    if failed:
        print(f"FAILED rows: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 130 if meta["cut"] else 0


if __name__ == "__main__":
    sys.exit(main())
