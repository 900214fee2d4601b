"""Per-rank host memory of `scft_fast.training.train` on one process and on 2 ranks under ZeRO-1, 2, 3 and ZeRO-3
with offload, phase by phase:

    build       tokenizer + data done; the model is built (ZeRO-3: inside zero.Init, loaded into partitions)
    initialize  the engine: deepspeed.initialize (or our AdamW on one process)
    step        the training steps (forward, backward, optimizer step)
    export      the final model written to output_dir/model (ZeRO-3: gathered one module at a time)

Each phase's figure is the peak RSS inside it (VmHWM, the high-water mark reset through /proc/self/clear_refs
when the phase starts) and the RSS when it ends, per rank. Every run is `train()` itself in fresh processes; the
phases are marked by wrapping the loop's build_model, its engine class and the engine's step / save_model.

Targets (2 ranks): ZeRO-3 per-rank peak <= 0.75x the single-process peak; the build phase's own allocation
(its peak minus the RSS before it) <= 0.6x the full float32 model's size, per rank.

    python benchmarks/bench_memory.py             # the 156M Llama, 3 steps per run
    python benchmarks/bench_memory.py --quick     # a small Llama, a smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    REPO,
    RESULTS,
    cpu_name,
    git_commit,
    load_average_text,
    proc_status_kib,
    reset_peak_rss,
    result_stem,
    rss_mib,
    save_random_llama,
    utc_now,
    write_results,
)
from op_memory import MMAP_THRESHOLD  # noqa: E402

RUNS = {  # name: (DeepSpeed config or None for one process, ranks)
    "1 process": (None, 1),
    "ZeRO-1": ("training/zero1.json", 2),
    "ZeRO-2": ("training/zero2.json", 2),
    "ZeRO-3": ("training/zero3.json", 2),
    "ZeRO-3 offload": ("training/zero3_offload.json", 2),
}
PHASES = ("build", "initialize", "step", "export")
STEP_PARTS = ("forward", "backward", "optimizer")  # the engine's calls within the step phase
ZERO3_OVER_ONE_TARGET = 0.75
BUILD_OVER_MODEL_TARGET = 0.6
# The model: Llama, hidden 1024, 8 layers, vocab 32000: 155.7M parameters, 594 MiB in float32.
SHAPES = {
    "156m": dict(hidden=1024, intermediate=2304, layers=8, heads=16, kv_heads=16, vocab=32000),
    "quick": dict(hidden=128, intermediate=344, layers=2, heads=4, kv_heads=2, vocab=4096),
}


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
    p.add_argument("--worker", nargs=3, metavar=("RUN", "MODEL_DIR", "RESULT_PREFIX"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    runs = args.runs.split(",")
    unknown = set(runs) - set(RUNS)
    if unknown:
        p.error(f"--runs: unknown {sorted(unknown)}; expected a subset of {list(RUNS)}")
    args.runs = runs
    return args


class PhaseMeter:
    """Peak and final RSS of each phase of this process, in MiB; within the step phase, the peak of each part
    (forward, backward, optimizer) over the steps and the RSS after it (``parts``)."""

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self.parts: dict[str, dict] = {}
        self.current = None
        self.before = None
        self.peak = 0.0

    @staticmethod
    def _reset() -> None:
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): this benchmark needs Linux")

    def start(self, phase: str) -> None:
        self._reset()
        self.current, self.before, self.peak = phase, rss_mib(), 0.0

    @contextlib.contextmanager
    def part(self, name: str):
        """A window of the current phase with a peak of its own; the phase's peak stays the max of all windows."""
        self.peak = max(self.peak, proc_status_kib("VmHWM") / 1024)
        self._reset()
        yield
        peak = proc_status_kib("VmHWM") / 1024
        record = self.parts.setdefault(name, {"peak_mb": 0.0})
        record["peak_mb"] = max(record["peak_mb"], peak)
        record["rss_after_mb"] = rss_mib()
        self.peak = max(self.peak, peak)
        self._reset()

    def stop(self) -> None:
        self.phases[self.current] = {"rss_before_mb": self.before,
                                     "peak_mb": max(self.peak, proc_status_kib("VmHWM") / 1024),
                                     "rss_after_mb": rss_mib()}


