"""SCFTTrainer builders for test_trainer.py, and its 2-rank worker: run under torchrun, one launch trains DDP,
DeepSpeed ZeRO-2 and ZeRO-3 in turn (a launch costs far more than a few tiny steps), each into its own directory.

Data order: with train_sampling_strategy="sequential", rank r's k-th micro-batch of B rows is rows
[(world * k + r) * B, ...), so 2 ranks x B rows see, step by step, the rows one process sees with 2B rows."""
import json
import sys

import torch
from transformers import TrainingArguments
from transformers.trainer_callback import TrainerCallback

from helpers import shares_master_weights
from scft_fast import SCFTConfig, SCFTDataCollator, SCFTTrainer, apply_scft_fast, safety_dataset
from scft_fast.data import load_default_tokenizer, refusal_token_id
from scft_fast.hf.presets import random_causal_lm

# ZeRO-3 with every parameter partitioned: DeepSpeed's default persistence threshold (1e5 elements) would keep
# all of this tiny model's parameters whole on every rank and test nothing of the gathering.
ZERO = {
    "zero2": {"stage": 2, "overlap_comm": False},
    "zero3": {"stage": 3, "overlap_comm": False, "stage3_param_persistence_threshold": 0,
              "stage3_gather_16bit_weights_on_model_save": True},
}
RUNS = ("ddp", "zero2", "zero3")


def tokenizer():
    tok = load_default_tokenizer()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def dataset(tok, data_file: str):
    return safety_dataset(tok, [data_file])


def causal_lm(tok, seed: int = 0, tied: bool = False):
    return random_causal_lm("llama", tok, seed, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            tie_word_embeddings=tied)


def model(tok, seed: int = 0, tied: bool = False, lora: bool = False):
    lm = causal_lm(tok, seed, tied)
    if lora:
        import peft

        lm = peft.get_peft_model(lm, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                     lora_dropout=0.0))
    return apply_scft_fast(lm, SCFTConfig(refusal_token_id=refusal_token_id(tok, "Sorry")))


def arguments(output_dir: str, **overrides) -> TrainingArguments:
    """Default TrainingArguments but for what a test must pin: few steps, a fixed order, no extra files."""
    settings = dict(output_dir=output_dir, max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                    learning_rate=1e-3, train_sampling_strategy="sequential", save_strategy="no", report_to="none",
                    use_cpu=True, seed=0)
    return TrainingArguments(**{**settings, **overrides})


class LossTrace(TrainerCallback):
    """Every logged training record, in order."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logs.append(dict(logs))


def trainer(tok, train_set, args, eval_set=None, **model_kwargs):
    trace = LossTrace()
    t = SCFTTrainer(model=model(tok, **model_kwargs), args=args, train_dataset=train_set, eval_dataset=eval_set,
                    data_collator=SCFTDataCollator(tok), callbacks=[trace])
    return t, trace


def main(out_dir: str, data_file: str) -> None:
    from accelerate.state import AcceleratorState, PartialState

    tok = tokenizer()
    train_set = dataset(tok, data_file)
    eval_set = train_set.select(range(16))
    for run in RUNS:
        ds = None if run == "ddp" else {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                                        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                                        "zero_optimization": ZERO[run]}
        args = arguments(f"{out_dir}/{run}", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         per_device_eval_batch_size=4, deepspeed=ds)
        t, trace = trainer(tok, train_set, args, eval_set)
        t.train()
        evaluation = t.evaluate()
        t.save_model()
        if t.args.process_index == 0:
            with open(f"{out_dir}/{run}/result.json", "w") as f:
                json.dump({"logs": trace.logs, "eval": evaluation,
                           "backend": str(torch.distributed.get_backend()),
                           "engine": type(t.model_wrapped).__name__,
                           "master_weights_shared": shares_master_weights(
                               getattr(t.model_wrapped, "optimizer", None))}, f)
        # One process, three Trainers: the accelerate state (and its DeepSpeed plugin) is per Trainer.
        AcceleratorState._reset_state(reset_partial_state=False)
        del t
    PartialState().wait_for_everyone()
    print(json.dumps({"done": RUNS}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
