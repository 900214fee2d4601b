"""The train loop: SCFT + DeRTa in one fused loss, on one process or DeepSpeed ZeRO 1/2/3.

    for step in steps:
        counts = tokens and labels with a loss in this step's micro-batches, summed over ranks
        for batch in this rank's micro-batches:
            loss = model(**batch, num_items_in_batch=tokens / world, num_cls_in_batch=labels / world).loss
            backward(loss)            # each micro-batch's loss is its share of the step's large-batch loss
        optimizer step; log; checkpoint every N steps
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

from ..model import shift_labels
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .components import BatchPlan, build_data, build_model, build_tokenizer, model_config, padded_batches, to_device
from .config import TrainConfig
from .deepspeed_config import resolve_deepspeed_config
from .engine import DeepSpeedEngine, TorchEngine
from .metrics import MetricsLog, evaluate, plot_loss_curves

_STATS = ("loss", "lm_sum", "n_lm", "tr_sum", "n_tr", "cls_sum", "n_cls", "cls_correct", "tokens")


def _init_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.deepspeed is None:
        if world > 1:
            raise ValueError(f"WORLD_SIZE={world} needs a DeepSpeed config for data parallelism: add "
                             f"--deepspeed training/zero1.json (or zero2/zero3)")
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


def _model_inputs(batch: dict, mode: str) -> dict:
    """The batch as forward arguments for a loss mode: "fused-lm" drops the safety targets, "hf" asks for the
    model's own loss over materialized logits."""
    if mode == "full":
        return batch
    inputs = {k: v for k, v in batch.items() if k not in ("transition_labels", "cls_labels")}
    if mode == "hf":
        inputs["hf_loss"] = True
    return inputs


def _step_counts(batches: list[dict], mode: str, ignore: int) -> torch.Tensor:
    """(token targets, labeled sequences) of this rank's micro-batches, counted as the model will count them."""
    tokens = labeled = 0
    for b in batches:
        position_ids = b.get("position_ids")
        tokens += int((shift_labels(b["labels"], position_ids, ignore) != ignore).sum())
        if mode == "full":
            tokens += int((shift_labels(b["transition_labels"], position_ids, ignore) != ignore).sum())
            labeled += int((b["cls_labels"] != ignore).sum())
    return torch.tensor([tokens, labeled], dtype=torch.float64)


