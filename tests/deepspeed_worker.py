"""Run under torchrun by test_deepspeed.py. One 2-rank launch (a launch costs far more than a few tiny steps) does,
in turn:

- `scft-fast train` for every ZeRO variant (STAGES), each into its own output directory: the CLI's main() called
  in process on the flags a user types (``train_flags``), so parsing, set-up, SCFTTrainer, callbacks and export
  are the command's own;
- the ZeRO-3 builds from checkpoint directories (``record_build``);
- the ZeRO-3 run resumed from its step-2 checkpoint;
- a plain ``transformers.Trainer`` with ``run_callbacks``, run through, and run again interrupted, damaged and
  resumed (``plain_trainer_runs``).

What the test reads beyond the runs' own files goes to OUT/records (``Recording``, ``record_build``)."""
import json
import os
import shutil
import sys
from contextlib import contextmanager
from unittest import mock

import torch
import torch.distributed as dist

from helpers import load_export, shares_master_weights

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# On a checkpoint the recipe is DeRTa's (lr 2e-5), which would move the weights less in three steps than the 1e-4
# the exports are compared at: the tiny preset's lr, warmed up over one step.
CHECKPOINT_LR = ["--lr", "3e-3", "--warmup-steps", "1"]
LORA = ["--lora-rank", "4", "--lora-alpha", "16", "--lora-dropout", "0",
        "--lora-target-modules", ",".join(LORA_TARGETS)]
STAGES = {  # name: (DeepSpeed config, model ("checkpoint": the directory test_deepspeed.py wrote), held-out
    #              samples, further flags)
    "zero1": ("training/zero1.json", "tiny", 0, []),
    "zero2": ("training/zero2.json", "tiny", 0, []),
    "zero2_packed": ("training/zero2.json", "tiny", 0, ["--packing"]),
    "zero3": ("training/zero3.json", "tiny", 8, []),
    "zero3_tied": ("training/zero3.json", "tiny-tied", 0, []),
    "zero3_offload": ("training/zero3_offload.json", "tiny", 0, []),
    "zero3_checkpoint": ("training/zero3.json", "checkpoint", 0, CHECKPOINT_LR),
    "zero3_lora": ("training/zero3.json", "checkpoint", 0, CHECKPOINT_LR + LORA),
    "zero1_sections": ("{out}/sections.json", "tiny", 8, []),
}
# A config whose optimizer and scheduler sections DeepSpeed builds, "auto" fields filled from the flags. WarmupLR's
# log warmup, not the linear warmup of --lr-scheduler-type: the logged learning rates tell the two apart.
SECTIONS = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto", "torch_adam": True}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                         "warmup_num_steps": "auto", "warmup_type": "log"}}}
EXPORT_SHARD_BYTES = 200_000  # the tiny model's float32 weights are ~1.3 MB: several shards
PLAIN_STEPS, PLAIN_STOP = 4, 3  # the plain Trainer's run, and the step its interrupted twin stops at


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def train_flags(name: str, data_file: str, checkpoint: str, output_dir: str, out_dir: str = "", ranks: int = 2):
    """`scft-fast train`'s flags for stage ``name``: under torchrun, 2 ranks x grad-accum 2 with the stage's DeepSpeed
    config, a checkpoint every 2 steps (and the last); with ranks=1 the one-process run it must equal: grad-accum 4,
    no DeepSpeed, no checkpoints, no held-out summary. Clipping is the default (1.0) on both."""
    config, model, eval_samples, extra = STAGES[name]
    argv = ["--model", checkpoint if model == "checkpoint" else model, "--data", data_file, "--max-steps", "3",
            "--micro-batch-size", "4", "--no-progress", "--output-dir", output_dir, *extra]
    if ranks == 1:
        return argv + ["--grad-accum", "4", "--save-strategy", "no", "--eval-samples", "0"]
    argv += ["--grad-accum", "2", "--deepspeed", config.format(out=out_dir), "--save-every", "2",
             "--eval-samples", str(eval_samples)]
    return argv + (["--eval-data", data_file] if eval_samples else [])


def scft_fast_train(argv: list[str]) -> None:
    from accelerate.state import AcceleratorState

    from scft_fast.cli.train import main

    code = main(argv)
    if code != 0:
        raise RuntimeError(f"scft-fast train {' '.join(argv)} exited with {code}")
    # One process, several runs: accelerate's state (and its DeepSpeed plugin) is per run, as in one launch each.
    AcceleratorState._reset_state(reset_partial_state=False)


