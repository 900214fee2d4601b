"""Per-rank host memory of `scft-fast train` as users run it: one process, and 2 ranks under ZeRO-1, 2, 3 and ZeRO-3
with offload, all five in one run, phase by phase.

Each run is the user's command line, in a fresh process tree, with this process's environment unchanged (no
allocator variable: `scft-fast train` sets glibc's mmap threshold itself under DeepSpeed), from the repository root:

    scft-fast train --model DIR --output-dir OUT --max-steps 3 --micro-batch-size 2 --max-length 256 \\
        --eval-samples 0 --save-every 0 --no-progress
    torchrun --standalone --nproc_per_node 2 -m scft_fast.cli.train --deepspeed training/zero3.json <the same flags>

Everything is measured from the outside; nothing of the library is wrapped or patched. Every 5 ms this process reads
VmRSS and VmHWM (the peak RSS so far) from /proc/PID/status of each rank process (torchrun's children, the rank read
from their RANK variable). The phases are marked by what the run does to files, as seen from here:

    start-up    launch -> OUT/train_config.json appears (imports, the process group)
    data        -> the first open of the checkpoint's safetensors file (tokenizer, tokenized data)
    build       -> OUT listed once the Trainer is built (the model built and read: under ZeRO-3 partitioned, each
                   rank reading its slice; its probe forward; the Trainer's construction); the opens and the listing
                   from inotify on DIR and OUT (created empty first), so the union over the ranks
    initialize  -> OUT/metrics.jsonl appears (DeepSpeed's engine, or accelerate's preparation, and the optimizer)
    step        -> the last step's line in metrics.jsonl (forward, backward, optimizer step, a log every step)
    export      -> the process exits (the loss plot, OUT/model written, ZeRO-3 gathered one layer at a time)

A phase's peak is the VmHWM read after it ends when the high-water mark rose during it (exact, give or take one
5 ms sample at its ends), else the highest VmRSS sample within it; "RSS before" is the last sample before it.

Targets (2 ranks): ZeRO-3 per-rank peak <= 0.75x the single-process peak; the build's own allocation (its peak
minus the RSS before it) <= 0.6x the full float32 model's size, per rank.

    python benchmarks/bench_memory.py             # the 156M Llama, 3 steps per run (~15 min on 2 idle cores)
    python benchmarks/bench_memory.py --quick     # a small Llama, a smoke run
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime as dt
import json
import os
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    REPO,
    RESULTS,
    cpu_name,
    git_commit,
    load_average_text,
    result_stem,
    save_random_llama,
    utc_now,
    write_results,
)

RUNS = {  # name: (DeepSpeed config or None for one process, ranks)
    "1 process": (None, 1),
    "ZeRO-1": ("training/zero1.json", 2),
    "ZeRO-2": ("training/zero2.json", 2),
    "ZeRO-3": ("training/zero3.json", 2),
    "ZeRO-3 offload": ("training/zero3_offload.json", 2),
}
PHASES = ("start-up", "data", "build", "initialize", "step", "export")
ZERO3_OVER_ONE_TARGET = 0.75
BUILD_OVER_MODEL_TARGET = 0.6
SAMPLE_S = 0.005
TRACE_S, TRACE_RISE_KIB = 0.5, 16 * 1024  # the trace kept in the results file: its period, and the peak's rises
# The model: Llama, hidden 1024, 8 layers, vocab 32000: 155.7M parameters, 594 MiB in float32.
SHAPES = {
    "156m": dict(hidden=1024, intermediate=2304, layers=8, heads=16, kv_heads=16, vocab=32000),
    "quick": dict(hidden=128, intermediate=344, layers=2, heads=4, kv_heads=2, vocab=4096),
}
# What scft-fast train says when a ZeRO-3 build falls back to transformers' loader (rank 0 reads everything).
FALLBACK_LINE = "ZeRO-3 build through transformers' loader"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small Llama instead of the 156M one (smoke run)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (default: 3)")
    p.add_argument("--micro-batch-size", type=int, default=2, help="sequences per micro-batch and rank (default: 2)")
    p.add_argument("--max-length", type=int, default=256, help="longest sample in tokens (default: 256)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {list(RUNS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="directory for the JSON and Markdown results")
    p.add_argument("--no-save", action="store_true", help="print only, write no result files")
    p.add_argument("--note", default="", help="free text recorded with the results (e.g. machine load)")
    p.add_argument("--render", metavar="JSON",
                   help="the report of a results file this script wrote, from its measurements (rewritten under "
                        "--out unless --no-save)")
    args = p.parse_args(argv)
    runs = args.runs.split(",")
    unknown = set(runs) - set(RUNS)
    if unknown:
        p.error(f"--runs: unknown {sorted(unknown)}; expected a subset of {list(RUNS)}")
    args.runs = runs
    return args


# -- the user's command -----------------------------------------------------------------------------------------------
def user_command(run: str, model_dir: str, output_dir: str, args) -> list[str]:
    """The command line a user types for ``run``, with the console scripts of this interpreter's environment."""
    config, ranks = RUNS[run]
    bin_dir = os.path.dirname(sys.executable)
    flags = ["--model", model_dir, "--output-dir", output_dir, "--max-steps", str(args.steps),
             "--micro-batch-size", str(args.micro_batch_size), "--max-length", str(args.max_length),
             "--seed", str(args.seed), "--eval-samples", "0", "--save-every", "0", "--no-progress"]
    if config is None:
        return [os.path.join(bin_dir, "scft-fast"), "train", *flags]
    return [os.path.join(bin_dir, "torchrun"), "--standalone", "--nproc_per_node", str(ranks), "-m",
            "scft_fast.cli.train", "--deepspeed", config, *flags]


