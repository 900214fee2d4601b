"""``scft-fast train``'s work, on ``SCFTTrainer``: check, build, train, export, summarize.

    summary = train(ModelArguments(), DataArguments(), SCFTTrainingArguments())

1. Set-up checks before any heavy work (files, the model directory, the launcher, the backend); the output
   directory claimed (``callbacks.claim_output_dir``); on ``resume``, the newest intact checkpoint chosen and the
   settings that define the run compared with its ``train_config.json``.
2. The tokenizer (the embedded one for a preset), the data (``DataArguments`` -> ``DataConfig``: the training set
   and the held-out splits of the summary), the model (``apply_scft_fast`` with ``ModelArguments`` -> ``SCFTConfig``;
   under ZeRO-3 built partitioned, each rank reading its slice of the checkpoint; LoRA through PEFT).
3. ``SCFTTrainer.train`` with ``run_callbacks`` (output directory, verified checkpoints, divergence stop, metrics,
   held-out summary) and a checkpoint at the last step, so that a failed export can be resumed.
4. The final model written to ``model.tmp`` and renamed ``model`` once complete, with its tokenizer.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import sys
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
from transformers import TrainerCallback, set_seed
from transformers.trainer_callback import ProgressCallback

from ..data import build_dataset, default_data_files, load_default_tokenizer, refusal_token_id
from ..errors import ConfigError, RunError, UserError
from . import arguments
from .arguments import PRESETS, DataArguments, ModelArguments, SCFTTrainingArguments
from .callbacks import (
    SUMMARY,
    claim_output_dir,
    newest_intact_checkpoint,
    run_callbacks,
    say,
    write_json,
)

TRAIN_CONFIG = "train_config.json"
MODEL_DIR = "model"
# What a resumed run must share with the run it continues (dotted keys of train_config.json): other data or seed
# would give other batches, another batch geometry other steps, another model or head another objective.
RUN_DEFINING = ("model.model", "model.pool", "model.lora_rank", "model.head_bias", "data.data", "data.max_length",
                "data.truncation", "data.packing", "data.rto_keep", "data.vanilla_safety", "data.prefix_label",
                "data.refusal_string", "training.per_device_train_batch_size",
                "training.gradient_accumulation_steps", "training.seed")
# Settings Trainer restores from the checkpoint with the optimizer and its schedule: a new value would not apply.
RESTORED_ON_RESUME = ("training.learning_rate", "training.weight_decay", "training.warmup_steps",
                      "training.adam_beta1", "training.adam_beta2", "training.adam_epsilon",
                      "training.lr_scheduler_type")
# The training arguments train_config.json records (the rest are Trainer's to keep in its checkpoints).
RECORDED_TRAINING = ("output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "learning_rate", "weight_decay", "warmup_steps", "adam_beta1",
                     "adam_beta2", "adam_epsilon", "max_grad_norm", "lr_scheduler_type", "seed", "bf16",
                     "deepspeed", "gradient_checkpointing", "save_steps", "save_total_limit")
# What torch.distributed's env:// rendezvous reads; torchrun and the deepspeed launcher set all of them.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# -- 1. set-up checks -------------------------------------------------------------------------------------------------
def check_setup(model_args: ModelArguments, data_args: DataArguments, args: SCFTTrainingArguments) -> None:
    """What can be refused before any tokenization or model build, each as a ConfigError naming the flag."""
    name = model_args.model
    if name not in PRESETS:
        if not os.path.isdir(name):
            raise ConfigError(f"--model {name!r} is neither a preset ({', '.join(PRESETS)}) nor a local directory "
                              f"holding a Hugging Face causal LM")
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ConfigError(f"--model {name} has no config.json: it is not a Hugging Face model directory (expected "
                              f"config.json, the weights and the tokenizer files side by side)")
    for flag, files in (("--data", data_args.data), ("--eval-data", data_args.eval_data)):
        for path in files or ():
            if os.path.isdir(path):
                raise ConfigError(f"{flag} {path} is a directory: pass its JSONL files (e.g. {flag} "
                                  f"{os.path.join(path, '*.jsonl')})")
            if not os.path.isfile(path):
                raise ConfigError(f"{flag} {path}: no such file")
    missing = [k for k in LAUNCHER_ENV if k not in os.environ]
    if args.deepspeed and missing:
        raise ConfigError(f"--deepspeed needs a distributed launcher ({', '.join(missing)} not set): run `torchrun "
                          f"--nproc_per_node N -m scft_fast.cli.train --deepspeed {args.deepspeed} ...` or `deepspeed "
                          f"--num_gpus N --module scft_fast.cli.train ...`, or drop --deepspeed for one process")
    if model_args.backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("--backend triton needs a CUDA GPU, and none is visible here: use --backend auto (the C++ "
                          "extension or torch on CPU), or set TRITON_INTERPRET=1 to run the kernels interpreted (slow)")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_config(model_args: ModelArguments, data_args: DataArguments, args: SCFTTrainingArguments) -> dict:
    """What train_config.json records: every model and data setting, the training arguments that shape the run."""
    return {"model": asdict(model_args), "data": asdict(data_args),
            "training": {k: getattr(args, k) for k in RECORDED_TRAINING}}


def _comparable(key: str, value):
    if key in ("model.model", "data.data") and value is not None:  # ./a.jsonl and a.jsonl are one file
        paths = [value] if isinstance(value, str) else value
        real = [os.path.realpath(p) if os.path.exists(p) else p for p in paths]
        return real[0] if isinstance(value, str) else real
    return list(value) if isinstance(value, tuple) else value


def flag_of(key: str) -> str:
    """The command-line flag of a dotted train_config.json key."""
    section, _, name = key.partition(".")
    kind = {"model": ModelArguments, "data": DataArguments, "training": SCFTTrainingArguments}.get(section)
    return arguments.flag_of(kind, name) if kind is not None else key


def resume_changes(output_dir: str, config: dict, override: bool) -> list[str]:
    """Compares the new settings with the run's train_config.json: a run-defining difference is a UserError (unless
    ``override``), the others are returned as "--flag new (was old)"."""
    path = os.path.join(output_dir, TRAIN_CONFIG)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            saved = _flatten(json.load(f))
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): restore it, or pass --resume-override") from None
    new = _flatten(config)
    ignored = {"training.output_dir"}
    changed = [k for k in new if k not in ignored and k in saved
               and _comparable(k, saved[k]) != _comparable(k, new[k])]
    defining = [k for k in changed if k in RUN_DEFINING]
    if defining and not override:
        details = "; ".join(f"{flag_of(k)} {new[k]!r} (the run's: {saved[k]!r})" for k in defining)
        raise UserError(f"--resume: {details} would change what the run in {output_dir} means: pass the run's "
                        f"settings, or add --resume-override to continue under the new ones")
    restored = [k for k in changed if k in RESTORED_ON_RESUME]
    if restored and not override:
        details = "; ".join(f"{flag_of(k)} {new[k]!r} (the run's: {saved[k]!r})" for k in restored)
        raise UserError(f"--resume: {details} would not apply: Trainer restores the optimizer and its schedule from "
                        f"the checkpoint. Pass the run's settings, or add --resume-override to continue with the "
                        f"checkpoint's")
    return [f"{flag_of(k)} {new[k]!r} (was {saved[k]!r})"
            + (": not applied, the checkpoint's optimizer and schedule continue" if k in restored else "")
            for k in changed]


# -- 2. build ---------------------------------------------------------------------------------------------------------
def build_tokenizer(model_args: ModelArguments, data_args: DataArguments):
    """(tokenizer, refusal token id): the embedded tokenizer for a preset, else the checkpoint's."""
    from transformers import AutoTokenizer

    tokenizer = (load_default_tokenizer() if model_args.model in PRESETS
                 else AutoTokenizer.from_pretrained(model_args.model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pooling never reads pad ids, so EOS padding is safe
    return tokenizer, refusal_token_id(tokenizer, data_args.refusal_string)


def build_datasets(data_args: DataArguments, tokenizer, data_config):
    """(training set, {name: (held-out set, title)}, the training set's DataStats). Held-out sets keep every RTO
    position and the vanilla refusals, as ``scft-fast eval`` scores them. With the embedded data: "eval", held out
    from the training generator, and "separate", written by a separate generator; with --data: "eval" from
    --eval-data, if given."""
    train_set, stats = build_dataset(data_args.data or default_data_files("train"), tokenizer, data_config)
    if data_args.eval_data:
        sources = {"eval": (data_args.eval_data, "--eval-data")}
    elif data_args.data is None:
        sources = {"eval": (default_data_files("eval"), "same generator"),
                   "separate": (default_data_files("separate"), "separate generator")}
    else:
        sources = {}
    held_out = {}
    if data_args.eval_samples > 0:
        for name, (files, title) in sources.items():
            held, _ = build_dataset(files, tokenizer, replace(data_config, rto_keep=1.0, vanilla_safety=True))
            held_out[name] = (held.select(range(min(data_args.eval_samples, len(held)))), title)
    return train_set, held_out, stats


def build_model(model_args: ModelArguments, tokenizer, refusal: int):
    """The SCFT model (PEFT-wrapped with LoRA) for a preset or a local HF / SCFT checkpoint. Under ZeRO-3 (a
    TrainingArguments naming a stage-3 config is alive) it is built partitioned: a preset by transformers one module
    at a time, a checkpoint by ``SCFTForCausalLM.from_pretrained``, each rank reading its slice."""
    from transformers import AutoConfig

    from .config import SCFT_CONFIG_KEY, SCFTConfig
    from .patch import SCFTForCausalLM, apply_scft_fast
    from .presets import build_preset

    saved = None
    if model_args.model not in PRESETS:
        raw = getattr(AutoConfig.from_pretrained(model_args.model), SCFT_CONFIG_KEY, None)
        saved = SCFTConfig.from_dict(raw) if raw else None
    scft = model_args.scft_config(refusal, saved)
    if model_args.model in PRESETS:
        model = build_preset(model_args.model, tokenizer, scft)
    else:
        model = SCFTForCausalLM.from_pretrained(model_args.model, init_head=saved is None, config=scft)
    model._check_logits_match()
    if model_args.lora_rank > 0:
        import peft

        rank = model_args.lora_rank
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=rank, lora_alpha=model_args.lora_alpha if model_args.lora_alpha is not None else 2 * rank,
            lora_dropout=model_args.lora_dropout, target_modules=model_args.target_modules))
        apply_scft_fast(model)  # the head joins modules_to_save: it trains fully
    return model


