"""What a run needs beyond Trainer's own loop, as ``TrainerCallback``s: they serve ``transformers.Trainer``,
``SCFTTrainer``, TRL's trainers and ``scft-fast train`` alike.

    callbacks = run_callbacks({"eval": (held_out_rows, "held out")}, SCFTDataCollator(tokenizer))
    trainer = SCFTTrainer(..., callbacks=callbacks)    # or transformers.Trainer, TRL's trainers
    trainer.train(resume_from_checkpoint=newest_intact_checkpoint(args.output_dir))

- ``RunDirectory``: one run per output directory. A lock file (an flock: the kernel drops it when the process
  dies, kill -9 included) refuses a concurrent run; a directory that holds another run's files is refused unless
  the run resumes.
- ``VerifiedCheckpoints``: every checkpoint gets ``checksums.json`` (SHA-256 of each file, hashed by the ranks in
  shares, written last: a checkpoint without it is incomplete). ``newest_intact_checkpoint`` verifies them before
  a resume and falls back to the newest intact one, saying which it passed over and why; a DeepSpeed ``latest``
  pointer that leads outside its checkpoint is damage too. Damaged checkpoints are renamed
  ``checkpoint-N.damaged`` (nothing is deleted) when the Trainer is built, so that Trainer's own
  ``resume_from_checkpoint=True`` never takes one.
- ``DivergenceStop``: a NaN or infinite loss, term or gradient norm stops the run at that step with
  ``DivergenceError``, naming the step, the terms and the last good checkpoint; a log is forced before every save,
  so no checkpoint is written after a divergence. It turns off ``logging_nan_inf_filter``, with which Trainer
  logs the running mean in place of a NaN loss.
- ``MetricsLog``: ``metrics.jsonl``, one strict-JSON object per log (non-finite numbers are null); a resumed run
  drops the lines after its checkpoint's step (and a partial last line), so the file reads as one run; at the end,
  ``loss_curves.png``.
- ``HeldOutSummary``: held-out figures (``scft_fast.evaluation.held_out``) before and after training, side by
  side, in ``summary.json``.

Every file is written by the world's main process; every rank runs the callbacks (the held-out forward and the
checkpoint hashing are collective).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import sys

import torch.distributed as dist
from transformers import TrainerCallback

from ..errors import RunError, UserError

CHECKSUMS = "checksums.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOSS_CURVES_PNG = "loss_curves.png"
LOCK_FILE = ".scft-fast.lock"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
LOSS_CURVES = ("loss", "lm_loss", "transition_loss", "cls_loss")
# The terms of a training log a divergence names, in the loss's order.
DIVERGENCE_TERMS = {"lm_loss": "LM loss", "transition_loss": "RTO loss", "cls_loss": "head loss",
                    "loss": "total loss", "grad_norm": "gradient norm"}


class DivergenceError(RunError):
    """A training step produced a non-finite loss, term or gradient norm."""


def say(message: str) -> None:
    print(f"scft-fast: {message}", file=sys.stderr, flush=True)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# -- files ------------------------------------------------------------------------------------------------------------
def strict_json(value):
    """``value`` with every non-finite float replaced by None: JSON has no NaN or Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str, value, indent: int | None = 2) -> None:
    """Strict JSON, written to ``path + ".tmp"`` and renamed: a full disk leaves the old file (or none), never a
    truncated one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(strict_json(value), f, indent=indent, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    found = []
    for parent, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(parent, n), directory) for n in names if n != CHECKSUMS]
    return sorted(found)


# -- checkpoints ------------------------------------------------------------------------------------------------------
def write_checksums(directory: str) -> None:
    """Every rank hashes a share of the checkpoint's files (every rank's, on a shared filesystem); the main process
    writes them all to checksums.json, the last file of a complete checkpoint. Collective."""
    rank, world = _rank_world()
    _barrier()  # every rank's files are written
    files = _files(directory)
    sums = {name: _sha256(os.path.join(directory, name)) for name in files[rank::world]}
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, sums)
        sums = {k: v for share in shares for k, v in share.items()}
    if rank == 0:
        write_json(os.path.join(directory, CHECKSUMS), {"sha256": sums}, indent=1)
    _barrier()


def checkpoint_problem(path: str) -> str | None:
    """None when every file of the checkpoint matches its checksums.json and its DeepSpeed ``latest`` pointer (if
    any) names a directory inside it; else what is wrong."""
    try:
        with open(os.path.join(path, CHECKSUMS)) as f:
            sums = json.load(f)["sha256"]
        if not isinstance(sums, dict):
            raise TypeError
    except FileNotFoundError:
        return f"no {CHECKSUMS} (an incomplete checkpoint: the run stopped while writing it)"
    except (ValueError, KeyError, TypeError):
        return f"{CHECKSUMS} is damaged"
    for name, expected in sorted(sums.items()):
        file = os.path.join(path, name)
        if os.path.isabs(name) or not _inside(file, path):
            return f"{CHECKSUMS} names {name!r}, outside the checkpoint"
        if not os.path.isfile(file):
            return f"{name} is missing"
        if _sha256(file) != expected:
            return f"{name} does not match its checksum (damaged)"
    return _pointer_problem(path)


def _inside(path: str, directory: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(directory)
    return real == root or real.startswith(root + os.sep)


def _pointer_problem(path: str) -> str | None:
    """DeepSpeed resumes from the directory its ``latest`` file names, joined to the checkpoint unchecked."""
    pointer = os.path.join(path, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        tag = f.read().strip()
    target = os.path.join(path, tag)
    if not tag or os.path.isabs(tag) or not _inside(target, path) or not os.path.isdir(target):
        return f"its DeepSpeed pointer 'latest' names {tag!r}, which is not a directory inside the checkpoint"
    return None


def checkpoints(output_dir: str) -> list[int]:
    """The steps of the ``checkpoint-N`` directories in ``output_dir``, ascending."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(int(m.group(1)) for m in map(CHECKPOINT.match, os.listdir(output_dir))
                  if m and os.path.isdir(os.path.join(output_dir, m.group(0))))


