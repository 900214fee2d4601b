"""`scft-fast train` loses nothing and hides nothing: one run per output directory, verified checkpoints, exact
resume after kill -9, divergence stops the run, strict-JSON metrics; a full disk or a read-only directory at any
moment is one line naming the path and leaves the directory resumable; nothing a run directory holds runs code.

Runs: the tiny preset on 48 embedded records, 4 sequences per micro-batch. A full disk is simulated by making the
writes into one path fail as the kernel does (OSError ENOSPC from open()), a read-only directory by chmod."""
import builtins
import errno
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")
from scft_fast.cli import main  # noqa: E402
from scft_fast.hf.callbacks import newest_intact_checkpoint, non_finite_terms, write_checksums  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
COMPARED = ("loss", "lm_loss", "transition_loss", "cls_loss", "grad_norm", "learning_rate")


def run_args(data, out, *extra, steps=STEPS, save_every=2):
    return ["train", "--data", data, "--output-dir", str(out), "--max-steps", str(steps), "--save-every",
            str(save_every), "--keep-checkpoints", "3", "--micro-batch-size", "4", "--eval-samples", "0",
            "--no-progress", *extra]


def strict_rows(run):
    """metrics.jsonl's training records parsed as strict JSON: NaN / Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant}")

    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in (json.loads(line, parse_constant=refuse) for line in f) if "loss" in r]


def same_losses(rows, reference):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for got, want in zip(rows, reference):
        for key in COMPARED:
            assert got.get(key) == want.get(key), (got["step"], key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_data):
    """An uninterrupted run of 4 steps with checkpoints 2 and 4."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(run_args(small_data, out)) == 0
    return str(out)


def copy_run(reference, tmp_path, name="run"):
    shutil.copytree(reference, tmp_path / name)
    return str(tmp_path / name)


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def failing_writes(monkeypatch, fragment: str, code: int = errno.ENOSPC):
    """Every open() for writing of a path containing ``fragment`` fails with OSError ``code``, as the kernel's."""
    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        if fragment in str(file) and any(c in mode for c in "wax+"):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)


@pytest.fixture
def full_disk(monkeypatch):
    return lambda fragment: failing_writes(monkeypatch, fragment)


def test_reused_output_dir_resume_settings_and_finished_run(reference, small_data, tmp_path, capsys):
    run = copy_run(reference, tmp_path)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        metrics = f.read()
    # A second run without --resume is refused before any work and changes nothing.
    assert main(run_args(small_data, run)) == 2
    assert "already holds a run" in last_error(capsys)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert f.read() == metrics
    # Settings that change what the run means are refused on resume, naming the flag...
    assert main(run_args(small_data, run, "--resume", "--micro-batch-size", "8")) == 2
    err = last_error(capsys)
    assert "--micro-batch-size 8 (the run's: 4)" in err and "--resume-override" in err
    # ...as are optimizer settings Trainer restores from the checkpoint (a new value would silently not apply).
    assert main(run_args(small_data, run, "--resume", "--lr", "1e-3")) == 2
    assert "--lr 0.001 (the run's: 0.003) would not apply: Trainer restores the optimizer" in last_error(capsys)
    # A finished run has nothing to do and keeps its summary; --max-steps below the checkpoint is an error.
    assert main(run_args(small_data, run, "--resume")) == 0
    assert "is finished (4 of 4 steps" in capsys.readouterr().err
    assert main(run_args(small_data, run, "--resume", steps=3)) == 2
    assert "--max-steps 3 is below the step of the checkpoint resumed (4)" in last_error(capsys)
    # More steps: the resumed checkpoint is named, the change listed, the first steps' records kept as they were.
    assert main(run_args(small_data, run, "--resume", steps=6)) == 0
    err = capsys.readouterr().err
    assert f"resuming from {os.path.join(run, 'checkpoint-4')} (step 4)" in err
    assert "changed on resume: --max-steps 6 (was 4)" in err
    rows = strict_rows(run)
    same_losses(rows[:STEPS], strict_rows(reference))
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["training"]["max_steps"] == 6
    # --resume-override takes a new geometry.
    assert main(run_args(small_data, run, "--resume", "--resume-override", "--micro-batch-size", "8", steps=7)) == 0
    assert "changed on resume: --micro-batch-size 8 (was 4)" in capsys.readouterr().err


