"""The train loop: SCFT + DeRTa in one fused loss, on one process or DeepSpeed ZeRO 1/2/3.

    for step in steps:
        counts = tokens and labels with a loss in this step's micro-batches, summed over ranks
        for batch in this rank's micro-batches:
            loss = model(**batch, num_items_in_batch=tokens / world, num_cls_in_batch=labels / world).loss
            backward(loss)            # each micro-batch's loss is its share of the step's large-batch loss
        optimizer step; log; checkpoint every N steps

``train(config, loss_hook=LossHook(...))`` trains on another loss than the fused SCFT one: the baselines that
benchmarks/bench_train.py compares against (the model's own loss, the fused LM loss alone) are such hooks.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import RunError, UserError
from .accounting import STEP_STATS, output_stats, stat_means, step_targets
from .checkpoint import latest_checkpoint, load_checkpoint, resume_checkpoint, save_checkpoint
from .components import BatchPlan, build_data, build_model, build_tokenizer, model_config, padded_batches, to_device
from .config import TrainConfig
from .deepspeed_config import resolve_deepspeed_config
from .engine import DeepSpeedEngine, TorchEngine
from .metrics import MetricsLog, evaluate, non_finite_terms, plot_loss_curves, write_json
from .preflight import check_setup
from .reporting import Reporter
from .run_dir import claim_output_dir, resume_changes, say

_STATS = STEP_STATS + ("tokens",)


def _init_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    if config.deepspeed is None:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # ranks on one host share its cores
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


@dataclass(frozen=True)
class LossHook:
    """What a step trains on instead of the fused SCFT loss over every target of the batch.

    ``targets(batch) -> inputs``: the micro-batch's forward arguments, targets dropped or relabeled; the step's
    normalizers (``num_items_in_batch``, and ``num_cls_in_batch`` when ``cls_labels`` remain) are counted over
    what it returns, as the model counts them. ``loss(forward, inputs, num_items_in_batch) -> output``: the
    output, with the fused loss's fields (loss, lm_loss, transition_loss, cls_loss, n_lm, n_tr, n_cls), computed
    through ``forward`` (the engine's: autocast, DeepSpeed); None: the model's forward with the normalizers.
    ``name`` is the summary's ``loss_mode``."""

    name: str
    targets: Callable[[dict], dict]
    loss: Callable[..., object] | None = None


def train(config: TrainConfig, loss_hook: LossHook | None = None) -> dict:
    """Runs the configured training; returns the summary (also written to output_dir/summary.json on rank 0).
    ``loss_hook``: another loss than the fused SCFT one (``LossHook``).
    Raises UserError on a bad set-up or a refused output directory (before any heavy work), RunError when the
    run diverges."""
    check_setup(config)
    rank, world, device = _init_distributed(config)
    lock = claim_output_dir(config, rank)
    try:
        return _run(config, rank, world, device, loss_hook)
    finally:
        lock.release()


def _run(config: TrainConfig, rank: int, world: int, device: torch.device, loss_hook: LossHook | None) -> dict:
    torch.manual_seed(config.seed)
    report = say if rank == 0 else (lambda message: None)
    changes = resume_changes(config) if config.resume and rank == 0 else []
    tokenizer, refusal = build_tokenizer(config)
    train_set, eval_sets, data_stats = build_data(config, tokenizer)
    plan = BatchPlan(train_set, config, tokenizer.pad_token_id, world)
    total_steps = config.max_steps
    if total_steps is None:
        total_steps = sum(plan.steps_in_epoch(e) for e in range(config.epochs))
    # Alive until training ends: under ZeRO-3 transformers builds the model inside zero.Init while it exists.
    ds_config = (resolve_deepspeed_config(config.deepspeed, config, world, total_steps,
                                          model_config(config, tokenizer)) if config.deepspeed else None)
    model = build_model(config, tokenizer, refusal)
    engine = (DeepSpeedEngine(model, config, total_steps, device, ds_config.config) if ds_config
              else TorchEngine(model, config, total_steps, device))
    ignore = engine.module.scft_config.ignore_index
    targets = loss_hook.targets if loss_hook is not None else (lambda batch: batch)
    hook_loss = loss_hook.loss if loss_hook is not None else None

    start = 0
    checkpoint = resume_checkpoint(config.output_dir, report) if config.resume else None
    if checkpoint is not None:
        start = load_checkpoint(engine, checkpoint, rank)
        report(f"resuming from {checkpoint} (step {start})"
               + "".join(f"\n  changed on resume: {change}" for change in changes))
        if start > total_steps:
            raise UserError(f"--max-steps {total_steps} is below the step of the checkpoint resumed ({start}): pass "
                            f"--max-steps {start} or more")
        summary_path = os.path.join(config.output_dir, "summary.json")
        if start == total_steps and os.path.exists(summary_path):
            report(f"the run in {config.output_dir} is finished ({start} of {total_steps} steps): nothing to do; "
                   f"pass a larger --max-steps to train further")
            with open(summary_path) as f:
                return json.load(f)
    elif config.resume:
        report(f"no checkpoint in {config.output_dir}: starting from step 0")
    if rank == 0:
        write_json(os.path.join(config.output_dir, "train_config.json"), config.to_dict())
    eval_batches = {name: [to_device(b, device) for b in padded_batches(eval_set, tokenizer.pad_token_id,
                                                                        config.data.micro_batch_size)]
                    for name, (eval_set, _) in eval_sets.items()} if config.summary else {}
    before = {}
    for name, batches in eval_batches.items():
        before_path = os.path.join(config.output_dir, f"{name}_before.json")
        if start > 0 and os.path.exists(before_path):
            with open(before_path) as f:
                before[name] = json.load(f)
        else:
            before[name] = evaluate(engine, batches, ignore)
            if rank == 0:
                write_json(before_path, before[name], indent=None)

    log = MetricsLog(os.path.join(config.output_dir, "metrics.jsonl"), start, enabled=rank == 0, report=report)
    reporter = Reporter(config.report_to, config.output_dir, total_steps, model=engine.module, enabled=rank == 0)
    progress = None
    if rank == 0 and config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start, desc="scft-fast train", dynamic_ncols=True)
    engine.train(True)
    throughput = []
    for step in range(start, total_steps):
        began = time.perf_counter()
        batches = [targets(b) for b in plan.micro_batches(step, rank)]
        # Step-wide normalizers, counted as the model counts; kept on the device (no host sync per step).
        counts = step_targets(batches, ignore).to(device, torch.float64)
        tokens, labeled = _all_reduce(counts, world) / world
        stats = torch.zeros(len(_STATS), dtype=torch.float64, device=device)
        for i, batch in enumerate(batches):
            batch = to_device(batch, device)
            if hook_loss is not None:
                out = hook_loss(engine.forward, batch, tokens)
            elif batch.get("cls_labels") is not None:
                out = engine.forward(**batch, num_items_in_batch=tokens, num_cls_in_batch=labeled)
            else:
                out = engine.forward(**batch, num_items_in_batch=tokens)
            engine.backward(out.loss)
            if i + 1 < len(batches):
                engine.micro_step()
            mask = batch.get("attention_mask")
            seen = mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel(), device=device)
            stats += torch.cat([output_stats(out, batch.get("cls_labels"), ignore), seen.double()[None]])
        grad_norm = engine.step()
        stats = _all_reduce(stats, world).cpu()
        elapsed = time.perf_counter() - began
        record = _record(step + 1, plan.locate(step)[0], stats, world, engine.lr, grad_norm, elapsed)
        record["peak_memory_mb"] = _peak_memory_mb(device)
        throughput.append(record["tokens_per_s"])
        log.write(record)
        reporter.log(record)
        diverged = non_finite_terms(record)
        if diverged:
            if progress is not None:
                progress.close()
            reporter.close()
            raise RunError(f"the run diverged at step {step + 1}: {', '.join(diverged)}. It stopped without saving "
                           f"a checkpoint or a model; the last good checkpoint is "
                           f"{latest_checkpoint(config.output_dir) or 'none'} (lower --lr or --grad-clip, or check "
                           f"the loss coefficients, then --resume)")
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.3f}", cls_acc=record["head_accuracy"])
        if config.save_every and (step + 1) % config.save_every == 0:
            save_checkpoint(engine, config.output_dir, step + 1, config.keep_checkpoints, rank)
    if progress is not None:
        progress.close()
    reporter.close()

    after = {name: evaluate(engine, batches, ignore) for name, batches in eval_batches.items()}
    model_dir = os.path.join(config.output_dir, "model")
    engine.save_model(model_dir)
    summary = None
    if rank == 0:
        tokenizer.save_pretrained(model_dir)
        plot_loss_curves(log.path, os.path.join(config.output_dir, "loss_curves.png"))
        titles = {name: title for name, (_, title) in eval_sets.items() if name in after}
        summary = _summary(config, log.path, before, after, titles, throughput, data_stats, refusal, world,
                           model_dir, "full" if loss_hook is None else loss_hook.name)
        summary["optimizer"] = _optimizer_summary(config, total_steps, ds_config.config if ds_config else {})
        write_json(os.path.join(config.output_dir, "summary.json"), summary)
    if world > 1:
        dist.barrier()
    return summary


