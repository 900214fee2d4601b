"""What this device can do at the op's shapes: the ceilings the op's figures are read against.

Rows (seeded random inputs, never zeros; bf16 on CUDA, float32 on CPU by default):
  copy              dst.copy_(src) of --copy-mib MiB: GB/s = 2 * bytes / time (one read, one write)
  gemm logits       h (c, H) @ W.T -> (c, V), the chunk's first GEMM                      2 c H V FLOPs
  gemm grad_h       dlogits (c, V) @ W (V, H) -> (c, H)                                    2 c H V FLOPs
  gemm dW beta=0    dlogits.T (V, c) @ h (c, H) -> a new float32 (V, H): the first chunk   2 c H V FLOPs
  gemm dW beta=1    the same added into the float32 accumulator: every later chunk         2 c H V FLOPs
  chunk: 3 GEMMs    logits + grad_h + dW beta=1, the times added: what one chunk of the op cannot go below
  epilogue          the backend's epilogue over (c, V) logits in place: GB/s = 3 * c * V * itemsize / time
                    (its two sweeps read the row, the second writes it back), and that as a share of copy GB/s
The dW rows call the op's own accumulation (``scft_fast.ops.chunked.accumulate_f32``) and name the path it took.
The epilogue gets fresh random logits (std 2) before each call, copied from a pristine buffer outside the timed
region. CUDA times come from CUDA events around each call, CPU times from perf_counter; median over --reps.
Each row goes to ceilings_<device>_<UTC date>.jsonl as it is measured; stopped by SIGINT (benchmarks/gpu_run.py at a
step's time limit), the script writes the rows it has and says where it stopped.

    python benchmarks/bench_ceilings.py --out-dir DIR                  # CUDA: H=4096, V=128256, c = 2048 and 4096
    python benchmarks/bench_ceilings.py --device cpu --quick --out-dir DIR   # smoke test, seconds
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from typing import Callable

import torch

from harness import (
    ResultStream,
    add_device_argument,
    check_device,
    result_stem,
    run_record,
    time_call,
    utc_now,
    write_results,
)
from op_rows import DTYPES
from scft_fast import IGNORE_INDEX
from scft_fast.ops.backends import resolve_backend
from scft_fast.ops.chunked import accumulate_f32, accumulation_path

SHAPES = {"cuda": dict(hidden=4096, vocab=128256, chunks="2048,4096", copy_mib=1024, dtype="bfloat16"),
          "cpu": dict(hidden=512, vocab=32000, chunks="256,512", copy_mib=256, dtype="float32")}
QUICK = dict(hidden=64, vocab=2048, chunks="64,128", copy_mib=4)


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int,
          setup: Callable[[], object] | None = None) -> list[float]:
    """Seconds per call of fn, each call timed alone (setup, when given, runs before it, outside the timing)."""
    times = []
    for rep in range(warmup + reps):
        if setup is not None:
            setup()
        elapsed = time_call(fn, device)
        if rep >= warmup:
            times.append(elapsed)
    return times


class Rows(list):
    """The result rows, each streamed as it is measured; add() appends one from its times and returns the median."""

    def __init__(self, stream: ResultStream):
        super().__init__()
        self.stream = stream

    def record(self, row: dict) -> None:
        self.append(row)
        self.stream.write("row", **row)

    def add(self, name: str, times: list[float], work: float, unit: str, **extra) -> float:
        med = statistics.median(times)
        rate = work / med / (1e12 if unit == "TFLOP/s" else 1e9)
        self.record(dict(row=name, median_s=med, min_s=min(times), max_s=max(times), rate=rate, unit=unit,
                         reps=len(times), **extra))
        return med


def measure_copy(rows: Rows, args, kw: dict, dtype: torch.dtype) -> float:
    """Returns the copy rate in GB/s."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = args.copy_mib * 2**20 // itemsize
    src = torch.randn(numel, **kw).to(dtype)
    dst = torch.empty_like(src)
    moved = 2 * numel * itemsize
    seconds = rows.add("copy", timed(lambda: dst.copy_(src), kw["device"], args.reps, args.warmup), moved, "GB/s",
                       bytes=moved)
    return moved / seconds / 1e9


