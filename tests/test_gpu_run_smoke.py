"""benchmarks/gpu_run.sh in its CPU smoke mode: the GPU run's code paths, checked before a GPU is lent.

One full run (tiny shapes, the packages the GPU image lacks hidden) writes every file the GPU run writes; the tests
read them back: the streamed rows, the training-step rows, the table printed last. Two more runs: one whose step is
cut by the run's budget mid-way (its rows survive and the summary names the cut), one whose install check fails
(the run stops at once with the reason). What cannot be checked here: real Triton (the smoke uses the interpreter
and the torch backend), CUDA-event timing and CUDA peak memory, the Liger-Kernel and CCE rows, the install from
.whl/ (only its failure path runs, below), and the GPU image's own torch 2.11 / transformers 5.17.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_run.sh"
# The runner's table and install, read without putting benchmarks/ on sys.path for the whole session.
_spec = importlib.util.spec_from_file_location("gpu_run", REPO / "benchmarks" / "gpu_run.py")
gpu_run = sys.modules.setdefault("gpu_run", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(gpu_run)


def _run(*args, timeout=300, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHON=sys.executable, **env), cwd=REPO)


def _stream(out: Path, pattern: str) -> list[dict]:
    (path,) = out.glob(pattern)
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run") / "out"
    done = _run("--smoke", str(out))
    return out, done


def test_the_steps_fit_the_budget_and_run_the_target_rows_first():
    assert gpu_run.planned_seconds() <= gpu_run.BUDGET_S
    names = [s.name for s in gpu_run.STEPS]
    assert names.index("op_main") < names.index("train_step") < min(
        names.index(n) for n in ("op_compiled", "ceilings", "tests", "op_more"))
    main = next(s for s in gpu_run.STEPS if s.name == "op_main")
    only = main.gpu[main.gpu.index("--only") + 1].split(",")
    assert {"gemm", "scft_lm:triton:auto", "scft_full:triton:auto", "liger", "cce:cce"} <= set(only)
    assert main.gpu[main.gpu.index("--rows") + 1] == "8192"
    for step in gpu_run.STEPS:
        for command in (step.gpu, step.smoke or ()):
            scripts = [a for a in command if a.endswith(".py")]
            assert all((REPO / a).is_file() for a in scripts), (step.name, scripts)


def test_smoke_run_writes_every_result_and_prints_the_table_last(smoke):
    out, done = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == ["install", "verify"] + [s.name for s in gpu_run.STEPS]
    assert {s["step"]: s["status"] for s in steps if s["status"] != "ok"} == {
        "install": "skipped", "op_compiled": "skipped", "op_more": "skipped"}
    assert steps[1]["note"].startswith("verified: scft_fast.kernels imports; one torch.float32 row")

    versions = json.loads((out / "versions.json").read_text())
    assert versions["versions"]["torch"] == torch.__version__ and "end" in versions

    warm = _stream(out, "warmup.jsonl")
    assert [w["key"] for w in warm if w["event"] == "row"] == ["auto backend: safety_epilogue_cpu", "gemm", "naive",
                                                               "scft_lm:torch:auto", "scft_full:torch:auto"]
    assert all(w["first_s"] > 0 for w in warm if w["event"] == "row")

    tests = _stream(out, "tests.jsonl")
    results = [t for t in tests if t["event"] == "result"]
    assert results and all(t["outcome"] == "passed" for t in results)
    assert {t["test"] for t in tests if t["event"] == "start"} == {t["test"] for t in results}

    op = _stream(out, "op_cpu_*_main.jsonl")
    assert [line["event"] for line in op] == ["start"] + ["row"] * 4 + ["rep"] * 2 + ["end"]
    assert all(len(line["times"]) == 4 for line in op if line["event"] == "rep")
    final = json.loads(next(out.glob("op_cpu_*_main.json")).read_text())
    assert final["meta"]["cut"] is None and all(len(st["times_s"]) == 2 for st in final["rows"])

    ceilings = _stream(out, "ceilings_cpu_*.jsonl")
    assert [c["row"] for c in ceilings if c["event"] == "row"][0] == "copy" and ceilings[-1] == {"event": "end",
                                                                                                 "cut": None}

    train = _stream(out, "train_step_cpu_*.jsonl")
    runs = {line["mode"]: line for line in train if line["event"] == "run"}
    assert set(runs) == {"full", "plain", "hf"}
    for mode, run in runs.items():
        assert "error" not in run, run
        assert len(run["step_times_s"]) == 3 and run["tokens_per_s"] > 0 and run["peak_memory_bytes"] > 0
        assert run["train_loss"] > 0
    assert {line["mode"]: line["reason"] for line in train if line["event"] == "skipped"} == {
        "liger": "Liger-Kernel runs on CUDA only"}
    start = train[0]
    assert start["loss_rows_per_pack"] and all(n > 0 for n in start["loss_rows_per_pack"])
    # Every mode trains on the same packs in the same order, each pack once.
    assert runs["full"]["tokens_per_step"] == runs["plain"]["tokens_per_step"] == runs["hf"]["tokens_per_step"]
    assert sorted(runs["full"]["tokens_per_step"]) == sorted(start["tokens_per_pack"])
    assert "transition_loss" in runs["full"]["logs"] and "transition_loss" not in runs["plain"]["logs"]

    table = (out / "summary.md").read_text()
    assert done.stdout.endswith(table)
    for line in ("# gpu_run summary (CPU smoke mode", "| step | status | exit | s | limit s | note |",
                 "| ceiling | rate | unit |", "op main, N=96 (N_loss=64), H=32, V=512, float32; 2 of 2 timed",
                 "- not run: Liger-Kernel, Cut Cross-Entropy: CUDA only", "- tests: 4 passed, 0 skipped, 0 failed",
                 "| liger | plain SFT, Trainer, Liger-Kernel fused linear cross-entropy | not run: Liger-Kernel "
                 "runs on CUDA only |", "- warm-up: 5 rows called twice", "## Targets"):
        assert line in table, line
    for mode in ("full", "plain", "hf"):
        assert f"| {mode} | " in table
    assert "[training step] full tokens/s >= 0.99x plain" in table
    assert "[training step] full tokens/s >= 1.2x hf" in table
    assert "(informational: not the target shape)" in table


def test_a_step_cut_by_the_budget_keeps_its_rows_and_the_summary_names_the_cut(tmp_path):
    """op_main with endless repetitions and more limit than the budget leaves: the budget cuts it (SIGINT), it
    writes the repetitions done; and with its process killed before the end (no JSON, no end line) the summary
    rebuilds the same rows from the stream, without torch."""
    out = tmp_path / "out"
    done = _run("--smoke", str(out), "--only", "op_main", "--limit", "op_main=300", "--step-args",
                "op_main=--reps 100000", GPU_RUN_BUDGET_S="50")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    step = json.loads((out / "steps.jsonl").read_text().splitlines()[-1])
    assert step["step"] == "op_main" and step["status"] == "cut"
    assert step["note"].startswith("stopped at the run's budget (")
    assert "lines, then stopped (SIGINT) after" in step["note"]

    op = _stream(out, "op_cpu_*_main.jsonl")
    reps = [line for line in op if line["event"] == "rep"]
    assert len(reps) >= 1 and op[-1]["event"] == "end" and op[-1]["cut"].startswith(
        f"stopped (SIGINT) after {len(reps)} of 100000 timed repetitions")
    final = json.loads(next(out.glob("op_cpu_*_main.json")).read_text())
    assert all(len(st["times_s"]) == len(reps) for st in final["rows"])
    table = (out / "summary.md").read_text()
    assert "| op_main | cut |" in table and f"- CUT: stopped (SIGINT) after {len(reps)} of 100000" in table

    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(out / "steps.jsonl", killed)
    stream = next(out.glob("op_cpu_*_main.jsonl"))
    (killed / stream.name).write_text("".join(line + "\n" for line in stream.read_text().splitlines()[:-1]))
    no_torch = tmp_path / "no_torch"
    no_torch.mkdir()
    (no_torch / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    rebuilt = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_run.py"), "summary", str(killed),
                              "--smoke"], capture_output=True, text=True, timeout=60, cwd=REPO,
                             env=dict(os.environ, PYTHONPATH=str(no_torch)))
    assert rebuilt.returncode == 1, rebuilt.stderr[-3000:]
    assert f"- CUT: no end line (killed): figures over the {len(reps)} repetitions that completed" in rebuilt.stdout
    for line in table.splitlines():
        if line.startswith("| scft full (LM+RTO+cls) torch"):
            assert line in rebuilt.stdout  # the same figures, computed from the stream


def test_the_op_options_step_cut_by_its_limit_keeps_its_rows_and_the_run_goes_on(tmp_path):
    """bench_op_options.py stopped by its limit (SIGINT) writes the repetitions taken, its end line names the cut,
    and the run reads that stream and goes on to the steps after it."""
    out = tmp_path / "out"
    done = _run("--smoke", str(out), "--only", "op_options,versions_end", "--limit", "op_options=8",
                "--step-args", "op_options=--reps 100000")
    steps = {json.loads(line)["step"]: json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()}
    assert steps["op_options"]["status"] == "cut", done.stdout[-3000:] + done.stderr[-3000:]
    assert "lines, then stopped (SIGINT): the rows' repetitions taken so far" in steps["op_options"]["note"]
    assert steps["versions_end"]["status"] == "ok" and (out / "summary.md").exists()
    stream = _stream(out, "op_options_*.jsonl")
    assert any(line["event"] == "sample" for line in stream) and stream[-1]["event"] == "end"
    assert "**stopped (SIGINT): the rows' repetitions taken so far**" in next(out.glob("op_options_*.md")).read_text()


def test_a_failed_install_stops_the_run_at_once_with_the_reason(tmp_path):
    broken = tmp_path / "broken" / "scft_fast"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('a broken install, on purpose')\n")
    out = tmp_path / "out"
    done = _run("--smoke", str(out), timeout=120, PYTHONPATH=str(broken.parent))
    assert done.returncode == 1
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [(s["step"], s["status"]) for s in steps] == [("install", "skipped"), ("verify", "FAILED")]
    assert steps[1]["note"] == "install not usable: ImportError: a broken install, on purpose"
    table = (out / "summary.md").read_text()
    assert done.stdout.endswith(table) and "| verify | FAILED |" in table


def test_a_failed_pip_install_falls_back_to_a_copied_package(tmp_path, monkeypatch):
    """The GPU install with an interpreter whose pip and imports fail: the package is copied with kernels/ as
    scft_fast.kernels (the check after it decides), and the note says why."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'no index here' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gpu_run.tempfile, "mkdtemp", lambda prefix: str(tmp_path / prefix))
    env = {"PATH": os.environ["PATH"]}
    ok, note = gpu_run.install(str(fake), env, deadline=time.monotonic() + 30)
    copy = tmp_path / "gpu_run_package_"
    assert ok and note.endswith(f"pip install -e . failed (no index here): scft_fast copied to {copy} with kernels/ "
                                "as scft_fast.kernels")
    assert "no .whl/" in note or "wheels" in note
    assert env["PYTHONPATH"] == str(copy)
    assert (copy / "scft_fast" / "kernels" / "cls_head.py").read_text() == (REPO / "kernels" / "cls_head.py").read_text()


def test_without_an_output_directory_or_without_cuda_it_stops_at_once(tmp_path):
    usage = _run(timeout=60)
    assert usage.returncode == 2 and "usage: bash benchmarks/gpu_run.sh [--smoke] OUT_DIR" in usage.stderr
    if torch.cuda.is_available():
        return
    no_gpu = _run(str(tmp_path / "out"), timeout=120)
    assert no_gpu.returncode == 1 and "CUDA is not available" in no_gpu.stderr


def test_the_op_benchmark_skips_what_an_older_torch_lacks(monkeypatch):
    """torch 2.11 (the GPU image) has no F.linear_cross_entropy: its rows become a line saying so."""
    import torch.nn.functional as F

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from op_rows import Problem, build_rows, make_inputs

    p = Problem(rows=12, hidden=8, vocab=64, dtype=torch.float32, device=torch.device("cpu"), prompt_frac=1 / 3,
                transition_frac=0.25, seq_len=6, classes=2, seed=0)
    monkeypatch.delattr(F, "linear_cross_entropy")
    rows, skipped = build_rows(p, make_inputs(p), ["torch"], [])
    assert not [r for r in rows if r.family == "lce"]
    assert f"F.linear_cross_entropy: not in torch {torch.__version__}" in skipped
