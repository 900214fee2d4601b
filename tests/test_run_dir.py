"""`scft-fast train` loses nothing and hides nothing: one run per output directory, verified checkpoints, exact
resume after kill -9, divergence stops the run, strict-JSON metrics. Each input is written here; the runs are the
tiny preset on 48 embedded records, 4 sequences per micro-batch."""
import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")
from scft_fast.cli import main  # noqa: E402
from scft_fast.data import default_data_files  # noqa: E402
from scft_fast.training.checkpoint import resume_checkpoint  # noqa: E402
from scft_fast.training.config import OptimSpec  # noqa: E402
from scft_fast.training.engine import lr_lambda  # noqa: E402
from scft_fast.training.metrics import non_finite_terms  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
COMPARED = ("loss", "lm_loss", "transition_loss", "cls_loss", "grad_norm", "lr")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(default_data_files("train")[0]) as f:
        path.write_text("".join(next(f) for _ in range(48)))
    return str(path)


def run_args(data, out, *extra, steps=STEPS, save_every=2):
    return ["train", "--data", data, "--output-dir", str(out), "--max-steps", str(steps), "--save-every",
            str(save_every), "--keep-checkpoints", "3", "--micro-batch-size", "4", "--eval-samples", "0",
            "--no-progress", *extra]


def strict_rows(run):
    """metrics.jsonl parsed as strict JSON: NaN / Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant}")

    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def same_losses(rows, reference):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for got, want in zip(rows, reference):
        for key in COMPARED:
            assert got[key] == want[key], (got["step"], key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_data):
    """An uninterrupted run of 4 steps with checkpoints 2 and 4."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(run_args(small_data, out)) == 0
    return str(out)


def copy_run(reference, tmp_path, name="run"):
    shutil.copytree(reference, tmp_path / name)
    return str(tmp_path / name)


def test_reused_output_dir_resume_settings_and_finished_run(reference, small_data, tmp_path, capsys):
    run = copy_run(reference, tmp_path)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        metrics = f.read()
    # A second run without --resume is refused before any work and changes nothing.
    assert main(run_args(small_data, run)) == 2
    assert "already holds a run" in capsys.readouterr().err
    with open(os.path.join(run, "metrics.jsonl")) as f:
        assert f.read() == metrics
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["checkpoint-2", "checkpoint-4", "latest"]
    # Settings that change what the run means are refused on resume...
    assert main(run_args(small_data, run, "--resume", "--micro-batch-size", "8")) == 2
    err = capsys.readouterr().err
    assert "--micro-batch-size 8 (the run's: 4)" in err and "--resume-override" in err
    # ...a finished run has nothing to do and keeps its summary, and --max-steps below the checkpoint is an error.
    with open(os.path.join(run, "summary.json")) as f:
        summary = f.read()
    assert main(run_args(small_data, run, "--resume")) == 0
    assert "is finished (4 of 4 steps): nothing to do" in capsys.readouterr().err
    with open(os.path.join(run, "summary.json")) as f:
        assert f.read() == summary and json.loads(summary)["tokens_per_s"] > 0
    assert main(run_args(small_data, run, "--resume", steps=3)) == 2
    assert "--max-steps 3 is below the step of the checkpoint resumed (4)" in capsys.readouterr().err
    # An accepted change is applied and recorded, and the resumed checkpoint is named.
    assert main(run_args(small_data, run, "--resume", "--lr", "1e-3", steps=6)) == 0
    err = capsys.readouterr().err
    assert f"resuming from {os.path.join(run, 'checkpoints', 'checkpoint-4')} (step 4)" in err
    assert "changed on resume: --lr 0.001 (was 0.003)" in err
    rows = strict_rows(run)
    same_losses(rows[:STEPS], strict_rows(reference))
    optim = OptimSpec(lr=1e-3)
    assert [r["lr"] for r in rows[STEPS:]] == [1e-3 * lr_lambda(optim, 6)(s) for s in (5, 6)]
    with open(os.path.join(run, "train_config.json")) as f:
        assert json.load(f)["optim"]["lr"] == 1e-3
    # --resume-override takes the new geometry (here on a run already at its last step).
    assert main(run_args(small_data, run, "--resume", "--resume-override", "--micro-batch-size", "8", steps=6)) == 0
    assert "changed on resume: --micro-batch-size 8 (was 4)" in capsys.readouterr().err