def _optimizer_summary(config: TrainConfig, total_steps: int, ds: dict) -> dict:
    """What set the learning rate: the recipe of defaults, or the DeepSpeed JSON's own sections."""
    optim = config.optim
    return {"recipe": optim.recipe, "lr": optim.lr, "weight_decay": optim.weight_decay,
            "schedule": optim.schedule, "warmup_steps": optim.warmup_steps_for(total_steps),
            "optimizer": ds["optimizer"].get("type") if "optimizer" in ds else "torch AdamW",
            "scheduler": ds["scheduler"].get("type") if "scheduler" in ds else optim.schedule}


def _peak_memory_mb(device: torch.device) -> float:
    """This rank's peak: allocated device memory on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux reports KiB


def _record(step, epoch, stats, world, lr, grad_norm, elapsed) -> dict:
    s = dict(zip(_STATS, stats.tolist()))
    return {"step": step, "epoch": epoch, "loss": s["loss"] / world, **stat_means(stats[:len(STEP_STATS)]),
            "lm_tokens": int(s["n_lm"]), "rto_tokens": int(s["n_tr"]), "cls_labels": int(s["n_cls"]),
            "tokens": int(s["tokens"]), "tokens_per_s": s["tokens"] / elapsed, "step_time_s": elapsed,
            "lr": lr, "grad_norm": grad_norm}


def _summary(config, metrics_path, before, after, titles, throughput, data_stats, refusal, world,
             model_dir, loss_mode: str) -> dict:
    from .metrics import read_metrics

    rows = read_metrics(metrics_path)
    tail = rows[-max(1, len(rows) // 10):]

    def tail_mean(key):
        values = [r[key] for r in tail if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    def head_mean(key):
        head = rows[:max(1, len(rows) // 10)]
        values = [r[key] for r in head if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    steady = throughput[1:] or throughput
    return {
        "steps": rows[-1]["step"] if rows else 0, "world_size": world, "loss_mode": loss_mode,
        "losses_first_10pct": {k: head_mean(k) for k in ("loss", "lm_loss", "transition_loss", "cls_loss")},
        "losses_last_10pct": {k: tail_mean(k) for k in ("loss", "lm_loss", "transition_loss", "cls_loss")},
        "tokens_per_s": sum(steady) / len(steady) if steady else None,
        # "{name}_before" / "{name}_after" per eval set ("eval", "separate"); eval_sets: their column titles
        **{f"{name}_{when}": figures.get(name) for name in ("eval", *titles) for when, figures in
           (("before", before), ("after", after))},
        "eval_sets": titles, "refusal_token_id": refusal,
        "data": data_stats.to_dict(), "model_dir": model_dir,
    }
