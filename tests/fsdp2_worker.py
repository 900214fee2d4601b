"""FSDP2 for test_fsdp2.py: ``torch.distributed.fsdp.fully_shard`` on the decoder layers and the root of an
``apply_scft_fast`` model, trained by a plain loop; the loop is shared with the one-process reference. Run under
torchrun as a worker: OUT_DIR DATA_FILE, one launch for every variant (a launch costs more than the steps), then
what Trainer sets up on these CPU ranks for TrainingArguments(fsdp=True) and for TrainingArguments without
use_cpu, with what scft_fast.hf.distributed_checks says of each.

Data order: step k takes rows [k * ROWS, (k + 1) * ROWS); of them rank r takes its contiguous ROWS / world."""
import json
import sys

import torch
import torch.distributed as dist

import trainer_worker as w
from scft_fast import SCFTDataCollator
from scft_fast.hf.accounting import output_stats, stat_means, step_targets

ROWS, STEPS, LR = 8, 3, 1e-3
VARIANTS = {"untied": {}, "tied": {"tied": True}}


def shard(model) -> None:
    """Each decoder layer its own FSDP2 unit, the rest (embeddings, norm, LM head, SCFT head) the root's."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def train(model, tok, rows, rank: int = 0, world: int = 1) -> list[dict]:
    """STEPS AdamW steps; each rank runs its share of the step's rows with the step's normalizers (LM + RTO targets
    and labeled sequences counted over all ranks), so that the summed per-rank losses are the step's loss and
    FSDP2's gradient average times the world size is the step's gradient. Returns each step's loss, its three
    terms and the head's accuracy (accounting.py's sums over ranks, then means)."""
    collate = SCFTDataCollator(tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    share = ROWS // world
    logs = []
    for step in range(STEPS):
        first = step * ROWS + rank * share
        batch = collate([rows[i] for i in range(first, first + share)])
        normalizers = {}
        if world > 1:  # one process: the model counts its own batch, the definition the ranks must meet
            counts = step_targets([batch])
            dist.all_reduce(counts)
            normalizers = dict(num_items_in_batch=counts[0], num_cls_in_batch=counts[1])
        out = model(**batch, **normalizers)
        assert out.logits is None  # the fused loss: no N x V logits
        (out.loss * world).backward()
        optimizer.step()
        optimizer.zero_grad()
        stats = output_stats(out, batch["cls_labels"])
        if world > 1:
            dist.all_reduce(stats)
        # With the step's normalizers each rank's loss is its share: their sum is the step's loss.
        logs.append({"loss": stats[0].item(), **stat_means(stats)})
    return logs


def full_state(model) -> dict[str, torch.Tensor]:
    """Every parameter whole (an FSDP2 parameter is a DTensor sharded on dim 0; full_tensor all-gathers it)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def trainer_setups(out_dir: str, tok, rows) -> dict:
    """What Trainer trains on these ranks for TrainingArguments(fsdp=True, use_cpu=True) (one step) and for
    TrainingArguments without use_cpu, and what check_distributed says (a warning, an error) of each."""
    import logging

    from accelerate.state import AcceleratorState

    from scft_fast.errors import ConfigError

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    records = Records()
    logging.getLogger("scft_fast.hf.distributed_checks").addHandler(records)
    trainer, _ = w.trainer(tok, rows, w.arguments(f"{out_dir}/trainer_fsdp", max_steps=1, fsdp=True))  # checks
    trainer.train()
    fsdp = {"fsdp": trainer.args.fsdp, "version": trainer.args.fsdp_plugin_args["fsdp_version"],
            "distributed_type": str(trainer.accelerator.distributed_type), "is_fsdp_enabled": trainer.is_fsdp_enabled,
            "wrapped": type(trainer.model_wrapped).__name__, "warnings": records.messages}
    AcceleratorState._reset_state(reset_partial_state=False)
    args = w.arguments(f"{out_dir}/trainer_one", use_cpu=False)
    try:  # SCFTTrainer runs check_distributed when it is built
        w.trainer(tok, rows, args)
        error = None
    except ConfigError as e:
        error = str(e)
    return {"fsdp": fsdp, "without_use_cpu": {"world_size": args.world_size, "error": error}}


def main(out_dir: str, data_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = w.tokenizer()
    rows = w.dataset(tok, data_file)
    for name, kwargs in VARIANTS.items():
        model = w.model(tok, **kwargs)
        shard(model)
        held = {n: {"local": list(p.to_local().shape), "global": list(p.shape)} for n, p in model.named_parameters()}
        logs = train(model, tok, rows, rank, world)
        state = full_state(model)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        if rank == 0:
            torch.save(state, f"{out_dir}/{name}.pt")
            with open(f"{out_dir}/{name}.json", "w") as f:
                json.dump({"logs": logs, "held": held, "tied": tied}, f)
    setups = trainer_setups(out_dir, tok, rows)
    if rank == 0:
        with open(f"{out_dir}/trainer_setups.json", "w") as f:
            json.dump(setups, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