def set_aside_damaged(output_dir: str, report=say) -> list[str]:
    """Renames every checkpoint of ``output_dir`` whose files do not match its checksums to ``checkpoint-N.damaged``
    (nothing is deleted), so that no resume takes one, and tells ``report(message)`` which and why. Returns the
    paths set aside. The checkpoints of a run without these callbacks (no checksums.json in any checkpoint, no
    metrics.jsonl or train_config.json beside them) are left as they are: there is nothing to verify against."""
    steps = checkpoints(output_dir)
    ours = any(os.path.exists(os.path.join(output_dir, name)) for name in (METRICS, "train_config.json"))
    if not ours and not any(os.path.exists(os.path.join(output_dir, f"checkpoint-{s}", CHECKSUMS)) for s in steps):
        return []
    damaged = []
    for step in reversed(steps):
        path = os.path.join(output_dir, f"checkpoint-{step}")
        problem = checkpoint_problem(path)
        if problem is not None:
            os.replace(path, path + ".damaged")
            damaged.append(path)
            report(f"checkpoint {path} is damaged: {problem}; it is not loaded (set aside as {path}.damaged)")
    return damaged


def newest_intact_checkpoint(output_dir: str, report=say) -> str | None:
    """The newest checkpoint whose files match their checksums (``set_aside_damaged`` first), None when there is no
    intact one and none was damaged after it was complete (a crash while the first was written). Raises UserError
    when every complete one is damaged."""
    damaged = set_aside_damaged(output_dir, report)
    steps = checkpoints(output_dir)
    if not steps:
        # Checkpoints that a crash left incomplete cost their steps; complete ones that no longer match their
        # checksums are data the user may want back: refuse to start over on top of them.
        if any(os.path.exists(os.path.join(path + ".damaged", CHECKSUMS)) for path in damaged):
            raise UserError(f"every checkpoint in {output_dir} is damaged ({', '.join(damaged)}): restore one, or "
                            f"start the run again in another output directory")
        return None
    path = os.path.join(output_dir, f"checkpoint-{steps[-1]}")
    if damaged:
        report(f"falling back to the newest intact checkpoint, {path}")
    return path


