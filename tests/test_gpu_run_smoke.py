"""benchmarks/gpu_run.sh in its CPU smoke mode: the GPU run's plumbing, checked before a GPU is lent.

One run (tiny shapes, a temporary output directory, about 20 s on 2 idle cores) writes every file the GPU run
writes; the test reads them back and checks the table printed last. What it cannot check here: real Triton,
CUDA-event timing, CUDA peak memory, and the Liger-Kernel / Cut Cross-Entropy rows (CUDA only: skipped with a
line saying so, which is checked).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_run.sh"


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_run") / "out"
    done = _run("--smoke", str(out))
    return out, done


def test_smoke_run_writes_every_result_and_prints_the_table_last(smoke):
    out, done = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == ["install", "versions", "tests", "ceilings", "op_main", "op_small",
                                     "versions_end"]
    assert all(s[1] == "0" for s in steps), steps

    versions = json.loads((out / "versions.json").read_text())
    assert versions["versions"]["torch"] == torch.__version__ and "end" in versions
    assert versions["torch_has"]["F.linear_cross_entropy"] == hasattr(F, "linear_cross_entropy")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["tests"]["tests"] > 0 and summary["tests"]["failed"] == [] and summary["failed_steps"] == []

    ceilings = json.loads(next(out.glob("ceilings_cpu_*.json")).read_text())
    names = [r["row"] for r in ceilings["rows"]]
    for c in (64, 128):
        for row in ("gemm logits", "gemm grad_h", "gemm dW beta=0", "gemm dW beta=1", "chunk: 3 GEMMs"):
            assert f"{row} c={c}" in names
        assert f"epilogue [torch] c={c}" in names
    assert names[0] == "copy" and all(r["rate"] > 0 for r in ceilings["rows"])

    for tag, rows in (("main", 96), ("small", 48)):
        op = json.loads(next(out.glob(f"op_cpu_*_{tag}.json")).read_text())
        assert op["meta"]["shape"]["N"] == rows
        keys = {st["key"]: st for st in op["rows"]}
        assert {"gemm", "naive", "scft_lm:torch:auto", "scft_full:torch:32", "scft_lm:torch:64"} <= set(keys)
        assert all(st["error"] is None and len(st["times_s"]) == 2 for st in op["rows"])
        assert all("paired_ratio" in st for st in op["rows"] if st["family"] == "scft_full")
        assert op["meta"]["fp32_accumulation_paths"] == {"cpu float32": "addmm_ (float32 inputs)"}
        assert any("CUDA only" in line for line in op["meta"]["skipped"])
        assert op["targets"] and not op["meta"]["at_target_shape"]
        peaks = [st["peak_bytes"] for st in op["rows"] if st["family"] != "gemm"]
        assert all(p is not None for p in peaks) if tag == "main" else all(p is None for p in peaks)

    table = (out / "summary.md").read_text()
    assert done.stdout.endswith(table)
    for line in ("# gpu_run summary (CPU smoke mode", "| step | exit | s | note |", "| ceiling | rate | unit |",
                 "op, N=96 (N_loss=64), H=32, V=512, float32:", "op, N=48 (N_loss=32)",
                 "- float32 accumulation path that ran: cpu float32: addmm_ (float32 inputs)",
                 "- not run: Liger-Kernel, Cut Cross-Entropy: CUDA only", "## Targets (GPU: LM-only vs the three GEMMs"):
        assert line in table, line
    assert "(informational: not the target shape)" in table


def test_without_an_output_directory_or_without_cuda_it_stops_at_once(tmp_path):
    usage = _run(timeout=60)
    assert usage.returncode == 2 and "usage: bash benchmarks/gpu_run.sh [--smoke] OUT_DIR" in usage.stderr
    if torch.cuda.is_available():
        return
    no_gpu = _run(str(tmp_path / "out"), timeout=120)
    assert no_gpu.returncode == 1 and "CUDA is not available" in no_gpu.stderr


def test_the_op_benchmark_skips_what_an_older_torch_lacks(monkeypatch):
    """torch 2.11 (the GPU image) has no F.linear_cross_entropy: its rows become a line saying so."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from op_rows import Problem, build_rows, make_inputs

    p = Problem(rows=12, hidden=8, vocab=64, dtype=torch.float32, device=torch.device("cpu"), prompt_frac=1 / 3,
                transition_frac=0.25, seq_len=6, classes=2, seed=0)
    monkeypatch.delattr(F, "linear_cross_entropy")
    rows, skipped = build_rows(p, make_inputs(p), ["torch"], [])
    assert not [r for r in rows if r.family == "lce"]
    assert f"F.linear_cross_entropy: not in torch {torch.__version__}" in skipped


def test_a_spent_budget_skips_every_step_and_still_prints_the_table(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, GPU_RUN_BUDGET_S="0")
    done = subprocess.run(["bash", str(SCRIPT), "--smoke", str(out)], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO)
    assert done.returncode == 1
    table = (out / "summary.md").read_text()
    assert done.stdout.endswith(table)
    assert "| tests | 125 | 0 | skipped: the run's 0 s budget is spent |" in table
    for line in ("- tests: no tests.xml", "- ceilings: no ceilings_*.json", "- op benchmark main: no op_*_main.json",
                 "- none evaluated (the N=8192 op run is missing)"):
        assert line in table, line