def shown(cmd: list[str]) -> str:
    """The command as a user would type it: console scripts by name, paths relative to the repository."""
    return shlex.join([os.path.basename(cmd[0]), *cmd[1:]])


# -- outside observation ----------------------------------------------------------------------------------------------
class FileEvents:
    """inotify on directories: (directory, name, "open" | "close") of every open and close, by any process, of a
    file in one of them, or of the directory itself (name "": a listing)."""

    IN_OPEN, IN_CLOSE_WRITE, IN_CLOSE_NOWRITE, IN_NONBLOCK = 0x20, 0x08, 0x10, 0o4000
    HEADER = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name

    def __init__(self, *directories: str):
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK)
        self.watches = {}
        for directory in directories:
            wd = self.libc.inotify_add_watch(self.fd, directory.encode(),
                                             self.IN_OPEN | self.IN_CLOSE_WRITE | self.IN_CLOSE_NOWRITE)
            if self.fd < 0 or wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify on {directory}: this benchmark needs Linux's inotify")
            self.watches[wd] = directory

    def read(self) -> list[tuple[str, str, str]]:
        events = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return events
            offset = 0
            while offset < len(data):
                wd, mask, _, size = self.HEADER.unpack_from(data, offset)
                name = data[offset + self.HEADER.size: offset + self.HEADER.size + size].rstrip(b"\0").decode()
                events.append((self.watches[wd], name, "open" if mask & self.IN_OPEN else "close"))
                offset += self.HEADER.size + size

    def close(self) -> None:
        os.close(self.fd)


def status_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of process ``pid`` in KiB; None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError):
        return None


def rank_processes(launcher: int, ranks: int) -> dict[int, int]:
    """rank -> pid: the launcher itself for one process, else its children that carry a RANK variable."""
    if ranks == 1:
        return {0: launcher}
    found = {}
    try:
        with open(f"/proc/{launcher}/task/{launcher}/children") as f:
            children = [int(pid) for pid in f.read().split()]
    except OSError:
        return found
    for pid in children:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                variables = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if b"RANK" in variables:
            found[int(variables[b"RANK"])] = pid
    return found


