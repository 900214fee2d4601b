"""Does safety cost anything? One model, one data order, one step count, trained three ways (and a control).

    hf        plain instruction tuning, the model's own HF loss (the N x V logits materialized)
    fused-lm  plain instruction tuning, scft_fast's fused loss (apply_scft_fast, no safety target)
    full      SCFT head + DeRTa RTO transition loss + LM loss through SCFTTrainer, as `scft-fast train` trains
    rto-rows  control: fused-lm with every RTO target relabeled as an LM target, i.e. full's LM-head rows

Each run is `scft-fast train`'s own set-up in a fresh subprocess: the arguments parsed by its parser from the
command line the report prints, its allocator setting (``configure_allocator``: glibc's defaults for one process; ``--allocator fixed``
applies the mmap threshold the CLI fixes under DeepSpeed, to show what it costs a step), its builders (tokenizer, data,
model: ``scft_fast.hf.run``) and its callbacks (``run_callbacks``: metrics.jsonl, divergence stop), then
``trainer.train()``; no held-out summary, no checkpoint, no export. Only the Trainer class differs by mode. The
baselines are not in the library: each is a subclass of ``SCFTTrainer`` defined here (``TRAINERS``) whose
``get_batch_samples`` turns the collator's batches into plain instruction tuning's before the step's targets are
counted, and, for hf, whose ``compute_loss`` is the model's own (``loss_function`` over its logits).

Every mode loads the same weights from one directory, with the same seed, so it sees the same micro-batches; runs
are interleaved and repeated (ABCD BCDA CDAB ...) so that load on a shared machine hits every mode alike, and each
figure is the median over repetitions of a run's median over its timed steps. A step is the time between the ends
of consecutive optimizer steps (``on_step_end``; CUDA synchronized): the batch fetch, forward, backward, optimizer
step and the previous step's log. Targets: full / fused-lm step time <= 1.01 (CUDA) or 1.03 (CPU); full faster
than hf and with less memory.

The model is a random-initialized Llama whose vocabulary (32k on CPU, 128k on CUDA) is large against its hidden
size, as in real LLMs, so that the LM head is where the loss costs. The embedded tokenizer has ~3k tokens: its
ids stay in range of the larger embedding, the remaining rows are simply never a target.

    python benchmarks/bench_train.py              # CPU preset, 3 repetitions
    python benchmarks/bench_train.py --quick      # smoke run, under a minute
    python benchmarks/bench_train.py --preset cuda  # bf16, Llama-1B-like shape, V=128256
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import torch
import transformers
from transformers import TrainerCallback

from harness import (
    add_model_shape_arguments,
    add_run_arguments,
    command_line,
    cpu_name,
    git_commit,
    load_average_text,
    peak_memory_mib,
    rotations,
    rss_mib,
    run_worker,
    save_random_llama,
    utc_now,
    write_results,
)
from scft_fast import IGNORE_INDEX
from scft_fast.hf.trainer import SCFTTrainer

# "rto-rows" is a control beside the three ways: the fused LM loss over the rows full mode visits.
# DeRTa's RTO targets sit on harmful-response tokens that have no LM target, so full mode sends more rows
# through the LM head than plain tuning; with RTO targets relabeled as LM targets, full / rto-rows is the cost of
# the safety terms themselves at equal LM-head work.
MODES = ("hf", "fused-lm", "full", "rto-rows")
MODE_TITLES = {"hf": "plain IT, HF loss (logits materialized)", "fused-lm": "plain IT, scft_fast fused loss",
               "full": "SCFT + DeRTa, SCFTTrainer (scft-fast train)",
               "rto-rows": "control: fused LM loss, RTO targets relabeled as LM targets (full's rows)"}
# full / fused-lm step-time ceiling per device type
FULL_OVER_FUSED_TARGET = {"cpu": 1.03, "cuda": 1.01}

# Model and batch per preset; every field can be overridden by its flag. CPU: a step of ~1 s on 2 cores with
# the LM head (V x H = 32000 x 256) ~85% of a token's matmul FLOPs (8.2M of 9.6M weights it multiplies); 40
# sequences packed into one row per step (~2.1k tokens: the embedded samples average ~53 tokens). CUDA:
# Llama-3.2-1B's vocabulary and width, 4 layers; padded batches of 64 sequences, because a packed row would go
# through SDPA with a dense mask as long as the row (no flash-attn varlen here) and the quadratic attention would
# dilute what the loss costs.
PRESETS = {
    "cpu": dict(hidden=256, intermediate=688, layers=2, heads=4, kv_heads=2, vocab=32000, packing=True,
                micro_batch_size=40, steps=20, warmup=4, repeats=3, bf16=False),
    "cuda": dict(hidden=2048, intermediate=8192, layers=4, heads=32, kv_heads=8, vocab=128256, packing=False,
                 micro_batch_size=64, steps=30, warmup=5, repeats=3, bf16=True),
    "quick": dict(hidden=128, intermediate=344, layers=2, heads=4, kv_heads=2, vocab=8192, packing=True,
                  micro_batch_size=2, steps=4, warmup=1, repeats=1, bf16=False),
}
SAFETY_TARGETS = ("transition_labels", "cls_labels", "cls_index")


# -- the modes: SCFTTrainer and its baselines --------------------------------------------------------------------------
def without_safety_targets(batch: dict) -> dict:
    """Plain instruction tuning's inputs: the RTO targets and the head's labels (and pooled rows) dropped."""
    return {k: v for k, v in batch.items() if k not in SAFETY_TARGETS}


def rto_targets_as_lm(batch: dict) -> dict:
    """The control's inputs: every RTO target becomes an LM target (the two never share a position in DeRTa
    data), so the fused LM loss visits exactly full mode's rows."""
    labels = torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["transition_labels"])
    return {**without_safety_targets(batch), "labels": labels}