def worker(run: str, model_dir: str, prefix: str, args) -> None:
    """One run of train() in this process (one rank of it), with its phases measured."""
    from scft_fast.training import DataSpec, ModelSpec, OptimSpec, TrainConfig, loop

    meter = PhaseMeter()
    build_model = loop.build_model

    def measured_build(*a, **kw):
        meter.start("build")
        model = build_model(*a, **kw)
        meter.stop()
        return model

    def measured(engine_class):
        class Measured(engine_class):
            def __init__(self, *a, **kw):
                meter.start("initialize")
                super().__init__(*a, **kw)
                meter.stop()
                self.steps_done = 0

            def forward(self, **batch):
                if self.steps_done == 0 and meter.current != "step":
                    meter.start("step")
                with meter.part("forward"):
                    return super().forward(**batch)

            def backward(self, loss):
                with meter.part("backward"):
                    super().backward(loss)

            def step(self):
                with meter.part("optimizer"):
                    norm = super().step()
                self.steps_done += 1
                if self.steps_done == args.steps:
                    meter.stop()
                return norm

            def save_model(self, path):
                meter.start("export")
                super().save_model(path)
                meter.stop()

        return Measured

    loop.build_model = measured_build
    loop.TorchEngine, loop.DeepSpeedEngine = measured(loop.TorchEngine), measured(loop.DeepSpeedEngine)
    ds_config, _ = RUNS[run]
    rss_start = rss_mib()
    config = TrainConfig(
        model=ModelSpec(name_or_path=model_dir),
        data=DataSpec(micro_batch_size=args.micro_batch_size, max_length=args.max_length, eval_samples=0),
        optim=OptimSpec(lr=2e-5, warmup_steps=0, schedule="constant"),
        output_dir=os.environ["BENCH_OUTPUT_DIR"],  # one directory for all ranks (launch() sets it)
        max_steps=args.steps, deepspeed=ds_config, seed=args.seed, save_every=0, progress=False, summary=False)
    loop.train(config)
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump({"run": run, "rank": rank, "rss_start_mb": rss_start, "phases": meter.phases,
                   "step_parts": meter.parts}, f)


def launch(run: str, model_dir: str, args, argv: list[str]) -> list[dict]:
    _, ranks = RUNS[run]
    work = tempfile.mkdtemp(prefix="bench_memory_run_")
    prefix = os.path.join(work, "result")
    script = [os.path.abspath(__file__), *argv, "--worker", run, model_dir, prefix]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks)),
           # A fixed mmap threshold: freed blocks above it leave RSS at once (glibc's dynamic threshold keeps up
           # to 32 MiB blocks on the heap, so RSS would count memory already freed), as bench_op measures.
           "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
           "BENCH_OUTPUT_DIR": os.path.join(work, "out"), "PYTHONPATH": str(REPO)}
    if ranks == 1:
        cmd = [sys.executable, *script]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", port,
               *script]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{run} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    results = []
    for rank in range(ranks):
        with open(f"{prefix}.rank{rank}.json") as f:
            results.append(json.load(f))
    shutil.rmtree(work)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker(*args.worker, args)
        return 0
    if args.render is not None:
        with open(args.render) as f:
            report(args, json.load(f), save=not args.no_save)
        return 0
    import torch

    argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    shape = SHAPES["quick" if args.quick else "156m"]
    started, load_start, commit = utc_now(), load_average_text(), git_commit()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_model_") as model_dir:
        model_info = save_random_llama(argparse.Namespace(seed=args.seed, **shape), model_dir)
        for run in args.runs:
            print(f"running {run} ...", flush=True)
            results[run] = launch(run, model_dir, args, argv)
    finished = utc_now()
    data = {"shape": shape, "quick": args.quick, "model": model_info,
            "model_fp32_mib": model_info["params"] * 4 / 2 ** 20, "dtype": "float32",
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__},
            "commit": commit, "started": started.isoformat(), "finished": finished.isoformat(),
            "load_average_start": load_start, "load_average_end": load_average_text(), "steps": args.steps,
            "micro_batch_size": args.micro_batch_size, "max_length": args.max_length,
            "command": ["python", "benchmarks/bench_memory.py", *argv], "note": args.note,
            "mmap_threshold": MMAP_THRESHOLD, "raw": results}
    report(args, data, save=not args.no_save)
    return 0