def step_lines(path: str) -> int:
    """Training-step records in metrics.jsonl (a line with "loss"; the last, summary line has train_loss)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    count = 0
    for line in lines:
        try:
            count += "loss" in json.loads(line)
        except ValueError:  # a line being written
            break
    return count


def observe(cmd: list[str], ranks: int, model_dir: str, output_dir: str, steps: int, log_path: str) -> dict:
    """Runs ``cmd`` and samples its ranks until it exits: {"samples": {rank: [[t, rss, hwm], ...]} (seconds, KiB),
    "marks": {name: t}, "file_events": [[t, directory, name, kind], ...], "exit_code", "wall_s"}. ``output_dir`` is
    created empty first, so that it can be watched from the start."""
    os.makedirs(output_dir)
    watch = FileEvents(model_dir, output_dir)
    samples: dict[int, list[list]] = {}
    pids: dict[int, int] = {}
    marks: dict[str, float] = {}
    file_events = []
    metrics, metrics_size = os.path.join(output_dir, "metrics.jsonl"), -1
    with open(log_path, "w") as log:
        began = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                running = proc.poll() is None
                now = time.perf_counter() - began
                if len(pids) < ranks:
                    pids.update(rank_processes(proc.pid, ranks))
                for rank, pid in pids.items():
                    read = status_kib(pid)
                    if read is not None:
                        samples.setdefault(rank, []).append([round(now, 4), *read])
                file_events += [[round(now, 4), *event] for event in watch.read()]
                if "config" not in marks and os.path.exists(os.path.join(output_dir, "train_config.json")):
                    marks["config"] = now
                if "train_begin" not in marks and os.path.exists(metrics):
                    marks["train_begin"] = now
                if "train_begin" in marks and "steps_end" not in marks:
                    size = os.path.getsize(metrics)
                    if size != metrics_size:
                        metrics_size = size
                        if step_lines(metrics) >= steps:
                            marks["steps_end"] = now
                if not running:
                    break
                time.sleep(SAMPLE_S)
        finally:
            if proc.poll() is None:
                proc.kill()
            watch.close()
        marks["exit"] = time.perf_counter() - began
    return {"samples": samples, "marks": marks, "file_events": file_events, "exit_code": proc.returncode,
            "wall_s": marks["exit"]}


def build_window(file_events: list, model_dir: str, output_dir: str) -> tuple[float, float] | None:
    """(the first open of the checkpoint's safetensors file by any rank, the first listing of the output directory
    after train_config.json was written): the main process lists it when its Trainer is built (VerifiedCheckpoints
    looks for damaged checkpoints), after the model, whose weights the loader may read later than it closes the file
    (transformers' loader maps it and reads through the mapping). Events in the order inotify gave them."""
    config = next((i for i, (_, directory, name, _) in enumerate(file_events)
                   if directory == output_dir and name.startswith("train_config.json")), None)
    opens = [t for t, directory, name, kind in file_events
             if directory == model_dir and name.endswith(".safetensors") and kind == "open"]
    listed = [t for t, directory, name, kind in file_events[config or 0:]
              if directory == output_dir and name == "" and kind == "open"]
    if config is None or not opens or not listed or listed[0] < opens[0]:
        return None
    return opens[0], listed[0]


def launch(run: str, model_dir: str, args) -> dict:
    """One run of the user's command for ``run``, observed; raises with the log's tail when it fails."""
    _, ranks = RUNS[run]
    with tempfile.TemporaryDirectory(prefix="bench_memory_run_") as work:
        output_dir = os.path.join(work, "out")
        cmd = user_command(run, model_dir, output_dir, args)
        log_path = os.path.join(work, "log.txt")
        observed = observe(cmd, ranks, model_dir, output_dir, args.steps, log_path)
        log = Path(log_path).read_text(errors="replace")
        if observed["exit_code"] != 0:
            raise RuntimeError(f"{run} failed (exit {observed['exit_code']}): {shown(cmd)}\n{log[-6000:]}")
        with open(os.path.join(output_dir, "metrics.jsonl")) as f:
            observed["metrics"] = [json.loads(line) for line in f if line.strip()]
        missing = [m for m in ("config", "train_begin", "steps_end") if m not in observed["marks"]]
        window = build_window(observed["file_events"], model_dir, output_dir)
        if missing or window is None or sorted(observed["samples"]) != list(range(ranks)):
            raise RuntimeError(f"{run}: its phases could not be told apart from the outside (marks not seen: "
                               f"{missing}, checkpoint read and Trainer built seen: {window is not None}, ranks "
                               f"sampled: {sorted(observed['samples'])} of {ranks}; {observed['wall_s']:.1f} s)")
        observed["marks"]["build_start"], observed["marks"]["build_end"] = window
    bounds = phase_bounds(observed["marks"])
    samples = observed.pop("samples")
    checkpoint_opens = sum(directory == model_dir and kind == "open" and name.endswith(".safetensors")
                           for _, directory, name, kind in observed.pop("file_events"))
    return {**observed, "command": shown(cmd).replace(model_dir, "MODEL_DIR").replace(output_dir, "OUTPUT_DIR"),
            "transformers_loader": FALLBACK_LINE in log, "checkpoint_opens": checkpoint_opens,
            "phases": {rank: {phase: window_figures(samples[rank], *bounds[phase]) for phase in PHASES}
                       for rank in sorted(samples)},
            "peak_mb": {rank: samples[rank][-1][2] / 1024 for rank in sorted(samples)},
            "trace": {rank: thinned(samples[rank], TRACE_S, TRACE_RISE_KIB) for rank in sorted(samples)}}


def thinned(samples: list[list], period: float, rise_kib: int) -> list[list]:
    """One sample per ``period`` seconds, and every sample where the high-water mark rose by ``rise_kib`` or more
    since the last one kept (the results file's trace)."""
    kept, last_t, last_hwm = [], -period, -rise_kib
    for s in samples:
        if s[0] - last_t >= period or s[2] - last_hwm >= rise_kib:
            kept.append(s)
            last_t, last_hwm = s[0], s[2]
    return kept


# -- figures ----------------------------------------------------------------------------------------------------------
def phase_bounds(marks: dict) -> dict[str, tuple[float, float]]:
    edges = [0.0, marks["config"], marks["build_start"], marks["build_end"], marks["train_begin"], marks["steps_end"],
             marks["exit"]]
    return {phase: (edges[i], edges[i + 1]) for i, phase in enumerate(PHASES)}


def window_figures(samples: list[list], start: float, end: float) -> dict:
    """MiB: the RSS before ``start`` (last sample at or before it), the peak within [start, end] and the RSS
    after it (first sample at or after ``end``, else the last one)."""
    before = [s for s in samples if s[0] <= start] or samples[:1]
    inside = [s for s in samples if start <= s[0] <= end]
    after = next((s for s in samples if s[0] >= end), samples[-1])
    hwm_before, hwm_after = before[-1][2], after[2]
    peak = hwm_after if hwm_after > hwm_before else max((s[1] for s in inside + [after]), default=after[1])
    return {"rss_before_mb": before[-1][1] / 1024, "peak_mb": peak / 1024, "rss_after_mb": after[1] / 1024,
            "hwm_rose": hwm_after > hwm_before}


def figures(results: dict) -> dict:
    """run -> [per rank: {phase: peak MiB, before_build, build_alloc, build_held, peak, exact}]."""
    table = {}
    for run, observed in results.items():
        rows = []
        for rank in sorted(observed["phases"], key=int):
            phases = observed["phases"][rank]
            build = phases["build"]
            rows.append({**{p: phases[p]["peak_mb"] for p in PHASES},
                         "before_build": build["rss_before_mb"],
                         "build_alloc": build["peak_mb"] - build["rss_before_mb"],
                         "build_held": build["rss_after_mb"] - build["rss_before_mb"],
                         "peak": observed["peak_mb"][rank],
                         "exact": [p for p in PHASES if phases[p]["hwm_rose"]]})
        table[run] = rows
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        with open(args.render) as f:
            report(args, json.load(f), save=not args.no_save)
        return 0
    leaked = sorted(k for k in os.environ if k.startswith("MALLOC_"))
    if leaked:
        raise SystemExit(f"bench_memory: {', '.join(leaked)} set in this environment; the runs would inherit it, "
                         f"which a user's `scft-fast train` does not have: unset it")
    import torch

    argv = list(argv if argv is not None else sys.argv[1:])
    shape = SHAPES["quick" if args.quick else "156m"]
    started, load_start, commit = utc_now(), load_average_text(), git_commit()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_model_") as model_dir:
        model_info = save_random_llama(argparse.Namespace(seed=args.seed, **shape), model_dir)
        for run in args.runs:
            load = load_average_text()
            print(f"running {run} (load average {load}) ...", flush=True)
            results[run] = launch(run, model_dir, args)
            results[run].update(load_before=load, load_after=load_average_text())
            print(f"  {results[run]['wall_s']:.0f} s: {results[run]['command']}", flush=True)
    finished = utc_now()
    data = {"shape": shape, "quick": args.quick, "model": model_info,
            "model_fp32_mib": model_info["params"] * 4 / 2 ** 20, "dtype": "float32",
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__},
            "commit": commit, "started": started.isoformat(), "finished": finished.isoformat(),
            "load_average_start": load_start, "load_average_end": load_average_text(), "steps": args.steps,
            "micro_batch_size": args.micro_batch_size, "max_length": args.max_length,
            "command": ["python", "benchmarks/bench_memory.py", *argv], "note": args.note,
            "sample_s": SAMPLE_S, "raw": results}
    report(args, data, save=not args.no_save)
    return 0