class MeasuredTrainer(SCFTTrainer):
    """SCFTTrainer (the full mode) recording each step's input tokens and loss targets. ``batch_view``: what a
    baseline makes of the collator's batches, applied before the step's targets are counted."""

    batch_view = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_counts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input tokens, LM + RTO targets)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        if self.batch_view is not None:
            epoch_iterator = map(self.batch_view, epoch_iterator)
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches:  # tensors, read after training: no host sync per step
            tokens = sum(b["attention_mask"].sum() if b.get("attention_mask") is not None
                         else torch.tensor(b["input_ids"].numel()) for b in batches)
            self.step_counts.append((tokens, num_items_in_batch))
        return batches, num_items_in_batch


class FusedLMTrainer(MeasuredTrainer):
    """Plain instruction tuning through the fused loss: the patched model's forward with LM labels only."""

    batch_view = staticmethod(without_safety_targets)


class RTORowsTrainer(MeasuredTrainer):
    batch_view = staticmethod(rto_targets_as_lm)


class HFLossTrainer(FusedLMTrainer):
    """Plain instruction tuning through the model's own loss: its forward without labels (the N x V logits),
    then its ``loss_function`` (transformers' ForCausalLMLoss for Llama) over the logits, what its forward computes
    given labels; normalized by the step's LM targets as Trainer does."""

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        own = self.accelerator.unwrap_model(model)
        loss = own.loss_function(outputs.logits, labels, vocab_size=outputs.logits.shape[-1],
                                 num_items_in_batch=num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


TRAINERS = {"hf": HFLossTrainer, "fused-lm": FusedLMTrainer, "full": MeasuredTrainer, "rto-rows": RTORowsTrainer}


class StepClock(TrainerCallback):
    """The wall time between the ends of consecutive optimizer steps (the first from the start of training), and
    the peak memory after the last step, before anything after training (the loss plot) can raise it."""

    def __init__(self):
        self.ends: list[float] = []
        self.began: float | None = None
        self.peak_memory_mb: float | None = None

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.began = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(self._now())
        if state.global_step >= state.max_steps:
            self.peak_memory_mb = peak_memory_mib("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def step_times(self) -> list[float]:
        return [b - a for a, b in zip([self.began, *self.ends], self.ends)]


def user_flags(model_dir: str, output_dir: str, args) -> list[str]:
    """`scft-fast train`'s flags for a run of this benchmark (the rest are the CLI's defaults)."""
    flags = ["--model", model_dir, "--output-dir", output_dir, "--max-steps", str(args.steps),
             "--micro-batch-size", str(args.micro_batch_size), "--seed", str(args.seed), "--backend", args.backend,
             "--eval-samples", "0", "--save-every", "0", "--no-progress"]
    if args.rto_keep is not None:
        flags += ["--rto-keep", str(args.rto_keep)]
    if args.packing:
        flags.append("--packing")
    if args.bf16:
        flags.append("--bf16")
    return flags


def train_mode(mode: str, flags: list[str]) -> dict:
    """One run of ``mode`` in this process on `scft-fast train FLAGS`'s set-up; its per-step records (step time,
    input tokens, LM + RTO targets, the logged loss terms) and peak memory."""
    from transformers import set_seed

    from scft_fast.cli.train import configure_allocator, parse_args
    from scft_fast.data import SCFTDataCollator
    from scft_fast.hf.callbacks import read_metrics, run_callbacks
    from scft_fast.hf.run import build_datasets, build_model, build_tokenizer

    model_args, data_args, training, _ = parse_args(flags)
    configure_allocator(training)  # as `scft-fast train` does once it has parsed its flags
    set_seed(training.seed)
    tokenizer, refusal = build_tokenizer(model_args, data_args)
    train_set, _, _ = build_datasets(data_args, tokenizer, data_args.data_config(model_args.pool, training.seed))
    model = build_model(model_args, tokenizer, refusal)
    clock = StepClock()
    trainer = TRAINERS[mode](model=model, args=training, train_dataset=train_set, processing_class=tokenizer,
                             data_collator=SCFTDataCollator(tokenizer, packing=data_args.packing),
                             callbacks=[*run_callbacks(), clock])
    trainer.train()
    logged = [r for r in read_metrics(os.path.join(training.output_dir, "metrics.jsonl")) if "loss" in r]
    rows = [{"step_time_s": t, "tokens": int(tokens), "loss_targets": int(targets), **log}
            for t, (tokens, targets), log in zip(clock.step_times, trainer.step_counts, logged)]
    settings = {"rto_keep": data_args.rto_keep, "optimizer": training.optim, "lr": training.learning_rate,
                "schedule": training.lr_scheduler_type, "warmup_steps": training.warmup_steps}
    return {"rows": rows, "peak_memory_mb": clock.peak_memory_mb, "settings": settings}


def parse_args(argv=None) -> argparse.Namespace:
    from scft_fast.ops.backends import BACKENDS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("cpu", "cuda"), default=None,
                   help="shape and step defaults (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: H=128, V=8192, 2 sequences packed per step, 4 steps (1 dropped), one "
                        "repetition, the modes hf, fused-lm and full")
    add_model_shape_arguments(p, {k: PRESETS[k] for k in ("cpu", "cuda")},
                              "vocabulary size of the model, >= the tokenizer's")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="each step's sequences packed into one row (default: on for cpu), or padded (--no-packing, "
                        "default for cuda)")
    p.add_argument("--micro-batch-size", type=int, help="sequences per step, one micro-batch (cpu 40, cuda 64)")
    p.add_argument("--rto-keep", type=float, default=None,
                   help="fraction of RTO positions kept per harmful sample (default: scft-fast train's; DeRTa's "
                        "full-parameter recipe uses 0.05)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (cpu 20, cuda 30)")
    p.add_argument("--warmup", type=int, help="first steps of each run left out of the figures (cpu 4, cuda 5)")
    p.add_argument("--repeats", type=int, help="runs per mode, interleaved and rotated (default 3; --quick 1)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for the cuda preset, off for cpu)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="safety_loss backend of the fused modes (default auto)")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated subset of {','.join(MODES)} (default: all; --quick: all but the "
                        f"rto-rows control)")
    p.add_argument("--allocator", choices=("cli", "fixed"), default="cli",
                   help="cli: what scft-fast train does for the run (configure_allocator: glibc's defaults on one "
                        "process); fixed: glibc's mmap threshold fixed at 128 KiB, the CLI's setting under DeepSpeed "
                        "(default cli)")
    add_run_arguments(p, "train", "model init and data order seed")
    args = p.parse_args(argv)
    if args.worker is None:
        preset = "quick" if args.quick else args.preset or ("cuda" if torch.cuda.is_available() else "cpu")
        args.preset = preset
        for key, value in PRESETS[preset].items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        if not args.warmup < args.steps:
            p.error(f"--warmup ({args.warmup}) must leave timed steps out of --steps ({args.steps})")
        modes = (args.modes or ",".join(MODES[:3] if args.quick else MODES)).split(",")
        unknown = set(modes) - set(MODES)
        if unknown:
            p.error(f"--modes: unknown {sorted(unknown)}; expected a subset of {MODES}")
        args.modes = [m for m in MODES if m in modes]
    return args