class VerifiedCheckpoints(TrainerCallback):
    """Checksums on every save; damaged checkpoints set aside before a resume could take one (module doc)."""

    def on_init_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            set_aside_damaged(args.output_dir)
        _barrier()

    def on_save(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(path):
            write_checksums(path)


# -- the output directory ---------------------------------------------------------------------------------------------
# What makes a directory hold a run: a run of any Trainer (checkpoints, trainer_state.json) or of these callbacks.
RUN_FILES = (METRICS, SUMMARY, "trainer_state.json", "train_config.json", "model")


def existing_run_files(output_dir: str) -> list[str]:
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(output_dir, name))]
    return found + [f"checkpoint-{s}" for s in checkpoints(output_dir)]


class RunLock:
    """An exclusive flock on ``path``, held until ``release()`` or the process's end."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            self._file = None
            raise UserError(f"output directory {os.path.dirname(path)} is in use by another run (pid {holder}, lock "
                            f"{path}): wait for it to finish, or choose another output directory") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


def claim_output_dir(output_dir: str, resume: bool) -> RunLock:
    """Takes the directory's lock; a directory holding another run's files needs ``resume``. Nothing is written
    but the lock file."""
    os.makedirs(output_dir, exist_ok=True)
    lock = RunLock(os.path.join(output_dir, LOCK_FILE))
    found = existing_run_files(output_dir)
    if found and not resume:
        lock.release()
        raise UserError(f"output directory {output_dir} already holds a run ({', '.join(found)}): resume it, or "
                        f"choose another output directory (nothing was changed)")
    return lock


class RunDirectory(TrainerCallback):
    """One run per output directory (module doc). ``lock``: a lock the caller already holds (``scft-fast train``
    claims the directory before any heavy work); otherwise the main process takes it when the Trainer is built,
    and at the start of training a directory holding another run is refused unless the Trainer resumes."""

    def __init__(self, lock: RunLock | None = None):
        self.lock, self._claimed = lock, lock is not None

    def on_init_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.lock is None:
            os.makedirs(args.output_dir, exist_ok=True)
            self.lock = RunLock(os.path.join(args.output_dir, LOCK_FILE))

    def on_train_begin(self, args, state, control, **kwargs):
        if self._claimed or not state.is_world_process_zero:
            return
        found = existing_run_files(args.output_dir)
        if found and state.global_step == 0:
            self.release()
            raise UserError(f"output directory {args.output_dir} already holds a run ({', '.join(found)}): pass "
                            f"resume_from_checkpoint to continue it, or choose another output_dir")

    def on_train_end(self, args, state, control, **kwargs):
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


# -- divergence -------------------------------------------------------------------------------------------------------
def non_finite_terms(logs: dict) -> list[str]:
    """'LM loss = nan', ... for the terms of a log that are NaN or infinite. The total loss is named only when no
    term explains it."""
    bad = {k: logs[k] for k in DIVERGENCE_TERMS
           if isinstance(logs.get(k), (int, float)) and not math.isfinite(logs[k])}
    if "loss" in bad and bad.keys() & {"lm_loss", "transition_loss", "cls_loss"}:
        del bad["loss"]
    return [f"{DIVERGENCE_TERMS[k]} = {v}" for k, v in bad.items()]


class DivergenceStop(TrainerCallback):
    """Stops the run at the first log with a non-finite term (module doc)."""

    def on_train_begin(self, args, state, control, **kwargs):
        args.logging_nan_inf_filter = False  # else Trainer logs the running mean in place of a NaN loss

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True  # a check before every save: no checkpoint of a diverged model

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        diverged = non_finite_terms(logs)
        if diverged:
            last = next((os.path.join(args.output_dir, f"checkpoint-{s}") for s in reversed(checkpoints(args.output_dir))
                         if checkpoint_problem(os.path.join(args.output_dir, f"checkpoint-{s}")) is None), None)
            raise DivergenceError(
                f"the run diverged at step {state.global_step}: {', '.join(diverged)}. It stopped without saving a "
                f"checkpoint or a model; the last good checkpoint is {last or 'none'} (lower the learning rate or "
                f"max_grad_norm, or check the loss coefficients, then resume)")


# -- metrics ----------------------------------------------------------------------------------------------------------
class MetricsLog(TrainerCallback):
    """``metrics.jsonl`` and, at the end, ``loss_curves.png`` (module doc)."""

    def __init__(self, plot: bool = True):
        self.plot = plot
        self.path: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.path = os.path.join(args.output_dir, METRICS)
        if not state.is_world_process_zero:
            return
        kept = []
        if state.global_step > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.readlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    if number < len(lines):
                        raise UserError(f"{self.path}:{number}: not a metrics record ({line.strip()!r:.80}); remove "
                                        f"the line or the file to resume") from None
                    say(f"{self.path}:{number}: dropped a partial last line (the run stopped while writing it)")
                    continue
                if step <= state.global_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and self.path is not None:
            record = {"step": state.global_step, **logs}
            with open(self.path, "a") as f:
                f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.plot and self.path is not None and os.path.exists(self.path):
            plot_loss_curves(self.path, os.path.join(args.output_dir, LOSS_CURVES_PNG))


def plot_loss_curves(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    fig, axes = plt.subplots(1, len(LOSS_CURVES), figsize=(4 * len(LOSS_CURVES), 3.2))
    for ax, key in zip(axes, LOSS_CURVES):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, lw=0.8, alpha=0.35, color="C0")
            window = max(1, len(values) // 20)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color="C0")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


# -- the held-out summary ---------------------------------------------------------------------------------------------
class HeldOutSummary(TrainerCallback):
    """Held-out figures before and after training, side by side in ``summary.json`` (module doc).

    ``held_out``: {name: (dataset, title)}, rows of ``scft_fast.data.build_dataset``; ``collator`` pads them
    (``SCFTDataCollator``); ``batch_size`` rows per forward. The "before" figures of a resumed run are the ones its
    first start wrote (``{name}_before.json``). ``summary`` holds the result once training has ended; ``extra``
    (a dict) joins it."""

    def __init__(self, held_out: dict, collator, batch_size: int = 16, extra: dict | None = None):
        self.held_out, self.collator, self.batch_size = held_out, collator, batch_size
        self.extra = dict(extra or {})
        self.before: dict[str, dict] = {}
        self.summary: dict | None = None

    def _evaluate(self, model) -> dict[str, dict]:
        from ..evaluation.held_out import held_out

        return {name: held_out(model, dataset, self.collator, self.batch_size)
                for name, (dataset, _) in self.held_out.items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = {name: os.path.join(args.output_dir, f"{name}_before.json") for name in self.held_out}
        if state.global_step > 0 and all(os.path.exists(p) for p in saved.values()):
            for name, path in saved.items():
                with open(path) as f:
                    self.before[name] = json.load(f)
            return
        self.before = self._evaluate(model)
        if state.is_world_process_zero:
            for name, path in saved.items():
                write_json(path, self.before[name], indent=None)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        after = self._evaluate(model)
        rows = [r for r in read_metrics(os.path.join(args.output_dir, METRICS)) if "loss" in r] \
            if os.path.exists(os.path.join(args.output_dir, METRICS)) else []
        summary = {"steps": state.global_step, "world_size": args.world_size,
                   "losses_first_10pct": _window_means(rows[:max(1, len(rows) // 10)]),
                   "losses_last_10pct": _window_means(rows[-max(1, len(rows) // 10):]),
                   "tokens_per_s": _mean([r.get("tokens_per_s") for r in rows[1:] or rows]),
                   "eval_sets": {name: title for name, (_, title) in self.held_out.items()}}
        for name in self.held_out:
            summary[f"{name}_before"], summary[f"{name}_after"] = self.before.get(name), after[name]
        summary.update(self.extra)
        self.summary = summary
        if state.is_world_process_zero:
            write_json(os.path.join(args.output_dir, SUMMARY), summary)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _window_means(rows: list[dict]) -> dict:
    return {key: _mean([r.get(key) for r in rows]) for key in LOSS_CURVES}


def run_callbacks(held_out: dict | None = None, collator=None, lock: RunLock | None = None,
                  batch_size: int = 16) -> list[TrainerCallback]:
    """The whole set, in the order they run: the directory first; the metrics before the divergence check, so
    that the diverged step's record (its non-finite terms as null) is in metrics.jsonl; the summary last."""
    return [RunDirectory(lock), VerifiedCheckpoints(), MetricsLog(), DivergenceStop(),
            HeldOutSummary(held_out or {}, collator, batch_size)]