def test_damaged_checkpoint_falls_back_to_the_older_one(reference, small_data, tmp_path, capsys):
    damaged = copy_run(reference, tmp_path, "damaged")
    weights = os.path.join(damaged, "checkpoint-4", "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:  # 4 KiB overwritten in place: same size, same name
        f.seek(size // 2)
        f.write(b"\x7f" * 4096)
    shutil.rmtree(os.path.join(damaged, "model"))
    with open(os.path.join(damaged, "metrics.jsonl")) as f:
        partial = len(f.readlines()) + 1
    with open(os.path.join(damaged, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # the run was killed while writing a line
    assert main(run_args(small_data, damaged, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {os.path.join(damaged, 'checkpoint-4')} is damaged: model.safetensors does not match its " \
           f"checksum" in err
    assert f"falling back to the newest intact checkpoint, {os.path.join(damaged, 'checkpoint-2')}" in err
    assert f"metrics.jsonl:{partial}: dropped a partial last line" in err
    assert os.path.isdir(os.path.join(damaged, "checkpoint-4.damaged"))  # set aside, not deleted
    same_losses(strict_rows(damaged), strict_rows(reference))


def test_every_checkpoint_damaged_is_an_error(reference, tmp_path):
    run = copy_run(reference, tmp_path)
    for step in (2, 4):
        os.remove(os.path.join(run, f"checkpoint-{step}", "trainer_state.json"))
    heard = []
    with pytest.raises(Exception, match="every checkpoint in .* is damaged"):
        newest_intact_checkpoint(run, heard.append)
    assert len(heard) == 2 and all("trainer_state.json is missing" in m for m in heard)


def test_divergence_stops_the_run_with_strict_json_metrics(small_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(run_args(small_data, tmp_path / "inf", "--lr", "inf"))
    assert info.value.code == 2 and "argument --lr: expected a finite number > 0, got inf" in last_error(capsys)
    assert not os.path.exists(tmp_path / "inf" / "metrics.jsonl")
    run = str(tmp_path / "diverged")
    assert main(run_args(small_data, run, "--lr", "1e30", "--warmup-steps", "0", steps=4, save_every=1)) == 1
    err = last_error(capsys)
    assert err.startswith("scft-fast train: error: the run diverged at step 2: LM loss = nan") and \
        "head loss = nan" in err
    assert f"the last good checkpoint is {os.path.join(run, 'checkpoint-1')}" in err
    rows = strict_rows(run)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["lm_loss"] is None and rows[0]["lm_loss"] > 0
    assert sorted(d for d in os.listdir(run) if d.startswith("checkpoint")) == ["checkpoint-1"]
    assert not os.path.exists(os.path.join(run, "model"))


def test_non_finite_terms_name_the_term():
    record = {"loss": float("nan"), "lm_loss": 1.0, "transition_loss": float("inf"), "cls_loss": 0.5,
              "grad_norm": 2.0}
    assert non_finite_terms(record) == ["RTO loss = inf"]
    assert non_finite_terms({"loss": 1.0, "lm_loss": None, "grad_norm": float("inf")}) == ["gradient norm = inf"]
    assert non_finite_terms({"loss": float("nan"), "lm_loss": None, "grad_norm": 1.0}) == ["total loss = nan"]


@pytest.mark.parametrize("where, code, named", [
    ("train_config.json", 2, "train_config.json.tmp"),  # at the start: a set-up error, nothing written
    ("metrics.jsonl", 1, "metrics.jsonl"),  # the first training record
    ("checkpoint-2", 1, "checkpoint-2"),  # a checkpoint
    ("model.tmp", 1, "model.tmp"),  # the final export
])
def test_a_full_disk_at_any_moment_is_one_line_and_the_run_resumes(small_data, tmp_path, capsys, full_disk,
                                                                     monkeypatch, where, code, named):
    run = str(tmp_path / "full")
    full_disk(where)
    assert main(run_args(small_data, run)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("scft-fast train: error: ") and named in err[-1] and "No space left on device" in err[-1]
    assert not os.path.exists(os.path.join(run, "model"))  # never a half-written final model
    if os.path.exists(os.path.join(run, "train_config.json")):
        assert os.path.getsize(os.path.join(run, "train_config.json")) > 0  # never a 0-byte config
    monkeypatch.undo()  # room again: the directory takes --resume (or a fresh start when nothing was kept)
    assert main(run_args(small_data, run, *(["--resume"] if code == 1 else []))) == 0
    assert [r["step"] for r in strict_rows(run)] == list(range(1, STEPS + 1))
    assert os.path.isfile(os.path.join(run, "model", "model.safetensors"))


def test_a_read_only_output_directory_is_one_line(small_data, tmp_path, capsys, monkeypatch):
    """Every write under the directory fails as on a read-only filesystem (EROFS; chmod would not stop root)."""
    run = tmp_path / "readonly"
    run.mkdir()
    failing_writes(monkeypatch, str(run), errno.EROFS)
    assert main(run_args(small_data, run)) == 2
    err = last_error(capsys)
    assert err.startswith("scft-fast train: error: cannot use output directory ") and str(run) in err
    assert "Read-only file system" in err and os.listdir(run) == []


def test_nothing_a_run_directory_holds_runs_code(reference, small_data, tmp_path, capsys):
    """A pickle that would run code, written over a checkpoint's RNG state with its checksum rewritten to match
    (the checksums sit beside the files: they guard against damage, not against an attacker), is refused by the
    loader (torch.load with weights_only=True); a DeepSpeed 'latest' pointer leading outside its checkpoint is
    refused before anything is read."""
    run = copy_run(reference, tmp_path)
    shutil.rmtree(os.path.join(run, "model"))
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    checkpoint = os.path.join(run, "checkpoint-4")
    with open(os.path.join(checkpoint, "rng_state.pth"), "wb") as f:
        pickle.dump(Payload(), f)
    write_checksums(checkpoint)
    assert main(run_args(small_data, run, "--resume", steps=6)) == 2
    err = last_error(capsys)
    assert f"a file of checkpoint {checkpoint} holds more than tensors and plain values, which the loader refuses " \
           f"to unpickle" in err
    assert not marker.exists()
    with open(os.path.join(run, "checkpoint-2", "latest"), "w") as f:
        f.write(str(tmp_path))  # an absolute path
    write_checksums(os.path.join(run, "checkpoint-2"))
    heard = []
    shutil.rmtree(checkpoint)
    with pytest.raises(Exception, match="every checkpoint .* is damaged"):
        newest_intact_checkpoint(run, heard.append)
    assert "its DeepSpeed pointer 'latest' names" in heard[0] and "not a directory inside the checkpoint" in heard[0]


def test_kill_9_while_checkpointing_then_resume_is_exact_and_a_concurrent_run_is_refused(reference, small_data,
                                                                                           tmp_path, capsys):
    run = str(tmp_path / "killed")
    env = {**os.environ, "PYTHONPATH": REPO}  # the same threads as this process: the same float sums
    proc = subprocess.Popen([sys.executable, "-m", "scft_fast.cli", *run_args(small_data, run, save_every=1)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = os.path.join(run, "checkpoint-1")
        deadline = time.monotonic() + 300
        while not os.path.isdir(first) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        # While it runs, a second run into its directory is refused, resume or not.
        assert main(run_args(small_data, run, "--resume")) == 2
        assert f"is in use by another run (pid {proc.pid}" in last_error(capsys)
        # A checkpoint follows every step: a random moment in or between the saves of steps 1 to 3.
        delay = random.uniform(0.0, 0.3)
        time.sleep(delay)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -9, f"the run ended before the kill (after {delay:.3f} s): nothing was tested"
    assert main(run_args(small_data, run, "--resume", save_every=1)) == 0
    same_losses(strict_rows(run), strict_rows(reference))