def worker(mode: str, model_dir: str, result_path: str, args) -> None:
    """One training run in this (fresh) process; writes its per-step records and peak memory as JSON."""
    from scft_fast.cli.train import configure_allocator

    if args.allocator == "fixed":
        configure_allocator()  # unconditionally: what `scft-fast train` does under DeepSpeed
    if args.threads:
        torch.set_num_threads(args.threads)
    rss_before = rss_mib()
    with tempfile.TemporaryDirectory(prefix=f"bench_train_{mode}_") as output_dir:
        result = train_mode(mode, user_flags(model_dir, output_dir, args))
    with open(result_path, "w") as f:
        json.dump({"mode": mode, **result, "rss_before_train_mb": rss_before, "threads": torch.get_num_threads(),
                   "device": "cuda" if torch.cuda.is_available() else "cpu",
                   "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()}, f)


def summarize_run(result: dict, warmup: int) -> dict:
    """A run's figures over its steps after the warm-up: medians, so a step hit by another job's burst on a
    shared machine moves them little; the quartiles of the step time say how steady the run was."""
    timed = result["rows"][warmup:]
    times = sorted(r["step_time_s"] for r in timed)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_step_s": statistics.median(times), "step_iqr_s": quartiles[2] - quartiles[0],
            "tokens_per_s": statistics.median(r["tokens"] / r["step_time_s"] for r in timed),
            "peak_memory_mb": result["peak_memory_mb"],
            "tokens_per_step": statistics.median(r["tokens"] for r in timed),
            "loss_targets_per_step": statistics.median(r["loss_targets"] for r in timed),
            "first_loss": result["rows"][0]["loss"], "final_loss": result["rows"][-1]["loss"],
            "step_times_s": [r["step_time_s"] for r in result["rows"]]}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker, args)
        return 0

    # Runs inherit every flag but the preset-resolved ones are passed explicitly, so a worker needs no preset.
    worker_argv = [f"--hidden={args.hidden}", f"--intermediate={args.intermediate}", f"--layers={args.layers}",
                   f"--heads={args.heads}", f"--kv-heads={args.kv_heads}", f"--vocab={args.vocab}",
                   f"--steps={args.steps}", f"--warmup={args.warmup}",
                   f"--micro-batch-size={args.micro_batch_size}", f"--backend={args.backend}",
                   f"--seed={args.seed}", f"--allocator={args.allocator}", "--bf16" if args.bf16 else "--no-bf16",
                   "--packing" if args.packing else "--no-packing"]
    if args.rto_keep is not None:
        worker_argv.append(f"--rto-keep={args.rto_keep}")
    if args.threads:
        worker_argv.append(f"--threads={args.threads}")

    started = utc_now()
    load_start, commit_start = load_average_text(), git_commit()
    command = command_line(__file__, argv)
    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    orders = rotations(args.modes, args.repeats)
    letters = {m: "ABCD"[i] for i, m in enumerate(args.modes)}
    with tempfile.TemporaryDirectory(prefix="bench_train_model_") as model_dir:
        model_info = save_random_llama(args, model_dir)
        print(f"model: Llama H={args.hidden}, I={args.intermediate}, L={args.layers}, heads={args.heads}/"
              f"{args.kv_heads}, V={args.vocab} ({model_info['params'] / 1e6:.1f}M params, LM head "
              f"{model_info['lm_head_params'] / 1e6:.1f}M); tokenizer {model_info['tokenizer_vocab']} tokens",
              flush=True)
        user_command = "scft-fast train " + shlex.join(user_flags("MODEL_DIR", "OUTPUT_DIR", args))
        for rep in range(args.repeats):
            order = orders[rep]
            for mode in order:
                load_before = load_average_text()
                result = run_worker(__file__, mode, model_dir, worker_argv)
                summary = summarize_run(result, args.warmup)
                summary.update(rep=rep, wall_s=result["wall_s"], rss_before_train_mb=result["rss_before_train_mb"],
                               load_before=load_before, load_after=load_average_text())
                runs[mode].append(summary)
                device, device_name, threads = result["device"], result["device_name"], result["threads"]
                settings = result["settings"]
                print(f"  rep {rep} {mode:>8}: median step {summary['median_step_s'] * 1e3:8.1f} ms "
                      f"(IQR {summary['step_iqr_s'] * 1e3:6.1f}), "
                      f"{summary['tokens_per_s']:9.0f} tok/s, peak {summary['peak_memory_mb']:8.0f} MiB "
                      f"(run {result['wall_s']:.0f} s, load {load_before} -> {summary['load_after']})", flush=True)
    finished = utc_now()
    context = dict(command=command, user_command=user_command, settings=settings, started=started, finished=finished,
                   load_start=load_start, commit_start=commit_start, model_info=model_info, device=device,
                   device_name=device_name, threads=threads, orders=orders, letters=letters)
    report(args, runs, **context)
    return 0


