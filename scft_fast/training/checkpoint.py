"""Atomic checkpoints: every rank writes into checkpoint-N.tmp, then rank 0 renames it and moves the "latest"
pointer (os.replace, atomic on POSIX). A crash mid-save leaves a .tmp directory that is never loaded; the last
good checkpoint stays where it was. Multi-node runs need output_dir on a shared filesystem."""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

_NAME = re.compile(r"^checkpoint-(\d+)$")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, output_dir: str, step: int, keep: int, rank: int) -> str:
    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    engine.save(tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng-rank{rank}.pt"))  # each rank's own generators
    _barrier()
    if rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        for old in sorted(_checkpoints(root))[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, f"checkpoint-{old}"), ignore_errors=True)
    _barrier()
    return final


def _checkpoints(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return [int(m.group(1)) for m in map(_NAME.match, os.listdir(root)) if m]


def latest_checkpoint(output_dir: str) -> str | None:
    root = os.path.join(output_dir, "checkpoints")
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.isdir(path):
            return path
    steps = _checkpoints(root)
    return os.path.join(root, f"checkpoint-{max(steps)}") if steps else None


def load_checkpoint(engine, path: str, rank: int) -> int:
    """Restores the engine and this rank's RNG; returns the step the checkpoint was taken after."""
    engine.load(path)
    set_rng_state(torch.load(os.path.join(path, f"rng-rank{rank}.pt"), weights_only=False))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)["step"]
