"""Run under torchrun by test_deepspeed.py: one 2-rank launch trains every ZeRO variant in turn (a launch costs
far more than a few tiny steps), each into its own output directory."""
import functools
import json
import shutil
import sys
from unittest import mock

import torch
import torch.distributed as dist

from scft_fast.training import DataSpec, ModelSpec, TrainConfig, export, train

LORA = dict(lora_rank=4, lora_alpha=16.0, lora_dropout=0.0,
            lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
STAGES = {  # name: (DeepSpeed config, model ("checkpoint": the directory test_deepspeed.py wrote), held-out
    #              evaluation, packing, ModelSpec overrides)
    "zero1": ("training/zero1.json", "tiny", 0, False, {}),
    "zero2": ("training/zero2.json", "tiny", 0, False, {}),
    "zero2_packed": ("training/zero2.json", "tiny", 0, True, {}),
    "zero3": ("training/zero3.json", "tiny", 8, False, {}),
    "zero3_tied": ("training/zero3.json", "tiny-tied", 0, False, {}),
    "zero3_offload": ("training/zero3_offload.json", "tiny", 0, False, {}),
    "zero3_checkpoint": ("training/zero3.json", "checkpoint", 0, False, {}),
    "zero3_lora": ("training/zero3.json", "checkpoint", 0, False, LORA),
    "zero1_sections": ("{out}/sections.json", "tiny", 0, False, {}),
}
# A config whose optimizer and scheduler sections DeepSpeed builds, "auto" fields filled from our flags.
SECTIONS = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto", "torch_adam": True}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                         "warmup_num_steps": "auto", "warmup_type": "linear"}}}
PACKED_TOKENS = 256
EXPORT_SHARD_BYTES = 200_000  # the tiny model's float32 weights are ~1.3 MB: several shards


def config(out_dir: str, data_file: str, checkpoint: str, name: str, **overrides) -> TrainConfig:
    ds_config, model, eval_samples, packing, model_overrides = STAGES[name]
    return TrainConfig(model=ModelSpec(name_or_path=checkpoint if model == "checkpoint" else model,
                                       **model_overrides),
                       data=DataSpec(files=[data_file], eval_files=[data_file] if eval_samples else None,
                                     micro_batch_size=4, eval_samples=eval_samples, packing=packing,
                                     max_tokens=PACKED_TOKENS if packing else None),
                       output_dir=f"{out_dir}/{name}", max_steps=3, grad_accum=2,
                       deepspeed=ds_config.format(out=out_dir),
                       save_every=2, progress=False, summary=eval_samples > 0, **overrides)


def record_build(out_dir: str, data_file: str, checkpoint: str) -> None:
    """What a rank holds right after a ZeRO-3 build from the checkpoint directory: each parameter's local and
    full sizes, and the new head (gathered) for rank 0 to save."""
    import deepspeed

    from scft_fast.training.components import build_model, build_tokenizer, model_config
    from scft_fast.training.deepspeed_config import resolve_deepspeed_config

    cfg = config(out_dir, data_file, checkpoint, "zero3_checkpoint")
    tokenizer, refusal = build_tokenizer(cfg)
    ds = resolve_deepspeed_config(cfg.deepspeed, cfg, dist.get_world_size(), 3, model_config(cfg, tokenizer))
    torch.manual_seed(cfg.seed)  # as train() seeds before its build
    model = build_model(cfg, tokenizer, refusal)
    params = {n: {"local": p.numel(), "partition": p.ds_tensor.numel(), "full": p.ds_numel,
                  "full_shape": list(p.ds_shape)} for n, p in model.named_parameters()}
    with deepspeed.zero.GatheredParameters(list(model.score.parameters()), modifier_rank=None):
        head = model.score.weight.detach().clone()
    rank = dist.get_rank()
    with open(f"{out_dir}/build_rank{rank}.json", "w") as f:
        json.dump(params, f)
    if rank == 0:
        torch.save(head, f"{out_dir}/build_head.pt")
    del model, ds


def main(out_dir: str, data_file: str, checkpoint: str, names: list[str]) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # train() would do it; the build record and the file come first
    if dist.get_rank() == 0:
        with open(f"{out_dir}/sections.json", "w") as f:
            json.dump(SECTIONS, f)
    dist.barrier()
    if "zero3_checkpoint" in names:
        record_build(out_dir, data_file, checkpoint)
    for name in names:
        if name == "zero3_checkpoint":  # small shards: the export's multi-file path (index + several files)
            with mock.patch.object(export, "save_zero3_merged",
                                   functools.partial(export.save_zero3_merged, max_shard_bytes=EXPORT_SHARD_BYTES)):
                train(config(out_dir, data_file, checkpoint, name))
        else:
            train(config(out_dir, data_file, checkpoint, name))
    if "zero3" in names:
        # Resume the ZeRO-3 run from its step-2 checkpoint (sharded: every rank reloads its partition); the test
        # compares the re-run step 3 with the first one.
        if dist.get_rank() == 0:
            shutil.copy(f"{out_dir}/zero3/metrics.jsonl", f"{out_dir}/zero3/metrics_first.jsonl")
        dist.barrier()
        train(config(out_dir, data_file, checkpoint, "zero3", resume=True))
    print(json.dumps({"done": names}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