class StepProgress(ProgressCallback):
    """Trainer's progress bar, with each step's losses on the bar rather than a printed line per log (metrics.jsonl
    holds every log)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix({k: f"{logs[k]:.3f}" for k in ("loss", "cls_loss") if k in logs},
                                          refresh=False)


class FinalCheckpoint(TrainerCallback):
    """A checkpoint at the last step too, so that an export that fails (a full disk) can be resumed."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.save_strategy != "no":
            control.should_save = True


# -- 3. and 4. train, export ------------------------------------------------------------------------------------------
def train(model_args: ModelArguments, data_args: DataArguments, args: SCFTTrainingArguments, *,
          resume: bool = False, resume_override: bool = False) -> dict | None:
    """Runs the configured training; returns the summary (also in OUTPUT_DIR/summary.json) on the main process, None
    on the others. Raises UserError on a bad set-up or a refused output directory (before any heavy work),
    RunError when the run diverges or cannot write its files."""
    from ..data import SCFTDataCollator
    from .trainer import SCFTTrainer

    check_setup(model_args, data_args, args)
    main = _rank() == 0
    try:
        lock = claim_output_dir(args.output_dir, resume) if main else None
    except OSError as e:
        raise ConfigError(f"cannot use output directory {args.output_dir}: {_why(e)}") from None
    started, checkpoint, created_config = False, None, None
    try:
        _ = args.world_size  # under a launcher, TrainingArguments starts the process group here
        config = run_config(model_args, data_args, args)
        # The main process decides (it alone sets damaged checkpoints aside); the others take its decision. An
        # error there ends the main process, and the launcher the others.
        plan = _resume_plan(args, config, resume, resume_override) if main else None
        plan = _shared(plan)
        checkpoint = plan["checkpoint"]
        if plan["finished"]:
            return _saved_summary(args.output_dir) if main else None
        if main:
            path = os.path.join(args.output_dir, TRAIN_CONFIG)
            created_config = None if os.path.exists(path) else path
            write_json(path, config)

        if args.deepspeed:
            import deepspeed

            # zero.Init (the partitioned build) takes the world size from DeepSpeed's own communication layer,
            # which accelerate starts on GPUs but not on CPU ranks, where it would count one rank.
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        tokenizer, refusal = build_tokenizer(model_args, data_args)
        if plan.get("export_only"):
            # Trainer resumed at its last step trains one step more: the checkpoint's model is exported as it is.
            from .patch import SCFTForCausalLM

            started = True
            export(SCFTForCausalLM.from_pretrained(checkpoint), os.path.join(args.output_dir, MODEL_DIR), tokenizer)
            return _saved_summary(args.output_dir) if main else None
        data_config = data_args.data_config(model_args.pool, args.seed)
        train_set, held_out, stats = build_datasets(data_args, tokenizer, data_config)
        set_seed(args.seed)  # the initial weights (a preset's, a new head's, LoRA's) follow --seed, not the process
        model = build_model(model_args, tokenizer, refusal)
        collator = SCFTDataCollator(tokenizer, packing=data_args.packing)
        eval_collator = SCFTDataCollator(tokenizer)
        callbacks = run_callbacks(held_out, eval_collator, lock, args.per_device_eval_batch_size)
        summary_callback = callbacks[-1]
        summary_callback.extra.update(refusal_token_id=refusal, data=stats.to_dict(),
                                      model_dir=os.path.join(args.output_dir, MODEL_DIR),
                                      optimizer=_optimizer_summary(args))
        trainer = SCFTTrainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                              processing_class=tokenizer, callbacks=[*callbacks, FinalCheckpoint()])
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(StepProgress())
        started = True
        trainer.train(resume_from_checkpoint=checkpoint)
        export(trainer, os.path.join(args.output_dir, MODEL_DIR))
        return summary_callback.summary if main else None
    except pickle.UnpicklingError as e:
        # torch.load(weights_only=True) met an object it will not rebuild: a file that could run code
        raise UserError(f"a file of checkpoint {checkpoint} holds more than tensors and plain values, which the loader "
                        f"refuses to unpickle (it could run code): {str(e).splitlines()[0][:200]}; restore the "
                        f"checkpoint or remove it to resume from an older one") from None
    except (OSError, RuntimeError) as e:
        if not is_write_failure(e):
            raise
        if started:
            raise RunError(f"training stopped: {_why(e)}. Once there is room, --resume continues the run in "
                           f"{args.output_dir} from its newest intact checkpoint") from None
        raise ConfigError(f"{_why(e)}. The output directory {args.output_dir} was left as it was") from None
    finally:
        if created_config and not started and sys.exc_info()[1] is not None:
            # A set-up error (a bad record, a refused setting) before any training: the directory is left as it
            # was, so the corrected command runs without --resume.
            with contextlib.suppress(OSError):
                os.remove(created_config)
        if lock is not None:
            lock.release()