@contextmanager
def recording(path: str):
    """SCFTTrainer as `scft-fast train` builds it, also writing ``path`` (on every rank, ``{rank}`` in it
    replaced): the tokens of each micro-batch this rank trained on, in order ("batches": the input ids its
    attention mask keeps), and once training has ended what its DeepSpeed engine holds: whether the ZeRO optimizer's
    master weights are the model's partitions (null: not a ZeRO-3 optimizer), the optimizer's and scheduler's
    classes (null: DeepSpeed steps no scheduler, Trainer steps its own), whether DeepSpeed built the optimizer
    itself (from the JSON's section), and its hyperparameters."""
    import scft_fast.hf.trainer

    class Recording(scft_fast.hf.trainer.SCFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.record = {"batches": []}

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                ids, mask = inputs["input_ids"], inputs.get("attention_mask")
                self.record["batches"].append((ids[mask.bool()] if mask is not None else ids.reshape(-1)).tolist())
            return super().compute_loss(model, inputs, *args, **kwargs)

        def train(self, *args, **kwargs):
            result = super().train(*args, **kwargs)
            engine = self.model_wrapped
            if hasattr(engine, "basic_optimizer"):
                group = engine.basic_optimizer.param_groups[0]
                self.record.update(
                    master_weights_shared=shares_master_weights(engine.optimizer),
                    optimizer=type(engine.basic_optimizer).__name__,
                    scheduler=None if engine.lr_scheduler is None else type(engine.lr_scheduler).__name__,
                    optimizer_from_config=engine.client_optimizer is None,
                    hyperparameters={k: group[k] for k in ("betas", "eps", "weight_decay")})
            with open(path.format(rank=rank()), "w") as f:
                json.dump(self.record, f)
            return result

    with mock.patch.object(scft_fast.hf.trainer, "SCFTTrainer", Recording):
        yield


def record_build(out_dir: str, data_file: str, model_dir: str, name: str) -> None:
    """What a rank holds right after `scft-fast train --model model_dir`'s ZeRO-3 build (run.build_model under the
    stage's live TrainingArguments, seeded as train() seeds it): each parameter's local and full sizes
    (build_{name}_rank{r}.json), and the whole state dict, gathered one parameter at a time, for rank 0 to save
    (build_{name}.pt). A ValueError from the build is saved instead (build_{name}_error.txt)."""
    import deepspeed
    from transformers import set_seed

    from scft_fast.cli.train import parse_args
    from scft_fast.hf.run import build_model, build_tokenizer

    records = f"{out_dir}/records"
    model_args, data_args, args, _ = parse_args(
        train_flags("zero3_checkpoint", data_file, model_dir, f"{out_dir}/build_{name}", out_dir))
    tokenizer, refusal = build_tokenizer(model_args, data_args)
    set_seed(args.seed)
    try:
        model = build_model(model_args, tokenizer, refusal)
    except ValueError as e:
        with open(f"{records}/build_{name}_error.txt", "w") as f:
            f.write(str(e))
        return
    params = {n: {"local": p.numel(), "partition": p.ds_tensor.numel(), "full": p.ds_numel,
                  "full_shape": list(p.ds_shape)} for n, p in model.named_parameters()}
    state = {}
    for n, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            state[n] = p.detach().clone()
    with open(f"{records}/build_{name}_rank{rank()}.json", "w") as f:
        json.dump(params, f)
    if rank() == 0:
        torch.save(state, f"{records}/build_{name}.pt")


def broken_checkpoints(out_dir: str, model_dir: str) -> dict[str, str]:
    """Copies of the single-file checkpoint ``model_dir`` with one tensor of the wrong shape, one tensor removed."""
    from safetensors.torch import load_file, save_file

    broken = {"wrong_shape": f"{out_dir}/wrong_shape", "missing": f"{out_dir}/missing"}
    if rank() == 0:
        state = load_file(f"{model_dir}/model.safetensors")
        for name, path in broken.items():
            shutil.copytree(model_dir, path)
            changed = dict(state)
            if name == "wrong_shape":
                changed["model.norm.weight"] = torch.ones(3)
            else:
                del changed["model.layers.1.mlp.up_proj.weight"]
            save_file(changed, f"{path}/model.safetensors", metadata={"format": "pt"})
    dist.barrier()
    return broken


def bin_checkpoint(out_dir: str, model_dir: str) -> str:
    """A copy of the sharded safetensors checkpoint ``model_dir`` as one pytorch_model.bin: a checkpoint the
    partitioned read refuses, so the ZeRO-3 build takes transformers' loader."""
    path = f"{out_dir}/bin"
    if rank() == 0:
        shutil.copytree(model_dir, path, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
        torch.save(load_export(model_dir), f"{path}/pytorch_model.bin")
    dist.barrier()
    return path


# -- a plain transformers.Trainer with the run callbacks ---------------------------------------------------------------
def lm_rows(tok, data_file: str):
    """The data file's samples without an RTO target, input ids and LM labels only: ordinary SFT, the data a plain
    Trainer's LM-only num_items_in_batch is right for."""
    from scft_fast import safety_dataset

    rows = safety_dataset(tok, [data_file]).filter(lambda kind: kind != "rto", input_columns="kind")
    return rows.select_columns(["input_ids", "labels"])


def lm_collate(pad_id: int):
    from torch.nn.utils.rnn import pad_sequence

    from scft_fast import IGNORE_INDEX

    def collate(rows):
        ids = [torch.tensor(r["input_ids"]) for r in rows]
        return {"input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),
                "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True),
                "labels": pad_sequence([torch.tensor(r["labels"]) for r in rows], batch_first=True,
                                       padding_value=IGNORE_INDEX)}

    return collate


def plain_trainer(output_dir: str, tok, rows, callbacks=()):
    """transformers.Trainer (not SCFTTrainer) under training/zero3.json on a small Llama that apply_scft_fast patched
    (no head), with run_callbacks: PLAIN_STEPS steps, a checkpoint every step."""
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    from scft_fast import apply_scft_fast
    from scft_fast.hf.callbacks import run_callbacks
    from scft_fast.hf.presets import random_causal_lm

    AcceleratorState._reset_state(reset_partial_state=False)
    args = TrainingArguments(output_dir=output_dir, max_steps=PLAIN_STEPS, per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, save_steps=1, report_to="none", use_cpu=True,
                             seed=0, disable_tqdm=True, deepspeed="training/zero3.json")
    model = apply_scft_fast(random_causal_lm("llama", tok, seed=0, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512))
    return Trainer(model=model, args=args, train_dataset=rows, data_collator=lm_collate(tok.pad_token_id),
                   callbacks=[*run_callbacks(), *callbacks])


def gathered_state(trainer) -> dict[str, torch.Tensor]:
    import deepspeed

    state = {}
    for n, p in trainer.model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            state[n] = p.detach().clone()
    return state


@contextmanager
def recording_hashes(path: str, root: str):
    """write_checksums as it runs, also writing ``path`` (``{rank}`` replaced): for each call on this rank, the
    checkpoint (relative to ``root``) and the files this rank hashed for it."""
    from scft_fast.hf import callbacks

    writes, writing = [], []
    write_checksums, sha256 = callbacks.write_checksums, callbacks._sha256

    def recorded_write(directory: str) -> None:
        writes.append({"directory": os.path.relpath(directory, root), "files": []})
        writing.append(directory)
        try:
            write_checksums(directory)
        finally:
            writing.clear()

    def recorded_sha256(file: str) -> str:
        if writing:  # hashes outside a write (a verification) are not recorded
            writes[-1]["files"].append(os.path.relpath(file, writing[0]))
        return sha256(file)

    with mock.patch.object(callbacks, "write_checksums", recorded_write), \
            mock.patch.object(callbacks, "_sha256", recorded_sha256):
        yield
    with open(path.format(rank=rank()), "w") as f:
        json.dump(writes, f)


def plain_trainer_runs(out_dir: str, data_file: str) -> None:
    """plain/through: PLAIN_STEPS steps in one go. plain/resumed: the same run stopped after step PLAIN_STOP, its
    newest checkpoint damaged (a byte of rank 1's model states changed after its checksums were written), then a
    new Trainer resumed from ``newest_intact_checkpoint``. Records: both runs' final weights (plain_states.pt),
    the files each rank hashed (plain_{run}_hashed_rank{r}.json), the checkpoint the resume took."""
    from transformers import TrainerCallback

    from scft_fast.hf.arguments import DataArguments, ModelArguments
    from scft_fast.hf.callbacks import newest_intact_checkpoint
    from scft_fast.hf.run import build_tokenizer

    records = f"{out_dir}/records"
    tok, _ = build_tokenizer(ModelArguments(), DataArguments())
    rows = lm_rows(tok, data_file)

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == PLAIN_STOP:
                control.should_training_stop = True

    through = f"{out_dir}/plain/through"
    with recording_hashes(f"{records}/plain_through_hashed_rank{{rank}}.json", out_dir):
        trainer = plain_trainer(through, tok, rows)
        trainer.train()
    state = gathered_state(trainer)
    del trainer

    resumed = f"{out_dir}/plain/resumed"
    with recording_hashes(f"{records}/plain_resumed_hashed_rank{{rank}}.json", out_dir):
        trainer = plain_trainer(resumed, tok, rows, [Interrupt()])
        trainer.train()
        del trainer
        if rank() == 0:
            with open(f"{resumed}/checkpoint-{PLAIN_STOP}/global_step{PLAIN_STOP}/"
                      "zero_pp_rank_1_mp_rank_00_model_states.pt", "r+b") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
                f.seek(-1, os.SEEK_END)
                f.write(bytes([last[0] ^ 0xFF]))
        dist.barrier()
        trainer = plain_trainer(resumed, tok, rows)  # sets damaged checkpoints aside (every rank waits for it)
        checkpoint = newest_intact_checkpoint(resumed)
        trainer.train(resume_from_checkpoint=checkpoint)
    resumed_state = gathered_state(trainer)
    if rank() == 0:
        torch.save({"through": state, "resumed": resumed_state}, f"{records}/plain_states.pt")
        with open(f"{records}/plain_resume.json", "w") as f:
            json.dump({"checkpoint": os.path.relpath(checkpoint, out_dir)}, f)


def main(out_dir: str, data_file: str, checkpoint: str, tied_checkpoint: str, names: list[str]) -> None:
    import deepspeed

    from scft_fast.hf import export

    deepspeed.init_distributed(dist_backend="gloo")  # train() would do it; the build records come first
    records = f"{out_dir}/records"
    if rank() == 0:
        os.makedirs(records, exist_ok=True)
        with open(f"{out_dir}/sections.json", "w") as f:
            json.dump(SECTIONS, f)
    dist.barrier()
    if "zero3_checkpoint" in names:
        builds = {"plain": checkpoint, "tied": tied_checkpoint, "bin": bin_checkpoint(out_dir, checkpoint),
                  **broken_checkpoints(out_dir, tied_checkpoint)}
        for build, model_dir in builds.items():
            record_build(out_dir, data_file, model_dir, build)
    for name in (n for n in names if n in STAGES):
        argv = train_flags(name, data_file, checkpoint, f"{out_dir}/{name}", out_dir)
        with recording(f"{records}/{name}_rank{{rank}}.json"):
            if name == "zero3_checkpoint":  # small shards: the export's multi-file path (index + several files)
                small_shards = mock.patch.object(export, "MAX_SHARD_BYTES", EXPORT_SHARD_BYTES)
                with small_shards:
                    scft_fast_train(argv)
            else:
                scft_fast_train(argv)
    if "zero3" in names:
        # Resume the ZeRO-3 run from its step-2 checkpoint (sharded: every rank reloads its partition): the last one
        # goes, as if the run had stopped before writing it. The test compares the re-run step 3 with the first.
        if rank() == 0:
            shutil.copy(f"{out_dir}/zero3/metrics.jsonl", f"{records}/zero3_metrics_first.jsonl")
            shutil.rmtree(f"{out_dir}/zero3/checkpoint-3")
        dist.barrier()
        with recording(f"{records}/zero3_resumed_rank{{rank}}.json"):
            scft_fast_train(train_flags("zero3", data_file, checkpoint, f"{out_dir}/zero3", out_dir) + ["--resume"])
    if "zero3_checkpoint" in names:  # an SCFT checkpoint: the head and its settings come from the directory
        record_build(out_dir, data_file, f"{out_dir}/zero3_checkpoint/model", "scft")
    if "plain" in names:
        plain_trainer_runs(out_dir, data_file)
    print(json.dumps({"done": names}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
