"""Run under torchrun by test_deepspeed.py: one 2-rank launch trains every ZeRO variant in turn (a launch costs
far more than a few tiny steps), each into its own output directory."""
import functools
import json
import shutil
import sys
from unittest import mock

import torch
import torch.distributed as dist

from helpers import load_export, shares_master_weights
from scft_fast.training import DataSpec, ModelSpec, TrainConfig, export, loop, train

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


def record_build(out_dir: str, data_file: str, model_dir: str, name: str) -> None:
    """What a rank holds right after a ZeRO-3 build from ``model_dir``: each parameter's local and full sizes
    (build_{name}_rank{r}.json), and the whole state dict, gathered one parameter at a time, for rank 0 to save
    (build_{name}.pt). A ValueError from the build is saved instead (build_{name}_error.txt)."""
    import deepspeed

    from scft_fast.training.components import build_model, build_tokenizer, model_config
    from scft_fast.training.deepspeed_config import resolve_deepspeed_config

    cfg = config(out_dir, data_file, model_dir, "zero3_checkpoint")
    tokenizer, refusal = build_tokenizer(cfg)
    ds = resolve_deepspeed_config(cfg.deepspeed, cfg, dist.get_world_size(), 3, model_config(cfg, tokenizer))
    torch.manual_seed(cfg.seed)  # as train() seeds before its build
    rank = dist.get_rank()
    try:
        model = build_model(cfg, tokenizer, refusal)
    except ValueError as e:
        with open(f"{out_dir}/build_{name}_error.txt", "w") as f:
            f.write(str(e))
        return
    params = {n: {"local": p.numel(), "partition": p.ds_tensor.numel(), "full": p.ds_numel,
                  "full_shape": list(p.ds_shape)} for n, p in model.named_parameters()}
    state = {}
    for n, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            state[n] = p.detach().clone()
    with open(f"{out_dir}/build_{name}_rank{rank}.json", "w") as f:
        json.dump(params, f)
    if rank == 0:
        torch.save(state, f"{out_dir}/build_{name}.pt")
    del model, ds


def recording_engine(out_dir: str):
    """loop's DeepSpeedEngine, writing on rank 0 whether each run's ZeRO optimizer uses the model's partitions as
    its master weights (master_weights.json: {run directory: true / false / null})."""
    class Recording(loop.DeepSpeedEngine):
        def __init__(self, model, config, *args, **kwargs):
            super().__init__(model, config, *args, **kwargs)
            if dist.get_rank() == 0:
                path = f"{out_dir}/master_weights.json"
                try:
                    with open(path) as f:
                        seen = json.load(f)
                except FileNotFoundError:
                    seen = {}
                seen[config.output_dir.rsplit("/", 1)[-1]] = shares_master_weights(self.optimizer)
                with open(path, "w") as f:
                    json.dump(seen, f)

    return mock.patch.object(loop, "DeepSpeedEngine", Recording)


def broken_checkpoints(out_dir: str, model_dir: str) -> dict[str, str]:
    """Copies of the single-file checkpoint ``model_dir`` with one tensor of the wrong shape, one tensor removed."""
    from safetensors.torch import load_file, save_file

    broken = {"wrong_shape": f"{out_dir}/wrong_shape", "missing": f"{out_dir}/missing"}
    if dist.get_rank() == 0:
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
    if dist.get_rank() == 0:
        shutil.copytree(model_dir, path, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
        torch.save(load_export(model_dir), f"{path}/pytorch_model.bin")
    dist.barrier()
    return path


def main(out_dir: str, data_file: str, checkpoint: str, tied_checkpoint: str, names: list[str]) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # train() would do it; the build record and the file come first
    if dist.get_rank() == 0:
        with open(f"{out_dir}/sections.json", "w") as f:
            json.dump(SECTIONS, f)
    dist.barrier()
    if "zero3_checkpoint" in names:
        builds = {"plain": checkpoint, "tied": tied_checkpoint, "bin": bin_checkpoint(out_dir, checkpoint),
                  **broken_checkpoints(out_dir, tied_checkpoint)}
        for build, model_dir in builds.items():
            record_build(out_dir, data_file, model_dir, build)
    for name in names:
        with recording_engine(out_dir):
            if name == "zero3_checkpoint":  # small shards: the export's multi-file path (index + several files)
                with mock.patch.object(export, "save_zero3_merged", functools.partial(
                        export.save_zero3_merged, max_shard_bytes=EXPORT_SHARD_BYTES)):
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
    if "zero3_checkpoint" in names:  # an SCFT checkpoint: the head and its settings come from the directory
        record_build(out_dir, data_file, f"{out_dir}/zero3_checkpoint/model", "scft")
    print(json.dumps({"done": names}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
