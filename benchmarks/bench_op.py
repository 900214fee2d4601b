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

Inputs (seeded, never zeros): hidden ~ N(0, 1), lm_weight ~ N(0, (2 / sqrt(H))^2) so that logits have
std ~2 like a trained LM head; a random ``--prompt-frac`` of the rows are "prompt" rows (ignore_index);
for the full run a random ``--transition-frac`` of the remaining rows carry an RTO target (one refusal
token id) instead of an LM target, so LM-only and full visit the same N_loss rows; S = N / seq_len
pooled rows (each sequence's last row) with random labels in [0, C).

FLOPs: every row is credited 6 * N_loss * H * V (three GEMMs over the rows that have a loss target),
whatever it actually computes: naive and F.lce also pay for the ignored rows, and that is the point.

Timing: rows are interleaved (each repetition runs every row once, in a rotated order) so that a
load spike on a shared machine hits all rows alike; CUDA times come from CUDA events, CPU times from
perf_counter. Peak memory: CUDA torch.cuda.max_memory_allocated over one call, minus what was
allocated before it; CPU peak RSS growth over one call in a fresh subprocess (VmHWM - VmRSS from
/proc/self/status after resetting the high-water mark through /proc/self/clear_refs), after a
warm-up of the same row at a tiny shape so that library loading and one-time builds are excluded.

    python benchmarks/bench_op.py                 # CPU default shape, writes benchmarks/results/op_cpu_*.json/.md
    python benchmarks/bench_op.py --quick         # smoke test, seconds, writes nothing
    python benchmarks/bench_op.py --device cuda   # GPU shape: bf16, N=8192, H=4096, V=128256
"""
from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from scft_fast import IGNORE_INDEX, safety_loss
from scft_fast.ops.backends import resolve_backend
from scft_fast.ops.chunked import accumulation_paths_run, default_chunk_size

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO / "benchmarks" / "results"

# The shapes the targets are stated at.
TARGET_SHAPES = {
    "cpu": dict(rows=4096, hidden=512, vocab=32000, dtype="float32"),
    "cuda": dict(rows=8192, hidden=4096, vocab=128256, dtype="bfloat16"),
}
QUICK_SHAPE = dict(rows=512, hidden=64, vocab=2048)
# Where to flag a row as noisy: interquartile range over median.
DEFAULT_NOISE = 0.05
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Problem:
    rows: int  # N
    hidden: int  # H
    vocab: int  # V
    dtype: torch.dtype
    device: torch.device
    prompt_frac: float
    transition_frac: float
    seq_len: int  # S = N // seq_len pooled rows
    classes: int  # C
    seed: int


@dataclass
class Inputs:
    hidden: torch.Tensor  # (N, H), requires grad
    lm_weight: torch.Tensor  # (V, H), requires grad
    labels: torch.Tensor  # (N,) LM-only targets: ignore_index on prompt rows
    full_labels: torch.Tensor  # (N,) the LM targets left after moving some rows to RTO
    transition_labels: torch.Tensor  # (N,) the refusal token on RTO rows, ignore_index elsewhere
    cls_weight: torch.Tensor  # (C, H), requires grad
    cls_bias: torch.Tensor  # (C,), requires grad
    cls_index: torch.Tensor  # (S,) each sequence's last row
    cls_labels: torch.Tensor  # (S,) in [0, C)
    loss_rows: torch.Tensor  # (N_loss,) rows with a loss target, the same for LM-only and full
    n_transition: int

    @property
    def n_loss(self) -> int:
        return self.loss_rows.numel()

    def params(self) -> tuple[torch.Tensor, ...]:
        return self.hidden, self.lm_weight, self.cls_weight, self.cls_bias


def make_inputs(p: Problem) -> Inputs:
    gen = torch.Generator(device=p.device).manual_seed(p.seed)
    kw = dict(device=p.device, generator=gen)
    hidden = torch.randn(p.rows, p.hidden, **kw).to(p.dtype)
    lm_weight = (torch.randn(p.vocab, p.hidden, **kw) * (2.0 / math.sqrt(p.hidden))).to(p.dtype)
    labels = torch.randint(0, p.vocab, (p.rows,), **kw)
    prompt = torch.randperm(p.rows, **kw)[: round(p.rows * p.prompt_frac)]
    labels[prompt] = IGNORE_INDEX
    loss_rows = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
    moved = loss_rows[torch.randperm(loss_rows.numel(), **kw)[: round(loss_rows.numel() * p.transition_frac)]]
    refusal_token = int(torch.randint(0, p.vocab, (1,), **kw))
    full_labels = labels.clone()
    full_labels[moved] = IGNORE_INDEX
    transition_labels = torch.full_like(labels, IGNORE_INDEX)
    transition_labels[moved] = refusal_token
    sequences = max(1, p.rows // p.seq_len)
    cls_index = torch.arange(sequences, device=p.device) * p.seq_len + min(p.seq_len, p.rows) - 1
    cls_labels = torch.randint(0, p.classes, (sequences,), **kw)
    cls_weight = (torch.randn(p.classes, p.hidden, **kw) / math.sqrt(p.hidden)).to(p.dtype)
    cls_bias = (0.1 * torch.randn(p.classes, **kw)).to(p.dtype)
    for t in (hidden, lm_weight, cls_weight, cls_bias):
        t.requires_grad_()
    return Inputs(hidden, lm_weight, labels, full_labels, transition_labels, cls_weight, cls_bias, cls_index,
                  cls_labels, loss_rows, moved.numel())


@dataclass
class Row:
    key: str  # stable id, also across shapes (the memory subprocess finds its row by it)
    label: str  # what the table prints
    family: str  # gemm | naive | lce | scft_lm | scft_full | liger | cce
    step: Callable[[], torch.Tensor]  # forward + backward, returns the detached loss
    backend: str = ""
    chunk: str = ""
    times: list[float] = field(default_factory=list)
    loss: float | None = None
    peak_bytes: int | None = None
    error: str | None = None


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss.detach()


def available_backends(device: torch.device) -> list[str]:
    """Backends that run here for real: triton only on CUDA (its CPU interpreter is for tests), cpu when its
    C++ extension loads (a first use may compile it)."""
    found = []
    for name in (("triton", "torch") if device.type == "cuda" else ("torch", "cpu")):
        try:
            resolve_backend(name, device)
        except (RuntimeError, ValueError, ImportError):
            continue
        found.append(name)
    return found


def build_rows(p: Problem, x: Inputs, backends: list[str], chunk_sizes: list[int]) -> tuple[list[Row], list[str]]:
    """Returns (rows, skipped): skipped says which anchors are not there, and why."""
    h, w, labels = x.hidden, x.lm_weight, x.labels
    skipped = []
    rows: list[Row] = []

    gemm_buffers: list[torch.Tensor] = []  # allocated on the first call: only when the gemm row runs

    def gemm3() -> torch.Tensor:
        if not gemm_buffers:
            kw = dict(dtype=p.dtype, device=p.device)
            gemm_buffers.extend([h.detach()[x.loss_rows].contiguous(), torch.empty(x.n_loss, p.vocab, **kw),
                                 torch.empty(x.n_loss, p.hidden, **kw), torch.empty(p.vocab, p.hidden, **kw)])
        loss_h, logits, grad_h, grad_w = gemm_buffers  # (N_loss, H), (N_loss, V), (N_loss, H), (V, H)
        torch.mm(loss_h, w.detach().T, out=logits)
        torch.mm(logits, w.detach(), out=grad_h)
        torch.mm(logits.T, loss_h, out=grad_w)
        return grad_h[0, 0]

    rows.append(Row("gemm", "gemm x3 (ceiling: torch.mm only)", "gemm", gemm3))
    rows.append(Row("naive", "naive: h @ W.T, F.cross_entropy", "naive",
                    lambda: _backward(F.cross_entropy((h @ w.T).float(), labels, ignore_index=IGNORE_INDEX))))
    # F.linear_cross_entropy and its options are newer than torch 2.11 (the GPU image's torch).
    if not hasattr(F, "linear_cross_entropy"):
        skipped.append(f"F.linear_cross_entropy: not in torch {torch.__version__}")
    else:
        lce_variants = [("lce_ref", "F.lce reference (options=None)", None)]
        options_class = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if options_class is None:
            skipped.append(f"F.lce chunked rows: torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions")
        else:
            lce_variants += [("lce_auto", "F.lce chunked (Options())", options_class()),
                             ("lce_aspect", "F.lce chunked (aspect_ratio)",
                              options_class(chunking_method="aspect_ratio"))]
        for key, label, options in lce_variants:
            kwargs = {} if options is None else {"options": options}
            rows.append(Row(key, label, "lce", lambda kw=kwargs: _backward(
                F.linear_cross_entropy(h, w, labels, ignore_index=IGNORE_INDEX, **kw))))

    auto_chunk = default_chunk_size(x.n_loss, p.hidden, p.vocab, p.dtype, p.device)
    for backend in backends:
        for chunk in [None, *chunk_sizes]:
            chunk_label = f"auto={auto_chunk}" if chunk is None else str(chunk)
            suffix = f"{backend}:{'auto' if chunk is None else chunk}"
            rows.append(Row(f"scft_lm:{suffix}", "scft LM-only", "scft_lm", lambda b=backend, c=chunk: _backward(
                safety_loss(h, w, labels, backend=b, chunk_size=c).loss), backend, chunk_label))
            rows.append(Row(f"scft_full:{suffix}", "scft full (LM+RTO+cls)", "scft_full",
                            lambda b=backend, c=chunk: _backward(safety_loss(
                                h, w, x.full_labels, transition_labels=x.transition_labels,
                                cls_weight=x.cls_weight, cls_bias=x.cls_bias, cls_index=x.cls_index,
                                cls_labels=x.cls_labels, backend=b, chunk_size=c).loss), backend, chunk_label))

    if p.device.type != "cuda":
        skipped.append("Liger-Kernel, Cut Cross-Entropy: CUDA only")
        return rows, skipped
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # an optional peer that fails to import (ImportError, or a triton mismatch) is skipped
        skipped.append(f"Liger-Kernel: not importable ({type(e).__name__}: {e})")
    else:
        for key, label, accum in (("liger", "Liger FLCE (LM-only, default)", None),
                                  ("liger:fp32", "Liger FLCE (LM-only, accum_dtype=float32)", torch.float32)):
            liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, accum_dtype=accum)
            rows.append(Row(key, label, "liger", lambda fn=liger: _backward(fn(w, h, labels))))
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except Exception as e:  # an optional peer that fails to import (ImportError, or a triton mismatch) is skipped
        skipped.append(f"Cut Cross-Entropy: not importable ({type(e).__name__}: {e})")
    else:
        # impl="cce" skips gradient blocks below its filter_eps ("high" by default); filter_eps=None is exact.
        for key, label, kwargs in (("cce:cce", "CCE cce (LM-only)", dict(impl="cce")),
                                   ("cce:exact", "CCE cce, filter_eps=None (LM-only)",
                                    dict(impl="cce", filter_eps=None)),
                                   ("cce:torch_compile", "CCE torch_compile (LM-only)", dict(impl="torch_compile"))):
            rows.append(Row(key, label, "cce", lambda kw=kwargs: _backward(
                cce(h, w, labels, ignore_index=IGNORE_INDEX, **kw))))
    return rows, skipped


def _clear_grads(x: Inputs) -> None:
    for t in x.params():
        t.grad = None


def time_once(row: Row, x: Inputs, device: torch.device) -> float:
    _clear_grads(x)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        row.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    row.step()
    return time.perf_counter() - start


def run_timing(rows: list[Row], x: Inputs, device: torch.device, warmup: int, reps: int, progress: bool) -> None:
    """Interleaved: each repetition runs every row once, the order rotated by one each time."""
    for row in rows:  # the first call also records the loss the row computes
        try:
            _clear_grads(x)
            loss = float(row.step())
            row.loss = None if row.family == "gemm" else loss
        except Exception as e:  # a broken row is reported, the others still run
            row.error = f"{type(e).__name__}: {e}"
            print(f"ERROR in row {row.key}: {row.error}", file=sys.stderr)
    live = [r for r in rows if r.error is None]
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=(warmup + reps) * len(live), desc="fwd+bwd", unit="call", dynamic_ncols=True)
        except ImportError:
            pass
    for rep in range(warmup + reps):
        shift = rep % max(1, len(live))
        for row in live[shift:] + live[:shift]:
            if row.error is not None:
                continue
            if bar is not None:
                bar.set_postfix_str(f"{row.key}")
            try:
                elapsed = time_once(row, x, device)
            except Exception as e:
                row.error = f"{type(e).__name__}: {e}"
                print(f"ERROR in row {row.key}: {row.error}", file=sys.stderr)
                continue
            if rep >= warmup:
                row.times.append(elapsed)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    _clear_grads(x)


# ----------------------------------------------------------------------------- memory

def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MMAP_THRESHOLD = 128 << 10
CPU_MEMORY_METHOD = ("peak RSS growth over one fwd+bwd in a fresh subprocess: VmHWM - VmRSS (/proc/self/status), "
                     "the high-water mark reset through /proc/self/clear_refs first; includes the gradients it "
                     "returns (hidden, lm_weight); after a warm-up of the same row at a tiny shape; glibc "
                     f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} so that freed blocks leave RSS at once")
CUDA_MEMORY_METHOD = ("torch.cuda.max_memory_allocated over one fwd+bwd minus memory_allocated before it; includes "
                      "the gradients it returns (hidden, lm_weight)")


def measure_memory_in_process(args, row_keys: list[str]) -> dict[str, int]:
    """The body of the CPU memory subprocess: one call per row, in this process (fresh for the first row).
    Returns peak bytes per row key."""
    tiny = problem_from_args(args, rows=64, hidden=32, vocab=512)
    tiny_x = make_inputs(tiny)
    tiny_rows = {r.key: r for r in build_rows(tiny, tiny_x, args.backends, args.chunk_sizes)[0]}
    for key in row_keys:
        tiny_rows[key].step()
    del tiny_rows, tiny_x
    p = problem_from_args(args)
    x = make_inputs(p)
    rows = {r.key: r for r in build_rows(p, x, args.backends, args.chunk_sizes)[0]}
    peaks = {}
    for key in row_keys:
        _clear_grads(x)
        gc.collect()
        if not _reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS through /proc/self/clear_refs: no exact CPU memory figure")
        base_kib = _proc_status_kib("VmRSS")
        rows[key].step()
        peaks[key] = (_proc_status_kib("VmHWM") - base_kib) * 1024
    return peaks


def measure_memory(rows: list[Row], x: Inputs, args, progress: bool) -> None:
    """CUDA: in this process. CPU: one fresh subprocess per row (with --quick, one subprocess for all rows:
    then a row may reuse pages an earlier row freed, so its figure is a lower bound)."""
    device = torch.device(args.device)
    todo = [r for r in rows if r.error is None and r.family != "gemm"]
    if device.type == "cpu" and args.quick and todo:
        peaks = _memory_subprocess(args, [r.key for r in todo])
        for row in todo:
            if isinstance(peaks, str):
                row.error = peaks
            else:
                row.peak_bytes = peaks[row.key]
        return
    iterator = todo
    if progress:
        try:
            from tqdm import tqdm
            iterator = tqdm(todo, desc="peak memory", unit="row", dynamic_ncols=True)
        except ImportError:
            pass
    for row in iterator:
        if device.type == "cuda":
            _clear_grads(x)
            gc.collect()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            row.step()
            torch.cuda.synchronize()
            row.peak_bytes = torch.cuda.max_memory_allocated() - base
            _clear_grads(x)
            continue
        peaks = _memory_subprocess(args, [row.key])
        if isinstance(peaks, str):
            row.error = peaks
        else:
            row.peak_bytes = peaks[row.key]


def _memory_subprocess(args, keys: list[str]) -> dict[str, int] | str:
    """Peak bytes per row key from a fresh interpreter, or the error text."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args.child_argv, "--memory-rows", ",".join(keys)]
    # A fixed mmap threshold turns off glibc's sliding one, under which freed blocks up to 32 MiB stay in the
    # heap and in RSS depending on the order of frees: measured, the same row read 175 or 207 MiB from run to
    # run without it and the same figure to 4 KiB with it.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    found = re.search(r"^MEMORY_RESULT (.*)$", proc.stdout, re.M)
    if proc.returncode != 0 or not found:
        error = f"memory subprocess failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}"
        print(f"ERROR in rows {keys}: {error}", file=sys.stderr)
        return error
    return json.loads(found.group(1))


# ----------------------------------------------------------------------------- report

def quartiles(ts: list[float]) -> tuple[float, float, float]:
    if len(ts) == 1:
        return ts[0], ts[0], ts[0]
    q1, q2, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    return q1, q2, q3


def returned_grad_bytes(x: Inputs, family: str) -> int:
    """Bytes of the gradients a row leaves behind (hidden and lm_weight; a full row also the head's): the part of
    its peak memory that is output, not workspace."""
    params = x.params() if family == "scft_full" else (x.hidden, x.lm_weight)
    return sum(t.numel() * t.element_size() for t in params)


def row_stats(row: Row, flops: float, grad_bytes: int) -> dict:
    out = {"key": row.key, "label": row.label, "family": row.family, "backend": row.backend, "chunk": row.chunk,
           "loss": row.loss, "peak_bytes": row.peak_bytes, "error": row.error, "times_s": row.times,
           "workspace_bytes": None if row.peak_bytes is None else row.peak_bytes - grad_bytes}
    if row.times:
        q1, med, q3 = quartiles(row.times)
        out.update(median_s=med, q1_s=q1, q3_s=q3, min_s=min(row.times), max_s=max(row.times),
                   spread=(q3 - q1) / med, tflops=flops / med / 1e12)
    return out


def add_paired_ratios(stats: list[dict]) -> None:
    """full / LM-only per repetition (both rows ran in the same repetition, interleaved), then the median: a load
    spike or a clock change hits both halves of a pair alike."""
    by_key = {st["key"]: st for st in stats}
    for st in stats:
        lm = by_key.get(st["key"].replace("scft_full:", "scft_lm:")) if st["family"] == "scft_full" else None
        if not lm or not st["times_s"] or len(st["times_s"]) != len(lm["times_s"]):
            continue
        q1, med, q3 = quartiles([f / m for f, m in zip(st["times_s"], lm["times_s"])])
        st.update(paired_ratio=med, paired_ratio_q1=q1, paired_ratio_q3=q3)


def check_losses(stats: list[dict], dtype: str) -> list[str]:
    """Every LM-only row must compute the naive row's loss, every full row the first full row's: a fast row
    that computes something else is a bug, not a result. Marks stats with loss_rel_diff; returns warnings."""
    tol = 1e-4 if dtype == "float32" else 1e-2  # summation order (fp32); bf16/fp16 logits rounding
    refs = {}
    for st in stats:
        if st["loss"] is not None and st["family"] in ("naive", "scft_full"):
            refs.setdefault(st["family"], st["loss"])
    warnings = []
    for st in stats:
        ref = refs.get("scft_full" if st["family"] == "scft_full" else "naive")
        if st["loss"] is None or ref is None or st["family"] == "gemm":
            continue
        st["loss_rel_diff"] = abs(st["loss"] - ref) / max(abs(ref), 1e-30)
        st["loss_mismatch"] = not st["loss_rel_diff"] <= tol
        if st["loss_mismatch"]:
            warnings.append(f"LOSS MISMATCH: {st['key']} gives {st['loss']:.6f}, reference {ref:.6f} "
                            f"(relative difference {st['loss_rel_diff']:.1e} > {tol:.0e})")
    return warnings


def _fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def _by_key(stats: list[dict]) -> dict[str, dict]:
    return {s["key"]: s for s in stats if "median_s" in s}


def evaluate_targets(stats: list[dict], device: torch.device, at_target_shape: bool) -> list[dict]:
    """met / missed per target (issue 2 on CPU, issue 11 on GPU), with the figure; only meaningful at the issues' shape
    and dtype."""
    s = _by_key(stats)
    memory = {st["key"]: st for st in stats if st.get("peak_bytes") is not None}
    out = []

    def add(name, value, op, threshold, fmt, detail=""):
        ok = {"<=": value <= threshold, ">=": value >= threshold, "<": value < threshold}[op]
        out.append({"target": name, "value": value, "op": op, "threshold": threshold, "pass": bool(ok),
                    "text": f"{fmt.format(value)} {op} {fmt.format(threshold)}", "detail": detail})

    backends = sorted({st["key"].split(":")[1] for st in stats
                       if st["key"].startswith("scft_lm:") and st["key"].endswith(":auto")})
    for b in backends:
        lm, full = s.get(f"scft_lm:{b}:auto"), s.get(f"scft_full:{b}:auto")
        if device.type == "cpu":
            if lm and full:
                add(f"CPU [{b}] full <= 1.03x LM-only", full["median_s"] / lm["median_s"], "<=", 1.03, "{:.3f}x",
                    f"{full['median_s'] * 1e3:.0f} ms vs {lm['median_s'] * 1e3:.0f} ms")
            for anchor in ("lce_ref", "lce_auto", "lce_aspect"):
                a = s.get(anchor)
                if lm and a:
                    add(f"CPU [{b}] LM-only >= 1.3x faster than {a['label']}", a["median_s"] / lm["median_s"],
                        ">=", 1.3, "{:.2f}x", f"{lm['median_s'] * 1e3:.0f} ms vs {a['median_s'] * 1e3:.0f} ms")
                lm_mem, a_mem = memory.get(f"scft_lm:{b}:auto"), memory.get(anchor)
                if lm_mem and a_mem:
                    add(f"CPU [{b}] LM-only memory <= {a_mem['label']}", lm_mem["peak_bytes"] / 2**20, "<=",
                        a_mem["peak_bytes"] / 2**20, "{:,.1f} MiB")
        else:  # issue 11's GPU targets
            gemm = s.get("gemm")
            if lm and gemm:
                add(f"GPU [{b}] LM-only <= 1.3x the three GEMMs' time", lm["median_s"] / gemm["median_s"], "<=", 1.3,
                    "{:.3f}x", f"{lm['median_s'] * 1e3:.2f} ms vs {gemm['median_s'] * 1e3:.2f} ms (gemm x3), "
                               f"{lm['tflops']:.0f} vs {gemm['tflops']:.0f} TFLOP/s")
            if full and "paired_ratio" in full:
                add(f"GPU [{b}] full / LM-only <= 1.01 (paired median)", full["paired_ratio"], "<=", 1.01, "{:.4f}",
                    f"IQR {full['paired_ratio_q1']:.4f}-{full['paired_ratio_q3']:.4f}")
            for anchor in ("liger", "liger:fp32", "cce:cce", "cce:exact", "cce:torch_compile"):
                a = s.get(anchor)
                if lm and a:
                    add(f"GPU [{b}] LM-only faster than {a['label']}", lm["median_s"] / a["median_s"], "<", 1.0,
                        "{:.3f}x", f"{lm['median_s'] * 1e3:.2f} ms vs {a['median_s'] * 1e3:.2f} ms")
            for fam, key in (("LM-only", f"scft_lm:{b}:auto"), ("full", f"scft_full:{b}:auto")):
                row = memory.get(key)
                if row:
                    add(f"GPU [{b}] {fam} loss workspace < 4 GiB", row["workspace_bytes"] / 2**30, "<", 4.0,
                        "{:.2f} GiB", f"peak {row['peak_bytes'] / 2**30:.2f} GiB minus the gradients it returns")
    for t in out:
        t["at_target_shape"] = at_target_shape
    return out


def render_table(stats: list[dict], noise: float) -> list[str]:
    s = _by_key(stats)
    anchor = s.get("lce_auto")
    lines = ["| row | backend | chunk | median ms | IQR ms | min-max ms | peak MiB | TFLOP/s | full/LM (paired) | "
             "speed vs F.lce chunked | loss |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for st in stats:
        if st["error"]:
            lines.append(f"| {st['label']} | {st['backend']} | {st['chunk']} | FAILED: {st['error']} |"
                         " | | | | | | |")
            continue
        if "median_s" not in st:
            lines.append(f"| {st['label']} | {st['backend']} | {st['chunk']} | - | - | - | "
                         f"{_fmt_mib(st['peak_bytes'])} | - | | | "
                         f"{'' if st['loss'] is None else format(st['loss'], '.5f')} |")
            continue
        ratio = f"{st['paired_ratio']:.3f}x" if "paired_ratio" in st else ""
        vs = f"{anchor['median_s'] / st['median_s']:.2f}x" if anchor else ""
        flag = " ~" if st["spread"] > noise else ""
        lines.append(
            f"| {st['label']} | {st['backend']} | {st['chunk']} | {st['median_s'] * 1e3:,.1f}{flag} | "
            f"{st['q1_s'] * 1e3:,.1f}-{st['q3_s'] * 1e3:,.1f} | {st['min_s'] * 1e3:,.1f}-{st['max_s'] * 1e3:,.1f} | "
            f"{_fmt_mib(st['peak_bytes'])} | {st['tflops']:.3f} | {ratio} | {vs} | "
            f"{'' if st['loss'] is None else format(st['loss'], '.5f')}"
            f"{' !' if st.get('loss_mismatch') else ''} |")
    return lines


def library_versions() -> dict[str, str | None]:
    """Versions of what the rows run on (None: not importable here)."""
    import importlib.metadata

    found = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers", "liger-kernel", "cut-cross-entropy"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_digest() -> str:
    """Hash of the op's sources in the working tree (scft_fast/, kernels/, csrc/): taken at the start and the end
    of a run, it tells whether the code measured changed underneath it (a shared tree moves)."""
    digest = hashlib.sha256()
    for folder in ("scft_fast", "kernels", "csrc"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".cpp", ".h", ".cu"):
                digest.update(str(path.relative_to(REPO)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def problem_from_args(args, **override) -> Problem:
    shape = dict(rows=args.rows, hidden=args.hidden, vocab=args.vocab)
    shape.update(override)
    return Problem(dtype=DTYPES[args.dtype], device=torch.device(args.device), prompt_frac=args.prompt_frac,
                   transition_frac=args.transition_frac, seq_len=args.seq_len, classes=args.classes,
                   seed=args.seed, **shape)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Benchmark scft_fast.safety_loss forward+backward against naive logits + cross-entropy, "
                    "torch.nn.functional.linear_cross_entropy, Liger-Kernel and Cut Cross-Entropy.",
)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda; picks the default shape, dtype, repetitions and backends; default cuda when "
                         "available, else cpu")
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
                    help=f"where the JSON and Markdown results go (default {DEFAULT_OUT_DIR.relative_to(REPO)}; "
                         "none with --quick)")
    ap.add_argument("--tag", default="", help="suffix for the result file names")
    ap.add_argument("--note", default="", help="free text recorded with the results (e.g. machine load)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    ap.add_argument("--memory-rows", default=None,
                    help="internal: comma-separated row keys; measure their peak memory in this (fresh) process "
                         "and print 'MEMORY_RESULT {json}'; how the CPU memory measurement calls itself")
    args = ap.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    args.child_argv = raw

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here (torch {torch.__version__})")
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
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
        args.out_dir = str(DEFAULT_OUT_DIR)
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
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    commit_start, sources_start = git_commit(), source_digest()
    x = make_inputs(p)
    rows, skipped = build_rows(p, x, args.backends, args.chunk_sizes)
    if args.only:
        rows = [r for r in rows if any(r.key == k or r.key.startswith(k) for k in args.only)]
    flops = 6.0 * x.n_loss * p.hidden * p.vocab
    progress = not args.no_progress

    run_timing(rows, x, device, args.warmup, args.reps, progress)
    if not args.no_memory:
        measure_memory(rows, x, args, progress)
    load_end = os.getloadavg()
    sources_end = source_digest()
    sources_changed = sources_end != sources_start

    stats = [row_stats(r, flops, returned_grad_bytes(x, r.family)) for r in rows]
    add_paired_ratios(stats)
    loss_warnings = check_losses(stats, args.dtype)
    targets = evaluate_targets(stats, device, args.at_target_shape)
    meta = {
        "date_utc": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": "python " + shlex.join([os.path.relpath(__file__, REPO), *args.child_argv]),
        "commit": commit_start,
        "commit_end": git_commit(),
        "sources_digest": sources_start,
        "sources_changed_during_run": sources_changed,
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": {"N": p.rows, "H": p.hidden, "V": p.vocab, "N_loss": x.n_loss, "N_transition": x.n_transition,
                  "S": x.cls_index.numel(), "C": p.classes, "seq_len": p.seq_len},
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
    }
    header = [
        f"# safety_loss fwd+bwd benchmark: {meta['device']}",
        "",
        f"- date: {meta['date_utc']}; commit: {meta['commit']} (sources {sources_start}); torch {meta['torch']}; "
        f"python {meta['python']}",
        f"- command: `{meta['command']}`",
        f"- shape: N={p.rows}, H={p.hidden}, V={p.vocab}, dtype {args.dtype}; N_loss={x.n_loss} rows with a "
        f"target ({p.prompt_frac:.0%} prompt rows ignored); full run: {x.n_transition} of them RTO, "
        f"S={x.cls_index.numel()} pooled rows, C={p.classes}",
        f"- TFLOP/s = {meta['flops_formula']} = {flops / 1e9:,.1f} GFLOP per call, divided by the median time",
        f"- timing: {meta['timing_method']}; {args.warmup} warm-up + {args.reps} timed calls per row; "
        f"'~' marks IQR > {args.noise_threshold:.0%} of the median",
        f"- memory: {meta['memory_method'] or 'not measured'}; workspace = peak minus the gradients returned",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v is not None),
        "- float32 accumulation of grad_W: "
        + ("; ".join(f"{k}: {v}" for k, v in meta["fp32_accumulation_paths"].items())
           or "not run (no scft row computed a weight gradient)"),
        f"- load average (1, 5, 15 min): start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
        f"end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}"
        + (" (shared machine: other jobs may run beside this one)" if device.type == "cpu" else ""),
    ]
    if sources_changed:
        header.append(f"- WARNING: the op's sources changed during this run (digest {sources_start} -> "
                      f"{sources_end}, commit {commit_start} -> {meta['commit_end']}): timings use the code imported at the "
                      "start; memory subprocesses may have run the new code")
    if skipped:
        header.append(f"- not run: {'; '.join(skipped)}")
    if args.note:
        header.append(f"- note: {args.note}")
    target_lines = ["", "## Targets (issue 2 on CPU, issue 11 on GPU)" + ("" if args.at_target_shape else
                                                  " -- informational: not the target shape/dtype"), ""]
    for t in targets:
        target_lines.append(f"- {'met' if t['pass'] else 'MISSED'}: {t['target']}: {t['text']}"
                            + (f" ({t['detail']})" if t["detail"] else ""))
    if not targets:
        target_lines.append("- none evaluated (rows missing)")
    if loss_warnings:
        target_lines += ["", "## Loss check (LM-only rows against the naive row, full rows against each other)", ""]
        target_lines += [f"- {w}" for w in loss_warnings]
    markdown = "\n".join(header + [""] + render_table(stats, args.noise_threshold) + target_lines) + "\n"
    print("\n" + markdown)

    if args.out_dir:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
        stem = f"op_{slug}_{started.strftime('%Y%m%dT%H%MZ')}{('_' + args.tag) if args.tag else ''}"
        (out_dir / f"{stem}.json").write_text(json.dumps(
            {"meta": meta, "rows": stats, "targets": targets, "loss_warnings": loss_warnings}, indent=1) + "\n")
        (out_dir / f"{stem}.md").write_text(markdown)
        print(f"wrote {out_dir / stem}.json and .md")
    failed = [st["key"] for st in stats if st["error"] or st.get("loss_mismatch")]
    if failed:
        print(f"FAILED rows: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