def _figures(results: dict) -> dict:
    """run -> rank -> {phase: peak, phase_end: rss, build_alloc, peak}."""
    table = {}
    for run, ranks in results.items():
        table[run] = []
        for r in ranks:
            phases = r["phases"]
            row = {p: phases[p]["peak_mb"] for p in PHASES}
            row.update({f"{p}_end": phases[p]["rss_after_mb"] for p in PHASES})
            row["before_build"] = phases["build"]["rss_before_mb"]
            row["build_alloc"] = phases["build"]["peak_mb"] - phases["build"]["rss_before_mb"]
            row["build_held"] = phases["build"]["rss_after_mb"] - phases["build"]["rss_before_mb"]
            row["peak"] = max(phases[p]["peak_mb"] for p in PHASES)
            parts = r.get("step_parts", {})  # absent from results written before the step was split
            row.update({f"{part}_peak": parts[part]["peak_mb"] for part in STEP_PARTS if part in parts})
            row.update({f"{part}_end": parts[part]["rss_after_mb"] for part in STEP_PARTS if part in parts})
            table[run].append(row)
    return table


def report(args, data: dict, save: bool) -> None:
    """Prints the table and the PASS/MISS lines; with ``save``, writes them and ``data`` (+ the table) under
    --out. ``data`` is what a run measured, so that --render prints the same report from a results file."""
    table = _figures(data["raw"])
    shape, model_info, model_mib, m = data["shape"], data["model"], data["model_fp32_mib"], data["machine"]
    started, finished = dt.datetime.fromisoformat(data["started"]), dt.datetime.fromisoformat(data["finished"])
    lines = [f"# Per-rank host memory by phase, {'quick shape' if data['quick'] else '156M Llama'}", "",
             f"- model: Llama hidden {shape['hidden']}, intermediate {shape['intermediate']}, {shape['layers']} "
             f"layers, {shape['heads']} heads ({shape['kv_heads']} KV), vocab {shape['vocab']}: "
             f"{model_info['params'] / 1e6:.1f}M parameters, {model_mib:.0f} MiB in float32",
             "- dtype: float32 weights and compute; torch's AdamW (the configs have no optimizer section)",
             f"- batch: {data['micro_batch_size']} sequences per micro-batch and rank (embedded data, max length "
             f"{data['max_length']}), {data['steps']} optimizer steps, a local checkpoint directory as --model",
             f"- machine: {m['cpu']}, {m['cores']} cores, CPU only (gloo), torch {m['torch']}; load average at "
             f"start {data['load_average_start']}, at end {data['load_average_end']}",
             f"- commit: {data['commit']}; {started:%Y-%m-%d %H:%M} -> {finished:%H:%M} UTC",
             f"- command: {shlex.join(data['command'])}",
             f"- method: glibc MALLOC_MMAP_THRESHOLD_={data['mmap_threshold']} (freed blocks leave RSS at once); "
             "each phase's peak is VmHWM at its end, the high-water mark reset (/proc/self/clear_refs) "
             "when it starts; \"build alloc\" is the build's peak minus the RSS before it (everything the build "
             "allocated at once, the checkpoint being read included), \"build held\" the RSS after it minus the RSS "
             "before it (what the model keeps); RSS includes python, torch, transformers, DeepSpeed and the "
             "tokenized data",
             *([f"- note: {data['note']}"] if data["note"] else []), "",
             "| run | rank | RSS before build | build peak | build alloc | build held | initialize peak | step peak | "
             "export peak | peak |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run, rows in table.items():
        for rank, row in enumerate(rows):
            lines.append(f"| {run} | {rank} | {row['before_build']:.0f} | {row['build']:.0f} | "
                         f"{row['build_alloc']:.0f} | {row['build_held']:.0f} | {row['initialize']:.0f} | "
                         f"{row['step']:.0f} | {row['export']:.0f} | {row['peak']:.0f} |")
    lines += ["", "MiB per rank."]
    if all(f"{part}_peak" in row for rows in table.values() for row in rows for part in STEP_PARTS):
        lines += ["", "Within the step phase, per part (peak over the steps; RSS when the part ends, last step):", "",
                  "| run | rank | forward peak | backward peak | optimizer step peak | after forward | after "
                  "backward | after optimizer step |", "|---|---|---|---|---|---|---|---|"]
        for run, rows in table.items():
            for rank, row in enumerate(rows):
                lines.append(f"| {run} | {rank} | " + " | ".join(f"{row[f'{part}_peak']:.0f}" for part in STEP_PARTS)
                             + " | " + " | ".join(f"{row[f'{part}_end']:.0f}" for part in STEP_PARTS) + " |")
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
                         "\n".join(lines) + "\n", indent=2)
    print(f"wrote {base}.md / .json")


if __name__ == "__main__":
    raise SystemExit(main())
