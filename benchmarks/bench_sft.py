"""Plain SFT through the trainers people use: one model, one batch stream, the LM loss computed four ways.

    hf         transformers.Trainer, the model's own loss (the N x V logits materialized)
    scft       transformers.Trainer on apply_scft_fast(model): scft_fast's fused loss
    trl        trl.SFTTrainer as shipped: TRL's own chunked fused LM head, which SFTTrainer 1.16 always patches
               in (trl.trainer.utils.add_fused_lm_head; per-token log-probs, plus entropy and top-1 for its
               metrics; on CPU it scores every row, ignored ones included, in torch tiles)
    trl-scft   scft_fast.SCFTSFTTrainer on apply_scft_fast(model): TRL's trainer, scft_fast's fused loss

TRL 1.16 has no other LM-head loss of its own: `use_liger_kernel=True` needs the liger-kernel package (not
installed here) and SFTTrainer refuses Liger's fused linear cross-entropy (it keeps its own fused head).

Each mode is one run in a fresh subprocess: the same random-initialized Llama (saved once, loaded by every run),
the same pre-tokenized rows (seeded random ids, the first --prompt-frac of each sequence prompt-masked), the same
collator (TRL's DataCollatorForLanguageModeling), optimizer, seed and data order. Figures: the median over the
steps after --warmup of the step time (consecutive on_step_end callbacks: batch fetch, forward, backward,
optimizer, logging), tokens/s = tokens per step / that median; peak memory = the process's peak RSS on CPU
(ru_maxrss: includes python, torch, transformers and the rows, the same in every mode) or
torch.cuda.max_memory_allocated on CUDA. The first step's loss (same weights, same batch) must agree across modes.

    python benchmarks/bench_sft.py               # CPU preset: H=256, 2 layers, V=32000, 2 x 1024 tokens per step
    python benchmarks/bench_sft.py --quick       # smoke run, seconds, writes nothing
    python benchmarks/bench_sft.py --preset cuda # bf16, H=2048, 4 layers, V=128256, 8 x 2048 tokens per step
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time

from harness import (
    add_model_shape_arguments,
    add_run_arguments,
    command_line,
    cpu_name,
    git_commit,
    load_average_text,
    peak_memory_mib,
    rss_mib,
    run_worker,
    save_random_llama,
    utc_now,
    write_results,
)

MODES = ("hf", "scft", "trl", "trl-scft")
MODE_TITLES = {"hf": "transformers.Trainer, the model's own loss (logits materialized)",
               "scft": "transformers.Trainer, apply_scft_fast(model): scft_fast fused loss",
               "trl": "trl.SFTTrainer as shipped: TRL's chunked fused LM head",
               "trl-scft": "scft_fast.SCFTSFTTrainer, apply_scft_fast(model): scft_fast fused loss"}
# CPU: the LM head (V x H = 32000 x 256) is most of a token's matmul work, as in bench_train.py; 2 x 1024 tokens
# per step: a few seconds per step and about a minute per mode on 2 shared cores. CUDA: Llama-3.2-1B's vocabulary and width, 4 layers.
PRESETS = {
    "cpu": dict(hidden=256, intermediate=688, layers=2, heads=4, kv_heads=2, vocab=32000, seq_len=1024,
                batch_size=2, steps=8, warmup=2, bf16=False),
    "cuda": dict(hidden=2048, intermediate=8192, layers=4, heads=32, kv_heads=8, vocab=128256, seq_len=2048,
                 batch_size=8, steps=30, warmup=5, bf16=True),
    "quick": dict(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=4096, seq_len=128,
                  batch_size=2, steps=4, warmup=1, bf16=False),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("cpu", "cuda"), default=None,
                   help="shape and step defaults (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--quick", action="store_true", help="smoke run: H=64, V=4096, 2 x 128 tokens, 4 steps; "
                                                        "writes no result files")
    add_model_shape_arguments(p, {k: PRESETS[k] for k in ("cpu", "cuda")}, "vocabulary size")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (cpu 1024, cuda 2048)")
    p.add_argument("--batch-size", type=int, help="sequences per step, one micro-batch (cpu 2, cuda 8)")
    p.add_argument("--prompt-frac", type=float, default=0.25,
                   help="leading fraction of each sequence with no LM label, the prompt (default 0.25)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (cpu 8, cuda 30)")
    p.add_argument("--warmup", type=int, help="first steps left out of the figures (cpu 2, cuda 5)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for the cuda preset, off for cpu)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    add_run_arguments(p, "sft", "model init, data and order seed")
    args = p.parse_args(argv)
    if args.worker is None:
        import torch

        args.preset = "quick" if args.quick else args.preset or ("cuda" if torch.cuda.is_available() else "cpu")
        args.no_save = args.no_save or args.quick
    for key, value in PRESETS[args.preset or "cpu"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup ({args.warmup}) must leave timed steps out of --steps ({args.steps})")
    if not 0.0 <= args.prompt_frac < 1.0:
        p.error(f"--prompt-frac must be in [0, 1), got {args.prompt_frac}")
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"--modes: unknown {sorted(unknown)}; expected a subset of {MODES}")
    args.modes = [m for m in MODES if m in modes]
    return args


def sft_rows(args):
    """Pre-tokenized rows, the same in every run: seeded random ids, the prompt part without labels."""
    import torch
    from datasets import Dataset

    from scft_fast import IGNORE_INDEX

    g = torch.Generator().manual_seed(args.seed)
    n = args.batch_size * args.steps
    ids = torch.randint(0, args.vocab, (n, args.seq_len), generator=g)
    labels = ids.clone()
    labels[:, : int(args.prompt_frac * args.seq_len)] = IGNORE_INDEX
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def step_clock():
    """A TrainerCallback recording the seconds between consecutive optimizer steps."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.last = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.last is None:
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    return StepClock()