def test_damaged_checkpoint_falls_back_to_the_older_one(reference, small_data, tmp_path, capsys):
    damaged = copy_run(reference, tmp_path, "damaged")
    engine_pt = os.path.join(damaged, "checkpoints", "checkpoint-4", "engine.pt")
    size = os.path.getsize(engine_pt)
    with open(engine_pt, "r+b") as f:  # 4 KiB overwritten in place: same size, same name
        f.seek(size // 2)
        f.write(b"\x7f" * 4096)
    assert os.path.getsize(engine_pt) == size
    with open(os.path.join(damaged, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # the run was killed while writing a line
    assert main(run_args(small_data, damaged, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {os.path.join(damaged, 'checkpoints', 'checkpoint-4')} is damaged: engine.pt does not " \
           f"match its checksum" in err
    assert f"falling back to the newest intact checkpoint, {os.path.join(damaged, 'checkpoints', 'checkpoint-2')}" \
           in err
    assert "metrics.jsonl:5: dropped a partial last line" in err
    # The same losses as a run resumed from checkpoint-2 on purpose, and as the uninterrupted run.
    older = copy_run(reference, tmp_path, "older")
    shutil.rmtree(os.path.join(older, "checkpoints", "checkpoint-4"))
    os.remove(os.path.join(older, "checkpoints", "latest"))
    assert main(run_args(small_data, older, "--resume")) == 0
    same_losses(strict_rows(damaged), strict_rows(older))
    same_losses(strict_rows(damaged), strict_rows(reference))


def test_every_checkpoint_damaged_is_an_error(reference, tmp_path):
    run = copy_run(reference, tmp_path)
    for step in (2, 4):
        os.remove(os.path.join(run, "checkpoints", f"checkpoint-{step}", "trainer_state.json"))
    heard = []
    with pytest.raises(Exception, match="every checkpoint in .* is damaged"):
        resume_checkpoint(run, heard.append)
    assert len(heard) == 2 and all("trainer_state.json is missing" in m for m in heard)


def test_divergence_stops_the_run_with_strict_json_metrics(small_data, tmp_path, capsys):
    # --lr inf is refused as a flag; a finite but absurd lr diverges at step 2.
    with pytest.raises(SystemExit) as info:
        main(run_args(small_data, tmp_path / "inf", "--lr", "inf"))
    assert info.value.code == 2 and "argument --lr: expected a finite number > 0, got inf" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "inf" / "metrics.jsonl")
    run = str(tmp_path / "diverged")
    assert main(run_args(small_data, run, "--lr", "1e30", steps=4, save_every=1)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # Which terms are NaN at step 2 depends on the preset's random initialization; the LM and head terms always are.
    assert err.startswith("scft-fast train: error: the run diverged at step 2: LM loss = nan, ")
    assert "head loss = nan" in err
    assert f"the last good checkpoint is {os.path.join(run, 'checkpoints', 'checkpoint-1')}" in err
    rows = strict_rows(run)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["lm_loss"] is None and rows[0]["lm_loss"] > 0
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["checkpoint-1", "latest"]
    assert not os.path.exists(os.path.join(run, "model"))


def test_non_finite_terms_name_the_term():
    record = {"loss": float("nan"), "lm_loss": 1.0, "transition_loss": float("inf"), "cls_loss": 0.5,
              "grad_norm": 2.0}
    assert non_finite_terms(record) == ["RTO loss = inf"]
    assert non_finite_terms({"loss": 1.0, "lm_loss": None, "grad_norm": float("inf")}) == ["gradient norm = inf"]
    assert non_finite_terms({"loss": float("nan"), "lm_loss": None, "grad_norm": 1.0}) == ["total loss = nan"]


def test_full_disk_during_a_checkpoint(small_data, tmp_path, capsys, monkeypatch):
    """A full disk, simulated: torch.save fails as its zip writer does on a short write."""
    import torch

    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if "checkpoint-2" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4048")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = str(tmp_path / "full")
    assert main(run_args(small_data, run, steps=3, save_every=1)) == 1
    err = capsys.readouterr().err
    assert "writing checkpoint" in err and "checkpoint-2 failed: no space left on the device" in err
    assert f"the last good checkpoint is {os.path.join(run, 'checkpoints', 'checkpoint-1')}" in err
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["checkpoint-1", "latest"]


def test_kill_9_while_checkpointing_then_resume_is_exact_and_a_concurrent_run_is_refused(reference, small_data,
                                                                                           tmp_path, capsys):
    run = str(tmp_path / "killed")
    env = {**os.environ, "PYTHONPATH": REPO}  # the same threads as this process: the same float sums
    proc = subprocess.Popen([sys.executable, "-m", "scft_fast.cli", *run_args(small_data, run, save_every=1)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        checkpoints = os.path.join(run, "checkpoints")
        deadline = time.monotonic() + 300
        while not os.path.isdir(checkpoints) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        # While it runs, a second run into its directory is refused, resume or not.
        assert main(run_args(small_data, run, "--resume")) == 2
        assert f"is in use by another run (pid {proc.pid}" in capsys.readouterr().err
        # A checkpoint follows every step: a random moment in or between the saves of steps 1 to 3.
        delay = random.uniform(0.0, 0.1)
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