def report(args, data: dict, save: bool) -> None:
    """Prints the table and the PASS/MISS lines; with ``save``, writes them and ``data`` (+ the table) under
    --out. ``data`` is what a run measured, so that --render prints the same report from a results file."""
    table = figures(data["raw"])
    shape, model_info, model_mib, m = data["shape"], data["model"], data["model_fp32_mib"], data["machine"]
    started, finished = dt.datetime.fromisoformat(data["started"]), dt.datetime.fromisoformat(data["finished"])
    commands = {run: observed["command"] for run, observed in data["raw"].items()}
    title = "quick shape" if data["quick"] else "156M Llama"
    lines = [f"# Per-rank host memory of `scft-fast train` by phase, {title}", "",
             f"- model: Llama hidden {shape['hidden']}, intermediate {shape['intermediate']}, {shape['layers']} "
             f"layers, {shape['heads']} heads ({shape['kv_heads']} KV), vocab {shape['vocab']}: "
             f"{model_info['params'] / 1e6:.1f}M parameters, {model_mib:.0f} MiB in float32, a local checkpoint "
             "directory (safetensors) as --model",
             "- dtype: float32 weights and compute; the recipe's AdamW (the DeepSpeed configs have no optimizer "
             "section)",
             f"- batch: {data['micro_batch_size']} sequences per micro-batch and rank (the embedded data, max length "
             f"{data['max_length']}), {data['steps']} optimizer steps, no held-out summary, no checkpoint, the final "
             "export to OUTPUT_DIR/model",
             f"- machine: {m['cpu']}, {m['cores']} cores, CPU only (gloo), torch {m['torch']}; load average at "
             f"start {data['load_average_start']}, at end {data['load_average_end']}",
             f"- commit: {data['commit']}; {started:%Y-%m-%d %H:%M} -> {finished:%H:%M} UTC",
             f"- command: {shlex.join(data['command'])}",
             "- each run, as a user types it, from the repository root, with no variable added to the environment "
             "(no MALLOC_*: `scft-fast train` sets glibc's mmap threshold itself under DeepSpeed):",
             *[f"  - {run}: `{cmd}`" for run, cmd in commands.items()],
             f"- method: from the outside, nothing of the library wrapped: VmRSS and VmHWM of every rank process "
             f"(/proc/PID/status) every {data['sample_s'] * 1e3:.0f} ms; phases from what the run does to files "
             "(start-up: until OUTPUT_DIR/train_config.json; data: until the first open of the checkpoint's "
             "safetensors file by any rank; build: until the main process lists OUTPUT_DIR once its Trainer is "
             "built (opens and listing from inotify); initialize: until metrics.jsonl appears; step: until the "
             "last step's line; export: until the process exits). A phase's peak is VmHWM after it where the "
             "high-water mark rose in it, else its highest sample; \"build alloc\" is the build's peak minus the "
             "RSS before it (everything the build allocated at once, the checkpoint being read included), \"build "
             "held\" the RSS after it minus the RSS before it. RSS includes python, torch, transformers, DeepSpeed "
             "and the tokenized data",
             *([f"- note: {data['note']}"] if data["note"] else []), "",
             "| run | rank | RSS before build | build peak | build alloc | build held | initialize peak | step peak | "
             "export peak | peak | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, rows in table.items():
        for rank, row in enumerate(rows):
            lines.append(f"| {run} | {rank} | {row['before_build']:.0f} | {row['build']:.0f} | "
                         f"{row['build_alloc']:.0f} | {row['build_held']:.0f} | {row['initialize']:.0f} | "
                         f"{row['step']:.0f} | {row['export']:.0f} | {row['peak']:.0f} | "
                         f"{data['raw'][run]['wall_s']:.0f} |")
    lines += ["", "MiB per rank; wall s: the whole command, start-up to exit."]
    fallback = [run for run, observed in data["raw"].items() if observed["transformers_loader"]]
    if fallback:
        lines += ["", f"The ZeRO-3 build went through transformers' loader (rank 0 reads the whole checkpoint) in: "
                      f"{', '.join(fallback)}."]
    lines.append("")
    checks = []
    if "1 process" in table and "ZeRO-3" in table:
        one = table["1 process"][0]["peak"]
        worst = max(r["peak"] for r in table["ZeRO-3"])
        checks.append((worst / one <= ZERO3_OVER_ONE_TARGET,
                       f"ZeRO-3 per-rank peak <= {ZERO3_OVER_ONE_TARGET}x the single-process peak: "
                       f"{worst / one:.3f}x ({worst:.0f} MiB on the worst rank vs {one:.0f} MiB)"))
    for run in ("ZeRO-3", "ZeRO-3 offload"):
        if run not in table:
            continue
        for key, what in (("build_alloc", "build alloc (peak)"), ("build_held", "build held (after)")):
            worst = max(r[key] for r in table[run])
            checks.append((worst <= BUILD_OVER_MODEL_TARGET * model_mib,
                           f"{run} {what} <= {BUILD_OVER_MODEL_TARGET}x the float32 model "
                           f"({BUILD_OVER_MODEL_TARGET * model_mib:.0f} MiB): {worst / model_mib:.3f}x "
                           f"({worst:.0f} MiB on the worst rank; per rank "
                           f"{', '.join(f'{r[key]:.0f}' for r in table[run])})"))
    lines += [f"- {'PASS' if ok else 'MISS'}: {text}" for ok, text in checks]
    print("\n".join(lines))
    if not save:
        return
    base = write_results(args.out, result_stem("memory", "cpu", started, "quick" if data["quick"] else ""),
                         {**data, "per_rank": table, "checks": [{"pass": ok, "text": text} for ok, text in checks]},
                         "\n".join(lines) + "\n", indent=1)
    print(f"wrote {base}.md / .json")


if __name__ == "__main__":
    raise SystemExit(main())
