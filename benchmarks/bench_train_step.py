"""Training steps on one device, four ways, paired in one run: does SCFT + DeRTa cost anything over plain
instruction tuning at equal rows?

  full    SCFT + DeRTa: apply_scft_fast(model, SCFTConfig(...)) trained by SCFTTrainer: LM + RTO transition loss +
          the classification head, one fused pass over the vocabulary
  plain   plain SFT: apply_scft_fast(model) (the fused LM loss) trained by transformers.Trainer
  hf      plain SFT: the model's own loss (the N x V logits materialized), transformers.Trainer
  liger   plain SFT: Liger-Kernel's fused linear cross-entropy, only that kernel patched in, transformers.Trainer
          (CUDA, when Liger-Kernel imports)

Equal rows: the plain modes train on full's batches with every RTO target turned into an LM target (DeRTa's RTO
and LM targets never share a row) and without the head's labels, so the LM head visits the same rows in every mode
and only the safety terms differ. Tokens per step are the same in every mode.

Model: a random-initialized Llama from transformers' LlamaConfig (GPU: Llama-3.2-1B's width and vocabulary, 4
layers, 0.77B parameters, untied head), SDPA attention, bf16 autocast over float32 weights on CUDA. Data: synthetic
DeRTa-shaped rows of random token ids (``synthetic_rows``), as build_dataset lays them out, packed into one row of
<= --max-tokens tokens per step by ``SCFTDataCollator(packing=True)``: the same packs in the same order in every
mode, no datasets library.

Timing: every run is a fresh model (one seed: the same weights) and a fresh Trainer; a step is the wall time
between the ends of consecutive optimizer steps, CUDA synchronized (data, forward, backward, optimizer); the first
--warmup steps are dropped, a run's figure is the median over the rest. Runs are interleaved by repetition, the mode
order rotated each time; ratios are taken per repetition (paired), then their median. Peak memory: CUDA
max_memory_allocated over the run (weights, gradients, AdamW state, activations); CPU: the process's peak RSS over
the run (VmHWM after a reset), which also holds python and torch.

Each finished run is one line of train_step_<device>_<UTC date>.jsonl; train_step_report.py turns the lines into
the table (also for a run cut by benchmarks/gpu_run.py). Whatever cannot run here is a "not run: <reason>" row.

    python benchmarks/bench_train_step.py --out-dir DIR                        # CUDA: the shape above
    python benchmarks/bench_train_step.py --device cpu --smoke --out-dir DIR   # tiny, seconds: the code paths only
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness import (
    ResultStream,
    add_device_argument,
    check_device,
    device_name,
    proc_status_kib,
    read_stream,
    reset_peak_rss,
    result_stem,
    rotations,
    run_record,
    utc_now,
    write_results,
)
from train_step_report import MODES, render, run_figures, summarize

# Model, batch and run length per device; --smoke: tiny, the code paths only.
SHAPES = {
    "cuda": dict(hidden=2048, intermediate=8192, layers=4, heads=32, kv_heads=8, vocab=128256, max_tokens=8192,
                 prompt=(32, 256), target=(32, 512), steps=6, warmup=2, repeats=3),
    "smoke": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512, max_tokens=192,
                  prompt=(4, 12), target=(4, 24), steps=2, warmup=1, repeats=1),
}
EOS_ID, REFUSAL_ID = 2, 3  # token ids of the synthetic rows; any id below the vocabulary would do


def synthetic_rows(count: int, vocab: int, prompt: tuple[int, int], target: tuple[int, int],
                   seed: int) -> list[dict]:
    """DeRTa's sample mix from random token ids, laid out as scft_fast.data.build_dataset lays out its rows (HF
    convention, unshifted; scft_fast/data/encode.py): a third each of benign MLE samples (LM targets on the answer,
    SAFE), harmful MLE samples (LM targets on the refusal, UNSAFE) and harmful RTO samples (the refusal token as the
    transition target at every answer position, rto_keep 1, UNSAFE). Prompt and answer lengths are uniform in the
    given ranges; every answer ends with EOS, the pooled row."""
    from scft_fast import IGNORE_INDEX
    from scft_fast.data import SAFE, UNSAFE

    rng = random.Random(seed)
    rows = []
    for i in range(count):
        kind = ("benign", "refusal", "rto")[i % 3]
        prompt_ids = [rng.randrange(4, vocab) for _ in range(rng.randint(*prompt))]
        answer = [rng.randrange(4, vocab) for _ in range(rng.randint(*target) - 1)] + [EOS_ID]
        ignored = [IGNORE_INDEX] * len(prompt_ids)
        labels = ignored + ([IGNORE_INDEX] * len(answer) if kind == "rto" else answer)
        transition = ignored + ([REFUSAL_ID] * len(answer) if kind == "rto" else [IGNORE_INDEX] * len(answer))
        rows.append({"input_ids": prompt_ids + answer, "labels": labels, "transition_labels": transition,
                     "cls_pos": len(prompt_ids) + len(answer) - 1, "cls_label": SAFE if kind == "benign" else UNSAFE})
    return rows


def pack(rows: list[dict], max_tokens: int, steps: int) -> list[list[dict]]:
    """Greedy packs of <= max_tokens tokens, one per step; the rows are consumed in order."""
    packs, current, used = [], [], 0
    for row in rows:
        n = len(row["input_ids"])
        if used + n > max_tokens:
            packs.append(current)
            if len(packs) == steps:
                return packs
            current, used = [], 0
        current.append(row)
        used += n
    raise ValueError(f"{len(rows)} rows fill {len(packs)} packs of {max_tokens} tokens, {steps} needed")


class PackCollator:
    """Batch size 1, one pack per step: SCFTDataCollator(packing=True) over its rows. ``plain``: RTO targets as LM
    targets, no head labels (the plain modes' batch at equal rows). ``tokens`` lists each batch's tokens in the order
    the Trainer asked for them, which is the order of its steps."""

    def __init__(self, plain: bool):
        from scft_fast import SCFTDataCollator

        self.collate, self.plain = SCFTDataCollator(None, packing=True), plain
        self.tokens: list[int] = []

    def __call__(self, packs: list[list[dict]]) -> dict:
        from scft_fast import IGNORE_INDEX

        (rows,) = packs
        batch = self.collate(rows)
        self.tokens.append(int(batch["input_ids"].numel()))
        if not self.plain:
            return batch
        labels = torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["transition_labels"])
        return {**{k: v for k, v in batch.items() if k not in ("transition_labels", "cls_labels", "cls_index")},
                "labels": labels}


def loss_rows(batch: dict) -> int:
    from scft_fast import IGNORE_INDEX

    return sum(int((batch[k] != IGNORE_INDEX).sum()) for k in ("labels", "transition_labels") if k in batch)


def build_model(shape: dict, device: torch.device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         max_position_embeddings=max(2048, shape["max_tokens"]), tie_word_embeddings=False,
                         eos_token_id=EOS_ID, pad_token_id=EOS_ID, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config)


def liger_patch():
    """Liger-Kernel's fused linear cross-entropy for one Llama instance, nothing else of Liger's; raises when it is
    not there. Returns (patch(model), restore()): Liger versions that patch the class's forward instead of the
    instance's are undone after the run."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaForCausalLM.forward

    def patch(model):
        apply_liger_kernel_to_llama(rope=False, cross_entropy=False, fused_linear_cross_entropy=True,
                                    rms_norm=False, swiglu=False, model=model)
        return model

    def restore():
        modeling_llama.LlamaForCausalLM.forward = original

    return patch, restore


def make_clock(device: torch.device):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time between the ends of consecutive optimizer steps, the device synchronized."""

        def __init__(self):
            self.times: list[float] = []
            self.last = None

        def _now(self) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            now = self._now()
            self.times.append(now - self.last)
            self.last = now

    return StepClock()


def training_arguments(output_dir: str, steps: int, device: torch.device, seed: int):
    """The same TrainingArguments in every mode: one packed row per step, constant LR, no saving, one log line at
    the end (the run's mean loss), bf16 autocast on CUDA, Trainer's default optimizer."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=1, learning_rate=1e-5,
        lr_scheduler_type="constant", warmup_steps=0, logging_strategy="steps", logging_steps=steps,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, bf16=device.type == "cuda", use_cpu=device.type == "cpu", seed=seed,
        data_seed=seed)


def train_run(mode: str, packs: list[list[dict]], shape: dict, device: torch.device, args, liger) -> dict:
    """One mode, one fresh model and Trainer: its per-step times, peak memory and logged losses."""
    from transformers import Trainer

    from scft_fast import SCFTConfig, SCFTTrainer, apply_scft_fast

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        resident_before = torch.cuda.memory_allocated(device)
    else:
        resident_before = None
        rss_reset = reset_peak_rss()
    model = build_model(shape, device, args.seed)
    restore = None
    if mode == "full":
        model = apply_scft_fast(model, SCFTConfig(refusal_token_id=REFUSAL_ID))
    elif mode == "plain":
        model = apply_scft_fast(model)
    elif mode == "liger":
        patch, restore = liger
        model = patch(model)
    clock = make_clock(device)
    steps = len(packs)
    with tempfile.TemporaryDirectory(prefix=f"train_step_{mode}_") as output_dir:
        training_args = training_arguments(output_dir, steps, device, args.seed)
        trainer_class = SCFTTrainer if mode == "full" else Trainer
        collator = PackCollator(plain=mode != "full")
        trainer = trainer_class(model=model, args=training_args, train_dataset=packs, data_collator=collator,
                                callbacks=[clock])
        try:
            trainer.train()
        finally:
            if restore is not None:
                restore()
        logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = proc_status_kib("VmHWM") * 1024 if rss_reset else None
    del trainer, model
    gc.collect()
    return {"step_times_s": clock.times, "tokens_per_step": collator.tokens[:len(clock.times)],
            "peak_memory_bytes": peak, "resident_before_bytes": resident_before, "train_loss": logs.get("train_loss"),
            "logs": logs}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Training steps: SCFT + DeRTa vs plain fused SFT vs the model's own "
                                             "loss vs Liger-Kernel, paired in one run.")
    add_device_argument(ap, "the model shape and precision")
    ap.add_argument("--smoke", action="store_true", help="tiny model and packs, one repetition: the code paths only")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (cuda 6)")
    ap.add_argument("--warmup", type=int, default=None, help="steps dropped at the start of each run (cuda 2)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per mode, interleaved (cuda 3)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per packed step (cuda 8192)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of %(default)s")
    ap.add_argument("--seed", type=int, default=0, help="model weights and data seed; default %(default)s")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default torch's own")
    ap.add_argument("--out-dir", required=True, help="where train_step_<device>_<UTC date>.jsonl/.json/.md go")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    kind = check_device(ap, args.device)
    args.shape = dict(SHAPES["smoke" if args.smoke or kind == "cpu" else "cuda"])
    for key in ("steps", "warmup", "repeats", "max_tokens"):
        if getattr(args, key) is not None:
            args.shape[key] = getattr(args, key)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        ap.error(f"--modes: unknown {sorted(unknown)}; expected a subset of {list(MODES)}")
    args.at_target_shape = kind == "cuda" and not args.smoke and args.shape == SHAPES["cuda"]
    return args


