"""Set-up checks that run before any heavy work (tokenization, model build): each failure is a UserError that
says what is wrong and what to do, instead of what a library says three layers down."""
from __future__ import annotations

import os

import torch

from ..errors import ConfigError
from .config import TrainConfig
from .deepspeed_config import check_deepspeed_config
from .presets import PRESETS

# What torch.distributed's env:// rendezvous reads; torchrun and the deepspeed launcher set all of them. Without
# them DeepSpeed falls back to MPI discovery and fails with "No module named 'mpi4py'".
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_setup(config: TrainConfig) -> None:
    _check_model(config.model.name_or_path)
    for flag, files in (("--data", config.data.files), ("--eval-data", config.data.eval_files)):
        for path in files or ():
            check_data_file(flag, path)
    _check_launch(config)
    _check_backend(config.loss.backend)


def check_data_file(flag: str, path: str) -> None:
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a directory: pass its JSONL files (e.g. {flag} "
                          f"{os.path.join(path, '*.jsonl')})")
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: no such file")


def _check_model(name: str) -> None:
    if name in PRESETS:
        return
    if not os.path.isdir(name):
        raise ConfigError(f"--model {name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a local "
                          f"directory holding a Hugging Face causal LM")
    if not os.listdir(name):
        raise ConfigError(f"--model {name} is an empty directory: point it at a Hugging Face model directory "
                          f"(config.json, weights, tokenizer files), e.g. one saved with save_pretrained")
    if not os.path.isfile(os.path.join(name, "config.json")):
        raise ConfigError(f"--model {name} has no config.json: it is not a Hugging Face model directory (expected "
                          f"config.json, the weights and the tokenizer files side by side)")


def _check_launch(config: TrainConfig) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.deepspeed is None:
        if world > 1:
            raise ConfigError(f"WORLD_SIZE={world} needs a DeepSpeed config for data parallelism: add "
                              f"--deepspeed training/zero1.json (or zero2/zero3)")
        return
    check_deepspeed_config(config.deepspeed, config, world)  # a missing, non-JSON or contradicting file is named now
    missing = [k for k in LAUNCHER_ENV if k not in os.environ]
    if missing:
        raise ConfigError(f"--deepspeed needs a distributed launcher ({', '.join(missing)} not set): run "
                          f"`torchrun --nproc_per_node N -m scft_fast.cli.train --deepspeed {config.deepspeed} ...` or "
                          f"`deepspeed --num_gpus N --module scft_fast.cli.train ...`, or drop --deepspeed for one "
                          f"process")


def _check_backend(backend: str) -> None:
    if backend != "triton" or torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ConfigError("--backend triton needs a CUDA GPU, and none is visible here: use --backend auto (the C++ "
                      "extension or torch on CPU), or set TRITON_INTERPRET=1 to run the kernels interpreted (slow)")