def _saved_summary(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, SUMMARY)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_write_failure(e: BaseException) -> bool:
    """A file that could not be written: an OSError (full disk, read-only, no permission), or torch.save's zip
    writer reporting a short write as a RuntimeError."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM)
    return any(s in str(e) for s in ("unexpected pos", "file write failed", "No space left"))


def _why(e: BaseException) -> str:
    if isinstance(e, OSError):
        return f"cannot write {e.filename or 'a file'}: {e.strerror}"
    return f"a file could not be written ({str(e).splitlines()[0][:120]}): no space left on the device"


def _resume_plan(args: SCFTTrainingArguments, config: dict, resume: bool, override: bool) -> dict:
    """On the main process: the checkpoint to resume from (None: start), whether the run is already finished; says
    which checkpoint and what changed."""
    if not resume:
        return {"checkpoint": None, "finished": False}
    changes = resume_changes(args.output_dir, config, override)
    checkpoint = newest_intact_checkpoint(args.output_dir)
    if checkpoint is None:
        say(f"no checkpoint in {args.output_dir}: starting from step 0")
        return {"checkpoint": None, "finished": False}
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        step = int(json.load(f)["global_step"])
    if 0 < args.max_steps < step:
        raise UserError(f"--max-steps {args.max_steps} is below the step of the checkpoint resumed ({step}): pass "
                        f"--max-steps {step} or more")
    model_dir = os.path.join(args.output_dir, MODEL_DIR)
    if step == args.max_steps and os.path.isdir(model_dir):
        say(f"the run in {args.output_dir} is finished ({step} of {args.max_steps} steps, model in {model_dir}): "
            f"nothing to do; pass a larger --max-steps to train further")
        return {"checkpoint": checkpoint, "finished": True}
    if step == args.max_steps:  # trained, but the export did not complete
        say(f"the run in {args.output_dir} trained all {step} steps; writing its model from {checkpoint}")
        return {"checkpoint": checkpoint, "finished": False, "export_only": True}
    say(f"resuming from {checkpoint} (step {step})" + "".join(f"\n  changed on resume: {c}" for c in changes))
    return {"checkpoint": checkpoint, "finished": False}


def _shared(value):
    """The main process's ``value`` on every rank (one broadcast when a process group is up)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def export(source, path: str, tokenizer=None) -> None:
    """The final model written into ``path + ".tmp"`` and renamed ``path`` once complete (every rank calls it):
    ``source`` is the Trainer (its ``save_model``) or a model (``hf.export.export_model``, with ``tokenizer``)."""
    import shutil

    from .export import export_model

    tmp = path + ".tmp"
    main = _rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(source, "save_model"):
        source.save_model(tmp)
    else:
        export_model(source, tmp, tokenizer)
    if main:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _optimizer_summary(args: SCFTTrainingArguments) -> dict:
    """What sets the learning rate: the arguments, or the DeepSpeed JSON's own optimizer / scheduler sections,
    which DeepSpeed builds in their place ("auto" fields filled from the arguments)."""
    ds = args.hf_deepspeed_config.config if args.deepspeed else {}
    optimizer, scheduler = ds.get("optimizer"), ds.get("scheduler")
    return {"optimizer": optimizer["type"] if optimizer else args.optim.value, "lr": args.learning_rate,
            "weight_decay": args.weight_decay,
            "scheduler": scheduler["type"] if scheduler else args.lr_scheduler_type.value,
            "scheduler_kwargs": None if scheduler else args.lr_scheduler_kwargs, "warmup_steps": args.warmup_steps}
