"""Atomic, verified checkpoints: every rank writes into checkpoint-N.tmp, the ranks hash its files into
checksums.json (SHA-256), then rank 0 renames it and moves the "latest" pointer (os.replace, atomic on POSIX). A
crash mid-save leaves a .tmp directory that is never loaded; the last good checkpoint stays where it was. On
resume, resume_checkpoint() verifies the newest checkpoint's files against its checksums and falls back to the
next older intact one, saying which and why. Multi-node runs need output_dir on a shared filesystem."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from ..errors import RunError, UserError

_NAME = re.compile(r"^checkpoint-(\d+)$")
CHECKSUMS = "checksums.json"


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
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"step": step}, f)
        _barrier()
        engine.save(tmp)
        torch.save(rng_state(), os.path.join(tmp, f"rng-rank{rank}.pt"))  # each rank's own generators
        _barrier()
        _write_checksums(tmp, rank)
    except (OSError, RuntimeError) as e:
        if not _is_write_failure(e):
            raise
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(output_dir)
        raise RunError(f"writing checkpoint {final} failed: {_write_failure_reason(e)}. Free space under "
                       f"{output_dir} (or lower --keep-checkpoints), then --resume: the last good checkpoint is "
                       f"{last or 'none (the run restarts from step 0)'}") from e
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        for old in sorted(_checkpoints(root))[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, f"checkpoint-{old}"), ignore_errors=True)
    _barrier()
    return final


def _is_write_failure(e: Exception) -> bool:
    # torch.save reports a short write (a full disk) as a RuntimeError from its zip writer.
    return isinstance(e, OSError) or any(s in str(e) for s in ("unexpected pos", "file write failed",
                                                               "No space left"))


def _write_failure_reason(e: Exception) -> str:
    if getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e) or "No space left" in str(e):
        return "no space left on the device"
    return f"{type(e).__name__}: {e}"


def _files(directory: str) -> list[str]:
    found = []
    for parent, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(parent, n), directory) for n in names if n != CHECKSUMS]
    return sorted(found)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_checksums(directory: str, rank: int) -> None:
    """Each rank hashes a share of the checkpoint's files (every rank's, on a shared filesystem); rank 0 writes
    them all to checksums.json, the last file of a complete checkpoint."""
    files = _files(directory)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    sums = {name: _sha256(os.path.join(directory, name)) for name in files[rank::world]}
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, sums)
        sums = {k: v for share in shares for k, v in share.items()}
    if rank == 0:
        with open(os.path.join(directory, CHECKSUMS), "w") as f:
            json.dump({"sha256": sums}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())


def checkpoint_problem(path: str) -> str | None:
    """None when every file of the checkpoint matches checksums.json, else what is wrong."""
    try:
        with open(os.path.join(path, CHECKSUMS)) as f:
            sums = json.load(f)["sha256"]
    except FileNotFoundError:
        return f"no {CHECKSUMS} (an incomplete checkpoint, or one written by an older scft_fast)"
    except (ValueError, KeyError, TypeError):
        return f"{CHECKSUMS} is damaged"
    for name, expected in sorted(sums.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if _sha256(file) != expected:
            return f"{name} does not match its checksum (damaged)"
    return None


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


def resume_checkpoint(output_dir: str, report) -> str | None:
    """The newest intact checkpoint (the "latest" pointer first, then by step), None when there is none at all;
    report(message) hears of every damaged one passed over. Raises UserError when all are damaged."""
    root = os.path.join(output_dir, "checkpoints")
    candidates = [latest_checkpoint(output_dir)] + [os.path.join(root, f"checkpoint-{s}")
                                                    for s in sorted(_checkpoints(root), reverse=True)]
    damaged = []
    for path in dict.fromkeys(c for c in candidates if c):
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                report(f"falling back to the newest intact checkpoint, {path}")
            return path
        damaged.append(path)
        report(f"checkpoint {path} is damaged: {problem}; it is not loaded")
    if damaged:
        raise UserError(f"every checkpoint in {root} is damaged ({', '.join(damaged)}): restore one, or start the "
                        f"run again in another --output-dir")
    return None


def load_checkpoint(engine, path: str, rank: int) -> int:
    """Restores the engine and this rank's RNG; returns the step the checkpoint was taken after."""
    engine.load(path)
    set_rng_state(torch.load(os.path.join(path, f"rng-rank{rank}.pt"), weights_only=False))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)["step"]
