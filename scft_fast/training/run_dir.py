"""An output directory belongs to one run.

    lock = claim_output_dir(config, rank)   # refuses a directory in use, or holding a run without --resume
    ...
    lock.release()

A lock file (an flock, released by the kernel when the process dies, kill -9 included) refuses a concurrent run;
a directory that already holds a run's files is refused without --resume. On --resume, the settings that define
the run (RUN_DEFINING: what it trains on, how its batches are cut, the model) must match the run's
train_config.json unless --resume-override; every other setting is the new command line's, and is reported.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys

from ..arguments import config_flags
from ..errors import UserError
from .config import TrainConfig

LOCK_FILE = ".scft-fast.lock"
RUN_FILES = ("train_config.json", "metrics.jsonl", "checkpoints", "eval_before.json", "summary.json", "model")

# TrainConfig keys (dotted). Resuming with another value would continue a different run from this one's step: other
# data or seed (other batches), other batch geometry, another model, head or objective.
RUN_DEFINING = (
    "model.name_or_path", "model.pool", "model.lora_rank", "model.head_bias", "data.files",
    "data.max_length", "data.truncation", "data.packing", "data.max_tokens", "data.micro_batch_size",
    "data.rto_keep", "data.prefix_label", "data.refusal_string", "grad_accum", "seed",
)
FLAGS = config_flags(TrainConfig)  # dotted key -> its scft-fast train flag (the config's field metadata)


def say(message: str) -> None:
    print(f"scft-fast train: {message}", file=sys.stderr, flush=True)


class RunLock:
    def __init__(self, path: str | None):
        self.path, self._file = path, None
        if path is None:
            return
        self._file = open(path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise UserError(f"--output-dir {os.path.dirname(path)} is in use by another run (pid {holder}, lock "
                            f"{path}): wait for it to finish, or choose another --output-dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


def existing_run_files(output_dir: str) -> list[str]:
    return [name for name in RUN_FILES if os.path.exists(os.path.join(output_dir, name))]


def claim_output_dir(config: TrainConfig, rank: int) -> RunLock:
    """Rank 0 takes the directory's lock; a directory holding another run's files needs --resume."""
    os.makedirs(config.output_dir, exist_ok=True)
    if rank != 0:
        return RunLock(None)
    lock = RunLock(os.path.join(config.output_dir, LOCK_FILE))
    found = existing_run_files(config.output_dir)
    if found and not config.resume:
        lock.release()
        raise UserError(f"--output-dir {config.output_dir} already holds a run ({', '.join(found)}): pass --resume "
                        f"to continue it, or choose another --output-dir (nothing was changed)")
    return lock


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _flag(key: str) -> str:
    return FLAGS.get(key, key)  # a field no flag sets (optim.recipe) goes by its key


def resume_changes(config: TrainConfig) -> list[str]:
    """Compares the command line with the run's train_config.json: raises UserError on a run-defining difference
    (unless config.resume_override), returns the accepted differences as "--flag new (was old)"."""
    path = os.path.join(config.output_dir, "train_config.json")
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            saved = _flatten(json.load(f))
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): restore it, or pass --resume-override") from None
    new = _flatten(config.to_dict())
    ignored = {"resume", "resume_override", "progress", "output_dir"}
    changed = [k for k in new if k not in ignored and k in saved
               and _comparable(k, saved[k]) != _comparable(k, new[k])]
    defining = [k for k in changed if k in RUN_DEFINING]
    if defining and not config.resume_override:
        details = "; ".join(f"{_flag(k)} {new[k]!r} (the run's: {saved[k]!r})" for k in defining)
        raise UserError(f"--resume: {details} would change what the run in {config.output_dir} means: pass the "
                        f"run's settings, or add --resume-override to continue under the new ones")
    return [f"{_flag(k)} {new[k]!r} (was {saved[k]!r})" for k in changed]


PATH_KEYS = ("model.name_or_path", "data.files", "data.eval_files", "deepspeed")


def _comparable(key: str, value):
    if key in PATH_KEYS and value is not None:  # ./a.jsonl and a.jsonl are one file
        paths = [value] if isinstance(value, str) else value
        real = [os.path.realpath(p) if os.path.exists(p) else p for p in paths]
        return real[0] if isinstance(value, str) else real
    return list(value) if isinstance(value, tuple) else value  # JSON turns tuples into lists