def build_trainer(mode: str, model_dir: str, args, output_dir: str, callbacks=()):
    """The mode's trainer over the saved model and sft_rows(args), max_steps=args.steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    import scft_fast

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    if mode in ("scft", "trl-scft"):
        model = scft_fast.apply_scft_fast(model)
    common = dict(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                  learning_rate=1e-4, lr_scheduler_type="constant", optim="adamw_torch", logging_steps=1,
                  save_strategy="no", report_to="none", seed=args.seed, bf16=args.bf16,
                  gradient_checkpointing=False, dataloader_num_workers=0, use_cpu=device == "cpu",
                  disable_tqdm=True)
    if mode in ("hf", "scft"):
        return Trainer(model=model, args=TrainingArguments(**common), train_dataset=sft_rows(args),
                       data_collator=DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id),
                       callbacks=list(callbacks))
    trainer_cls = SFTTrainer if mode == "trl" else scft_fast.SCFTSFTTrainer
    return trainer_cls(model=model, args=SFTConfig(**common, max_length=args.seq_len), train_dataset=sft_rows(args),
                       processing_class=tokenizer, callbacks=list(callbacks))


def worker(mode: str, model_dir: str, result_path: str, args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clock = step_clock()
    with tempfile.TemporaryDirectory(prefix=f"bench_sft_{mode}_") as output_dir:
        trainer = build_trainer(mode, model_dir, args, output_dir, callbacks=[clock])
        rss_before = rss_mib()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    peak = peak_memory_mib(device)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    with open(result_path, "w") as f:
        json.dump({"mode": mode, "step_times_s": clock.times, "losses": losses, "peak_memory_mb": peak,
                   "rss_before_train_mb": rss_before, "threads": torch.get_num_threads(), "device": device,
                   "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_name()}, f)


def summarize(result: dict, args) -> dict:
    timed = sorted(result["step_times_s"][args.warmup:])
    quartiles = statistics.quantiles(timed, n=4) if len(timed) > 1 else [timed[0]] * 3
    step = statistics.median(timed)
    return {"median_step_s": step, "step_iqr_s": quartiles[2] - quartiles[0],
            "tokens_per_s": args.batch_size * args.seq_len / step, "peak_memory_mb": result["peak_memory_mb"],
            "rss_before_train_mb": result["rss_before_train_mb"], "first_loss": result["losses"][0],
            "final_loss": result["losses"][-1], "losses": result["losses"],
            "step_times_s": result["step_times_s"], "wall_s": result["wall_s"]}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker, args)
        return 0
    worker_argv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in PRESETS["cpu"] if k != "bf16"]
    worker_argv += [f"--prompt-frac={args.prompt_frac}", f"--seed={args.seed}",
                    "--bf16" if args.bf16 else "--no-bf16"] + ([f"--threads={args.threads}"] if args.threads else [])
    started = utc_now()
    load_start, commit_start = load_average_text(), git_commit()
    command = command_line(__file__, argv)
    table = {}
    with tempfile.TemporaryDirectory(prefix="bench_sft_model_") as model_dir:
        model_info = save_random_llama(args, model_dir)
        print(f"model: Llama H={args.hidden}, I={args.intermediate}, L={args.layers}, heads={args.heads}/"
              f"{args.kv_heads}, V={args.vocab} ({model_info['params'] / 1e6:.1f}M params); "
              f"{args.batch_size} x {args.seq_len} tokens per step", flush=True)
        for mode in args.modes:
            load_before = load_average_text()
            result = run_worker(__file__, mode, model_dir, worker_argv)
            table[mode] = summarize(result, args)
            table[mode].update(load_before=load_before, load_after=load_average_text())
            device, device_name, threads = result["device"], result["device_name"], result["threads"]
            t = table[mode]
            print(f"  {mode:>8}: median step {t['median_step_s'] * 1e3:8.1f} ms (IQR {t['step_iqr_s'] * 1e3:6.1f}), "
                  f"{t['tokens_per_s']:8.0f} tok/s, peak {t['peak_memory_mb']:7.0f} MiB, loss "
                  f"{t['first_loss']:.5f} -> {t['final_loss']:.5f} (run {t['wall_s']:.0f} s, load {load_before})",
                  flush=True)
    report(args, table, command=command, started=started, load_start=load_start, commit_start=commit_start,
           model_info=model_info, device=device, device_name=device_name, threads=threads)
    return 0


def report(args, table: dict, command, started, load_start, commit_start, model_info, device, device_name,
           threads) -> None:
    import torch
    import transformers
    import trl

    finished = utc_now()
    commit_end = git_commit()
    commit = commit_start if commit_end == commit_start else f"{commit_start} at the start, {commit_end} at the end"
    base = "hf" if "hf" in table else next(iter(table))
    first = [t["first_loss"] for t in table.values()]
    spread = (max(first) - min(first)) / abs(min(first))
    header = [
        f"- date: {started:%Y-%m-%d %H:%M:%S} UTC to {finished:%H:%M:%S}; commit: {commit}; torch "
        f"{torch.__version__}; transformers {transformers.__version__}; trl {trl.__version__}; python "
        f"{platform.python_version()}",
        f"- command: `{command}`",
        f"- device: {device} ({device_name}, torch threads {threads}); dtype: "
        + ("bfloat16 autocast over float32 weights" if args.bf16 else "float32"),
        f"- model: random-initialized Llama, H={args.hidden}, intermediate={args.intermediate}, layers={args.layers}, "
        f"heads={args.heads} (kv {args.kv_heads}), V={args.vocab} ({model_info['params'] / 1e6:.1f}M parameters, "
        f"LM head {model_info['lm_head_params'] / 1e6:.1f}M, untied)",
        f"- data: {args.batch_size} sequences x {args.seq_len} tokens per step (one micro-batch), seeded random "
        f"ids, the first {args.prompt_frac:.0%} of each sequence without labels; AdamW, constant LR 1e-4, "
        f"no gradient checkpointing, logging every step",
        f"- steps: {args.steps} per run, one run per mode, the first {args.warmup} dropped; step time = median "
        f"over the other {args.steps - args.warmup} of the time between consecutive on_step_end callbacks",
        "- memory: " + ("torch.cuda.max_memory_allocated over train()" if device == "cuda" else
                        "peak RSS of the run's fresh process (ru_maxrss), python and libraries included (RSS "
                        "before train(): " + ", ".join(f"{m} {t['rss_before_train_mb']:.0f} MiB"
                                                       for m, t in table.items()) + ")"),
        f"- load average (1, 5, 15 min): start {load_start}, end {load_average_text()}; per run: "
        + ", ".join(f"{m} {t['load_before']} -> {t['load_after']}" for m, t in table.items()),
        "- first-step loss (same weights, same batch): "
        + ", ".join(f"{m} {t['first_loss']:.6f}" for m, t in table.items()) + f"; relative spread {spread:.1e}",
    ]
    if args.note:
        header.append(f"- note: {args.note}")
    rows = [f"| mode | what | median step ms (IQR) | tokens/s | peak MiB | step vs {base} | memory vs {base} |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for mode, t in table.items():
        b = table[base]
        rows.append(f"| {mode} | {MODE_TITLES[mode]} | {t['median_step_s'] * 1e3:,.1f} ({t['step_iqr_s'] * 1e3:,.1f})"
                    f" | {t['tokens_per_s']:,.0f} | {t['peak_memory_mb']:,.0f} | "
                    f"{t['median_step_s'] / b['median_step_s']:.3f}x | "
                    f"{t['peak_memory_mb'] / b['peak_memory_mb']:.3f}x |")
    title = f"# SFT benchmark: the LM loss through Trainer and TRL ({device}: {device_name})"
    markdown = "\n".join([title, "", *header, "", *rows, ""])
    print()
    print(markdown)
    if not args.no_save:
        stem = write_results(
            args.out, f"sft_{device}_{started:%Y%m%dT%H%MZ}",
            {"command": command, "header": header, "model": model_info, "device": device,
             "device_name": device_name, "threads": threads, "first_loss_spread": spread,
             "args": {k: v for k, v in vars(args).items() if k != "worker"}, "table": table}, markdown)
        print(f"wrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    sys.exit(main())