def measure_chunk(rows: Rows, args, kw: dict, dtype: torch.dtype, chunk: int, weight: torch.Tensor, backend,
                  path: str, copy_rate: float) -> None:
    device, (vocab, h_size) = kw["device"], weight.shape
    itemsize = weight.element_size()
    flops = 2.0 * chunk * h_size * vocab
    hidden = torch.randn(chunk, h_size, **kw).to(dtype)
    logits = torch.empty(chunk, vocab, dtype=dtype, device=device)
    pristine = (2.0 * torch.randn(chunk, vocab, **kw)).to(dtype)
    grad_h = torch.empty(chunk, h_size, dtype=dtype, device=device)
    acc = accumulate_f32(None, pristine.T, hidden)
    shape = dict(c=chunk, H=h_size, V=vocab)

    def gemm(name, fn, **extra):
        return rows.add(f"gemm {name} c={chunk}", timed(fn, device, args.reps, args.warmup), flops, "TFLOP/s",
                        **extra, **shape)

    t_logits = gemm("logits", lambda: torch.mm(hidden, weight.T, out=logits))
    t_grad_h = gemm("grad_h", lambda: torch.mm(pristine, weight, out=grad_h))
    gemm("dW beta=0", lambda: accumulate_f32(None, pristine.T, hidden), path=path)
    t_dw = gemm("dW beta=1", lambda: accumulate_f32(acc, pristine.T, hidden), path=path)
    three = t_logits + t_grad_h + t_dw
    rows.record(dict(row=f"chunk: 3 GEMMs c={chunk}", median_s=three, rate=3 * flops / three / 1e12,
                     unit="TFLOP/s", note="sum of the three medians above", **shape))

    targets = torch.randint(0, vocab, (chunk,), **kw)  # every row has a target, as in the op's chunks
    no_transition = torch.full_like(targets, IGNORE_INDEX)
    scale = torch.full((), 1.0 / chunk, dtype=torch.float32, device=device)
    moved = 3 * chunk * vocab * itemsize
    times = timed(lambda: backend.epilogue(logits, targets, no_transition, scale, scale, None, IGNORE_INDEX), device,
                  args.reps, args.warmup, setup=lambda: logits.copy_(pristine))
    rows.add(f"epilogue [{epilogue_backend(backend)}] c={chunk}", times, moved, "GB/s", bytes=moved,
             share_of_copy=moved / statistics.median(times) / 1e9 / copy_rate, **shape)


def epilogue_backend(backend) -> str:
    """The backend "auto" resolved to, read off its epilogue: the twins are named safety_epilogue_<backend>."""
    return backend.epilogue.__name__.removeprefix("safety_epilogue_")


