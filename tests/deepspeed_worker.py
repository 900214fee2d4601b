"""Run under torchrun by test_deepspeed.py: one 2-rank launch trains every ZeRO variant in turn (a launch costs
far more than a few tiny steps), each into its own output directory."""
import json
import shutil
import sys

import torch.distributed as dist

from scft_fast.training import DataSpec, ModelSpec, TrainConfig, train

STAGES = {  # name: (DeepSpeed config, preset, held-out evaluation, packing)
    "zero1": ("training/zero1.json", "tiny", 0, False),
    "zero2": ("training/zero2.json", "tiny", 0, False),
    "zero2_packed": ("training/zero2.json", "tiny", 0, True),
    "zero3": ("training/zero3.json", "tiny", 8, False),
    "zero3_tied": ("training/zero3.json", "tiny-tied", 0, False),
    "zero3_offload": ("training/zero3_offload.json", "tiny", 0, False),
}
PACKED_TOKENS = 256


def config(out_dir: str, data_file: str, name: str, **overrides) -> TrainConfig:
    ds_config, preset, eval_samples, packing = STAGES[name]
    return TrainConfig(model=ModelSpec(name_or_path=preset),
                       data=DataSpec(files=[data_file], eval_files=[data_file] if eval_samples else None,
                                     micro_batch_size=4, eval_samples=eval_samples, packing=packing,
                                     max_tokens=PACKED_TOKENS if packing else None),
                       output_dir=f"{out_dir}/{name}", max_steps=3, grad_accum=2, deepspeed=ds_config,
                       save_every=2, progress=False, summary=eval_samples > 0, **overrides)


def main(out_dir: str, data_file: str, names: list[str]) -> None:
    for name in names:
        train(config(out_dir, data_file, name))
    if "zero3" in names:
        # Resume the ZeRO-3 run from its step-2 checkpoint (sharded: every rank reloads its partition); the test
        # compares the re-run step 3 with the first one.
        if dist.get_rank() == 0:
            shutil.copy(f"{out_dir}/zero3/metrics.jsonl", f"{out_dir}/zero3/metrics_first.jsonl")
        dist.barrier()
        train(config(out_dir, data_file, "zero3", resume=True))
    print(json.dumps({"done": names}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