def report(args, runs: dict[str, list[dict]], command, user_command, settings, started, finished, load_start,
           commit_start, model_info, device, device_name, threads, orders, letters) -> None:
    """Prints the table and the PASS/MISS lines; writes them (and every run's step times) under --out."""
    table = {}
    for mode, rs in runs.items():
        table[mode] = {key: statistics.median(r[key] for r in rs)
                       for key in ("median_step_s", "tokens_per_s", "peak_memory_mb", "tokens_per_step",
                                   "loss_targets_per_step")}
        table[mode]["step_spread_s"] = (min(r["median_step_s"] for r in rs), max(r["median_step_s"] for r in rs))

    def ratios(a: str, b: str) -> list[float]:
        return [x["median_step_s"] / y["median_step_s"] for x, y in zip(runs[a], runs[b])]

    def versus(a: str, b: str) -> str:
        x, y = table[a]["median_step_s"], table[b]["median_step_s"]
        return (f"{x / y:.3f}x ({x * 1e3:.1f} ms vs {y * 1e3:.1f} ms; per repetition "
                f"{', '.join(f'{r:.3f}' for r in ratios(a, b))})")

    per_rep_ratio, checks = {}, []
    target = FULL_OVER_FUSED_TARGET[device]
    if {"full", "fused-lm"} <= set(runs):
        per_rep_ratio["full/fused-lm"] = ratios("full", "fused-lm")
        ratio = table["full"]["median_step_s"] / table["fused-lm"]["median_step_s"]
        checks.append((ratio <= target, f"full / fused-lm step time <= {target:.2f}: {versus('full', 'fused-lm')}"))
    if {"full", "rto-rows"} <= set(runs):
        per_rep_ratio["full/rto-rows"] = ratios("full", "rto-rows")
        checks.append((None, f"full / rto-rows (the safety terms at equal LM-head rows): "
                             f"{versus('full', 'rto-rows')}; LM+RTO targets per step: full "
                             f"{table['full']['loss_targets_per_step']:.0f}, fused-lm "
                             + (f"{table['fused-lm']['loss_targets_per_step']:.0f}" if "fused-lm" in table
                                else "not run")))
    if {"full", "fused-lm"} <= set(runs):
        f, p = table["full"], table["fused-lm"]
        checks.append((None, f"full / fused-lm peak memory: {f['peak_memory_mb'] / p['peak_memory_mb']:.3f}x "
                             f"({f['peak_memory_mb']:.0f} MiB vs {p['peak_memory_mb']:.0f} MiB)"))
    if {"full", "hf"} <= set(runs):
        per_rep_ratio["full/hf"] = ratios("full", "hf")
        f, h = table["full"], table["hf"]
        ratio = f["median_step_s"] / h["median_step_s"]
        checks.append((ratio < 1.0, f"full faster than hf: step time {versus('full', 'hf')}"))
        mem = f["peak_memory_mb"] / h["peak_memory_mb"]
        checks.append((mem < 1.0, f"full less memory than hf: {mem:.3f}x ({f['peak_memory_mb']:.0f} MiB vs "
                                  f"{h['peak_memory_mb']:.0f} MiB)"))

    dtype = "bfloat16 autocast over float32 weights" if args.bf16 else "float32"
    memory_how = ("torch.cuda.max_memory_allocated after the last step (weights, AdamW state, activations)"
                  if device == "cuda" else
                  "peak RSS of the run's fresh process (ru_maxrss) after the last step: includes python, torch, "
                  "transformers and the tokenized dataset, the same in every mode (RSS before the set-up: "
                  + ", ".join(f"{m} {statistics.median(r['rss_before_train_mb'] for r in rs):.0f} MiB"
                              for m, rs in runs.items()) + ")")
    batch = (f"{args.micro_batch_size} sequences packed into one row per step" if args.packing
             else f"{args.micro_batch_size} padded sequences per step")
    commit_end = git_commit()
    commit = commit_start if commit_end == commit_start else f"{commit_start} at the start, {commit_end} at the end"
    header = [
        f"- date: {started:%Y-%m-%d %H:%M:%S} UTC to {finished:%H:%M:%S}; commit: {commit}; "
        f"torch {torch.__version__}; transformers {transformers.__version__}; "
        f"python {platform.python_version()}",
        f"- command: `{command}`",
        f"- each run: `{user_command}`'s set-up (its parser, builders and callbacks) with the mode's Trainer class, "
        f"in a fresh process; no export; allocator: "
        + ("the CLI's for one process (glibc's defaults)" if args.allocator == "cli"
           else "glibc's mmap threshold fixed at 128 KiB (the CLI's setting under DeepSpeed)"),
        f"- device: {device} ({device_name}, torch threads {threads}); dtype: {dtype}",
        f"- model: random-initialized Llama, H={args.hidden}, intermediate={args.intermediate}, "
        f"layers={args.layers}, heads={args.heads} (kv {args.kv_heads}), V={args.vocab} "
        f"({model_info['params'] / 1e6:.1f}M parameters, LM head {model_info['lm_head_params'] / 1e6:.1f}M, "
        f"untied); the embedded tokenizer has {model_info['tokenizer_vocab']} tokens, so ids stay in range of "
        f"the larger vocabulary",
        f"- data: the embedded DeRTa-format set, rto_keep {settings['rto_keep']}, seed {args.seed}, {batch}; "
        f"{statistics.median(table[m]['tokens_per_step'] for m in table):.0f} tokens per step (median)"
        + (f", {table['full']['loss_targets_per_step']:.0f} LM+RTO targets in full mode"
           if "full" in table else ""),
        f"- steps: {args.steps} per run, the first {args.warmup} dropped (warm-up), the median of the other "
        f"{args.steps - args.warmup}; tokens/s = the median over those steps of input tokens (the same in every "
        f"mode) / step time; step time = between the ends of consecutive optimizer steps (batch fetch, forward, "
        f"backward, optimizer step, the log); the CLI's optimizer recipe for a checkpoint ({settings['optimizer']}, "
        f"lr {settings['lr']:g}, {settings['schedule']}, warmup {settings['warmup_steps']:g})",
        f"- repetitions: {args.repeats} per mode, each run a fresh subprocess, the order rotated each "
        f"repetition ({' '.join(''.join(letters[m] for m in o) for o in orders)}); figures are medians over "
        f"repetitions",
        f"- memory: {memory_how}",
        f"- load average (1, 5, 15 min): start {load_start}, end {load_average_text()}",
    ]
    if args.note:
        header.append(f"- note: {args.note}")
    rows = ["| mode | what | median step ms (min-max over reps) | tokens/s | LM+RTO targets/step | peak MiB "
            "| step vs full |", "|---|---|---:|---:|---:|---:|---:|"]
    for mode, t in table.items():
        rel = (t["median_step_s"] / table["full"]["median_step_s"]) if "full" in table else float("nan")
        lo, hi = t["step_spread_s"]
        rows.append(f"| {mode} ({letters[mode]}) | {MODE_TITLES[mode]} | {t['median_step_s'] * 1e3:,.1f} "
                    f"({lo * 1e3:,.1f}-{hi * 1e3:,.1f}) | {t['tokens_per_s']:,.0f} | "
                    f"{t['loss_targets_per_step']:,.0f} | {t['peak_memory_mb']:,.0f} | {rel:.3f}x |")
    verdicts = [f"- {'PASS' if ok else 'MISS'}: {text}" if ok is not None else f"- info: {text}"
                for ok, text in checks]
    title = f"# Training benchmark: plain IT vs SCFT + DeRTa on SCFTTrainer ({device}: {device_name})"
    markdown = "\n".join([title, "", *header, "", *rows, "",
                          "## Targets (full / fused-lm step time; full vs hf step time and memory)", "", *verdicts, ""])
    print()
    print(markdown)

    if not args.no_save:
        stem = write_results(
            args.out, f"train_{device}_{started:%Y%m%dT%H%MZ}",
            {"command": command, "user_command": user_command, "settings": settings, "header": header,
             "args": {k: v for k, v in vars(args).items() if k != "worker"},
             "model": model_info, "device": device, "device_name": device_name, "threads": threads,
             "table": table, "per_rep_ratio": per_rep_ratio, "runs": runs,
             "checks": [{"pass": ok, "text": text} for ok, text in checks]}, markdown)
        print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    sys.exit(main())
