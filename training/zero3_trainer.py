"""SCFT + DeRTa fine-tuning with ``SCFTTrainer`` under DeepSpeed ZeRO-3, the model built partitioned by
``from_pretrained``. One command line for GPUs (nccl) and CPUs (gloo):

    torchrun --nproc_per_node 8 training/zero3_trainer.py --model_name_or_path /models/Llama-3.1-8B-Instruct \
        --data_files derta_train.jsonl --output_dir runs/zero3 --bf16 --deepspeed training/zero3_bf16.json
    torchrun --nproc_per_node 2 training/zero3_trainer.py --model_name_or_path MODEL_DIR --output_dir runs/zero3

Every ``TrainingArguments`` field is a flag (``--per_device_train_batch_size``, ``--gradient_accumulation_steps``,
``--learning_rate``, ...); ``--deepspeed`` defaults to ``training/zero3.json``. ``output_dir`` receives the model
``SCFTForCausalLM.from_pretrained`` loads (ZeRO-3 partitions gathered) and ``trainer_state.json`` (the logs).
"""
import os
from dataclasses import dataclass, field

import deepspeed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments, set_seed

from scft_fast import SCFTConfig, SCFTDataCollator, SCFTTrainer, apply_scft_fast, safety_dataset
from scft_fast.cli.train import configure_allocator
from scft_fast.data import refusal_token_id


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a Hugging Face causal LM: a directory or a hub name"})
    data_files: list[str] | None = field(default=None, metadata={"help": "JSONL files; default: the embedded data"})
    refusal_token: str = field(default="Sorry", metadata={"help": "the token RTO trains every harmful position to"})


def main() -> None:
    parser = HfArgumentParser((ModelArguments, TrainingArguments))
    # Without CUDA, accelerate starts torchrun's ranks (over gloo) only when told use_cpu; otherwise every rank
    # would set up a one-process run of its own.
    parser.set_defaults(deepspeed=os.path.join(os.path.dirname(os.path.abspath(__file__)), "zero3.json"),
                        use_cpu=not torch.cuda.is_available())
    model_args, args = parser.parse_args_into_dataclasses()
    configure_allocator(args)  # as scft-fast train does: freed gathers go back to the system (training/README.md)
    # The TrainingArguments come first: their ZeRO-3 config makes from_pretrained build the model inside
    # deepspeed.zero.Init, partitioned as it is read. zero.Init takes the world size from DeepSpeed's own
    # communication layer before starting it; accelerate starts that layer on GPUs but not on CPU, where zero.Init
    # would count 1 rank and fail DeepSpeed's batch-size check (train_batch_size != micro x accumulation x ranks).
    deepspeed.init_distributed()
    set_seed(args.seed)  # the SCFT head is drawn when apply_scft_fast adds it, before Trainer seeds anything
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = apply_scft_fast(AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path),
                            SCFTConfig(refusal_token_id=refusal_token_id(tokenizer, model_args.refusal_token)))
    trainer = SCFTTrainer(model=model, args=args, data_collator=SCFTDataCollator(tokenizer),
                          train_dataset=safety_dataset(tokenizer, model_args.data_files))
    trainer.train()
    trainer.save_model()
    trainer.save_state()


if __name__ == "__main__":
    main()