def measure(args, rows: Rows, found: dict) -> None:
    """Fills rows (and found: the accumulation path and the epilogue's backend) as it measures."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    kw = dict(device=device, generator=torch.Generator(device=device).manual_seed(args.seed))
    backend = resolve_backend(args.backend, device)
    path = accumulation_path(device, dtype)
    found.update(fp32_accumulation_path=path, epilogue_backend=epilogue_backend(backend))
    rows.stream.write("start", **found)
    copy_rate = measure_copy(rows, args, kw, dtype)
    weight = (torch.randn(args.vocab, args.hidden, **kw) * (2.0 / math.sqrt(args.hidden))).to(dtype)
    for chunk in args.chunks:  # each chunk's buffers are freed when measure_chunk returns
        measure_chunk(rows, args, kw, dtype, chunk, weight, backend, path, copy_rate)


def render(result: dict) -> str:
    m = result["meta"]
    lines = [f"# Device ceilings: {m['device']}", "",
             f"- date: {m['date_utc']}; commit: {m['commit']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v is not None),
             f"- command: `{m['command']}`",
             f"- dtype {m['dtype']}, H={m['H']}, V={m['V']}, chunks {m['chunks']}; {m['reps']} timed calls per row "
             f"after {m['warmup']} warm-up; {m['timing_method']}",
             f"- dW rows: the op's float32 accumulation, path `{result.get('fp32_accumulation_path')}`; epilogue "
             f"backend {result.get('epilogue_backend')}", *([f"- CUT: {m['cut']}"] if m["cut"] else []), "",
             "| row | median ms | rate | unit | note |", "|---|---:|---:|---|---|"]
    for r in result["rows"]:
        note = r.get("note", "")
        if "share_of_copy" in r:
            note = f"{r['share_of_copy']:.0%} of copy GB/s"
        lines.append(f"| {r['row']} | {r['median_s'] * 1e3:,.3f} | {r['rate']:,.4g} | {r['unit']} | {note} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Copy bandwidth, the op's GEMMs at its chunk shapes and the epilogue's "
                                             "bandwidth on this device.")
    add_device_argument(ap, "the default shapes and dtype")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 cuda, float32 cpu")
    ap.add_argument("--hidden", "-H", type=int, default=None, help="H; default 4096 cuda, 512 cpu")
    ap.add_argument("--vocab", "-V", type=int, default=None, help="V; default 128256 cuda, 32000 cpu")
    ap.add_argument("--chunks", default=None, help="comma-separated chunk rows c; default 2048,4096 cuda, 256,512 cpu")
    ap.add_argument("--copy-mib", type=int, default=None, help="size of the copied buffer; default 1024 cuda, 256 cpu")
    ap.add_argument("--backend", default="auto", help="scft_fast backend whose epilogue is timed; default auto "
                                                      "(triton on cuda)")
    ap.add_argument("--reps", type=int, default=30, help="timed calls per row; default %(default)s")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per row first; default %(default)s")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs; default %(default)s")
    ap.add_argument("--quick", action="store_true", help="smoke test: H=64, V=2048, c = 64 and 128, 4 MiB copy")
    ap.add_argument("--out-dir", required=True, help="where ceilings_<device>_<UTC date>.json and .md go")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    base = dict(SHAPES[check_device(ap, args.device)])
    if args.quick:
        base.update(QUICK)
    args.dtype = args.dtype or base["dtype"]
    args.hidden = args.hidden or base["hidden"]
    args.vocab = args.vocab or base["vocab"]
    args.copy_mib = args.copy_mib or base["copy_mib"]
    args.chunks = [int(c) for c in (args.chunks or base["chunks"]).split(",") if c]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    started = utc_now()
    stem = result_stem("ceilings", device.type, started)
    rows, found, cut = Rows(ResultStream(f"{args.out_dir}/{stem}.jsonl")), {}, None
    try:
        measure(args, rows, found)
    except KeyboardInterrupt:
        # benchmarks/gpu_run.py stops a step at its time limit with SIGINT: write the rows measured so far.
        cut = f"stopped (SIGINT) after {len(rows)} rows" + (f", the last {rows[-1]['row']}" if rows else "")
    result = {"rows": list(rows), **found}
    result["meta"] = {
        **run_record(__file__, args.argv, device, started), "dtype": args.dtype, "H": args.hidden,
        "V": args.vocab, "chunks": args.chunks, "reps": args.reps, "warmup": args.warmup,
        "timing_method": "CUDA events around each call" if device.type == "cuda" else "time.perf_counter",
        "cut": cut}
    markdown = render(result)
    print(markdown)
    path = write_results(args.out_dir, stem, result, markdown)
    rows.stream.write("end", cut=cut)
    rows.stream.close()
    print(f"wrote {path}.json, .md and .jsonl")
    return 130 if cut else 0


if __name__ == "__main__":
    sys.exit(main())