def main(argv=None) -> int:
    import transformers

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, shape = torch.device(args.device), args.shape
    started = utc_now()
    stem = result_stem("train_step", device.type, started)
    stream = ResultStream(Path(args.out_dir) / f"{stem}.jsonl")

    steps = shape["warmup"] + shape["steps"]
    mean_row = (sum(shape["prompt"]) + sum(shape["target"])) / 2
    rows = synthetic_rows(int(2 * steps * shape["max_tokens"] / mean_row) + 64, shape["vocab"], shape["prompt"],
                          shape["target"], args.seed)  # twice the rows the packs need, on average
    packs = pack(rows, shape["max_tokens"], steps)
    full_batches = [PackCollator(plain=False)([p]) for p in packs]
    plain_batches = [PackCollator(plain=True)([p]) for p in packs]
    loss_rows_per_pack = [loss_rows(b) for b in full_batches]
    if loss_rows_per_pack != [loss_rows(b) for b in plain_batches]:
        raise AssertionError("the plain batches do not have full's loss rows: the comparison would not be at "
                             "equal rows")
    params = sum(p.numel() for p in build_model(shape, torch.device("meta"), args.seed).parameters())
    with tempfile.TemporaryDirectory() as scratch:
        optim = getattr(training_arguments(scratch, 1, device, args.seed).optim, "value", "?")
    model_shape = {k: shape[k] for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")}
    stream.write("start", **run_record(__file__, args.argv, device, started), model={**model_shape, "params": params},
                 precision="bf16 autocast over float32 weights" if device.type == "cuda" else "float32",
                 attention="sdpa", tokens_per_pack=[int(b["input_ids"].numel()) for b in full_batches],
                 loss_rows_per_pack=loss_rows_per_pack, steps=shape["steps"], warmup=shape["warmup"],
                 repeats=shape["repeats"], modes=args.modes, at_target_shape=args.at_target_shape,
                 optim=optim,
                 memory_method="torch.cuda.max_memory_allocated over the run" if device.type == "cuda" else
                 "the process's peak RSS over the run (VmHWM after a reset through /proc/self/clear_refs)")

    modes, liger = list(args.modes), None
    if "liger" in modes:
        reason = None
        if device.type != "cuda":
            reason = "Liger-Kernel runs on CUDA only"
        else:
            try:
                liger = liger_patch()
            except Exception as e:  # absent, or built for another transformers / triton
                reason = f"Liger-Kernel not importable ({type(e).__name__}: {e})"
        if reason:
            stream.write("skipped", mode="liger", reason=reason)
            modes.remove("liger")
    cut = None
    try:
        for rep, order in enumerate(rotations(modes, shape["repeats"])):
            for mode in order:
                began = time.perf_counter()
                try:
                    run = train_run(mode, packs, shape, device, args, liger)
                except Exception as e:  # one failed mode (out of memory, a missing piece) leaves the others
                    stream.write("run", mode=mode, rep=rep, error=f"{type(e).__name__}: {e}"[:2000])
                    print(f"{mode} repetition {rep} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                figures = run_figures(run["step_times_s"], run["tokens_per_step"], shape["warmup"])
                stream.write("run", mode=mode, rep=rep, wall_s=time.perf_counter() - began, **figures, **run)
                print(f"rep {rep} {mode:>5}: median step {figures['median_step_s'] * 1e3:9.1f} ms, "
                      f"{figures['tokens_per_s']:10,.0f} tokens/s", flush=True)
    except KeyboardInterrupt:
        # benchmarks/gpu_run.py stops a step at its time limit with SIGINT: the finished runs are the figures.
        cut = "stopped (SIGINT) during the runs"
    stream.write("end", cut=cut, transformers=transformers.__version__)
    stream.close()
    report = summarize(read_stream(stream.path))
    markdown = "\n".join([f"# Training step: SCFT + DeRTa vs plain SFT ({device_name(device)})", "",
                          f"- command: `{report['start']['command']}`; commit {report['start']['commit']}; "
                          f"{report['start']['date_utc']}", *render(report)]) + "\n"
    print("\n" + markdown)
    path = write_results(args.out_dir, stem, {"report": report}, markdown)
    print(f"wrote {path}.json, .md and .jsonl")
    return 130 if cut else 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