def train(config: TrainConfig) -> dict:
    """Runs the configured training; returns the summary (also written to output_dir/summary.json on rank 0)."""
    rank, world, device = _init_distributed(config)
    torch.manual_seed(config.seed)
    os.makedirs(config.output_dir, exist_ok=True)
    tokenizer, refusal = build_tokenizer(config)
    train_set, eval_set, data_stats = build_data(config, tokenizer)
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
    mode = config.loss.mode

    start = 0
    checkpoint = latest_checkpoint(config.output_dir) if config.resume else None
    if checkpoint is not None:
        start = load_checkpoint(engine, checkpoint, rank)
    if rank == 0:
        with open(os.path.join(config.output_dir, "train_config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
    eval_batches = ([to_device(b, device) for b in padded_batches(eval_set, tokenizer.pad_token_id,
                                                                  config.data.micro_batch_size)]
                    if eval_set is not None and config.summary else None)
    before_path = os.path.join(config.output_dir, "eval_before.json")
    before = None
    if eval_batches:
        if start > 0 and os.path.exists(before_path):
            with open(before_path) as f:
                before = json.load(f)
        else:
            before = evaluate(engine, eval_batches, ignore)
            if rank == 0:
                with open(before_path, "w") as f:
                    json.dump(before, f)

    log = MetricsLog(os.path.join(config.output_dir, "metrics.jsonl"), start, enabled=rank == 0)
    progress = None
    if rank == 0 and config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start, desc="scft-fast train", dynamic_ncols=True)
    engine.train(True)
    throughput = []
    for step in range(start, total_steps):
        began = time.perf_counter()
        batches = plan.micro_batches(step, rank)
        tokens, labeled = _all_reduce(_step_counts(batches, mode, ignore), world).tolist()
        stats = torch.zeros(len(_STATS), dtype=torch.float64)
        for i, batch in enumerate(batches):
            batch = to_device(batch, device)
            out = engine.forward(**_model_inputs(batch, mode), num_items_in_batch=tokens / world,
                                 **({"num_cls_in_batch": labeled / world} if mode == "full" else {}))
            engine.backward(out.loss)
            if i + 1 < len(batches):
                engine.micro_step()
            stats += _micro_stats(out, batch, ignore)
        grad_norm = engine.step()
        stats = _all_reduce(stats.to(device), world).cpu()
        elapsed = time.perf_counter() - began
        record = _record(step + 1, plan.locate(step)[0], stats, world, engine.lr, grad_norm, elapsed)
        record["peak_memory_mb"] = _peak_memory_mb(device)
        throughput.append(record["tokens_per_s"])
        log.write(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.3f}", cls_acc=record["head_accuracy"])
        if config.save_every and (step + 1) % config.save_every == 0:
            save_checkpoint(engine, config.output_dir, step + 1, config.keep_checkpoints, rank)
    if progress is not None:
        progress.close()

    after = evaluate(engine, eval_batches, ignore) if eval_batches else None
    model_dir = os.path.join(config.output_dir, "model")
    engine.save_model(model_dir)
    summary = None
    if rank == 0:
        tokenizer.save_pretrained(model_dir)
        plot_loss_curves(log.path, os.path.join(config.output_dir, "loss_curves.png"))
        summary = _summary(config, log.path, before, after, throughput, data_stats, refusal, world, model_dir)
        summary["optimizer"] = _optimizer_summary(config, total_steps, ds_config.config if ds_config else {})
        with open(os.path.join(config.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
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


def _micro_stats(out, batch: dict, ignore: int) -> torch.Tensor:
    stats = torch.zeros(len(_STATS), dtype=torch.float64)
    stats[0] = float(out.loss.detach())
    if out.n_lm is not None:
        n_lm, n_tr, n_cls = float(out.n_lm), float(out.n_tr), float(out.n_cls)
        stats[1:7] = torch.tensor([float(out.lm_loss) * n_lm, n_lm, float(out.transition_loss) * n_tr, n_tr,
                                   float(out.cls_loss) * n_cls, n_cls], dtype=torch.float64)
    if out.cls_logits is not None and out.cls_logits.numel():
        labels = batch["cls_labels"]
        stats[7] = float(((out.cls_logits.argmax(-1) == labels) & (labels != ignore)).sum())
    mask = batch.get("attention_mask")
    stats[8] = float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())
    return stats


def _record(step, epoch, stats, world, lr, grad_norm, elapsed) -> dict:
    s = dict(zip(_STATS, stats.tolist()))

    def mean(total, count):
        return total / count if count else None

    return {"step": step, "epoch": epoch, "loss": s["loss"] / world,
            "lm_loss": mean(s["lm_sum"], s["n_lm"]), "transition_loss": mean(s["tr_sum"], s["n_tr"]),
            "cls_loss": mean(s["cls_sum"], s["n_cls"]), "head_accuracy": mean(s["cls_correct"], s["n_cls"]),
            "lm_tokens": int(s["n_lm"]), "rto_tokens": int(s["n_tr"]), "cls_labels": int(s["n_cls"]),
            "tokens": int(s["tokens"]), "tokens_per_s": s["tokens"] / elapsed, "step_time_s": elapsed,
            "lr": lr, "grad_norm": grad_norm}


def _summary(config, metrics_path, before, after, throughput, data_stats, refusal, world, model_dir) -> dict:
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
        "steps": rows[-1]["step"] if rows else 0, "world_size": world, "loss_mode": config.loss.mode,
        "losses_first_10pct": {k: head_mean(k) for k in ("loss", "lm_loss", "transition_loss", "cls_loss")},
        "losses_last_10pct": {k: tail_mean(k) for k in ("loss", "lm_loss", "transition_loss", "cls_loss")},
        "tokens_per_s": sum(steady) / len(steady) if steady else None,
        "eval_before": before, "eval_after": after, "refusal_token_id": refusal,
        "data": data_stats.to_dict(), "model_dir": model_dir,
    }
