"""The training benchmarks end to end at their smoke shapes: a run writes its JSON and Markdown result files with
a row per mode measured (the full runs take minutes; these take seconds, and catch what only the writing step
reaches)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]


# bench_sft's --quick writes nothing, so it gets the quick shape by hand.
SFT_SMALL = ["--hidden", "64", "--intermediate", "172", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab",
             "4096", "--seq-len", "128", "--batch-size", "2"]


@pytest.mark.parametrize("script, shape, modes, prefix", [("bench_train.py", ["--quick"], ("fused-lm", "full"), "train"),
                                                          ("bench_sft.py", SFT_SMALL, ("hf", "scft"), "sft")])
def test_a_smoke_run_writes_its_results(tmp_path, script, shape, modes, prefix):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *shape, "--modes", ",".join(modes),
                           "--steps", "3", "--warmup", "1", "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob(f"{prefix}_cpu_*.json")
    data = json.loads(result.read_text())
    assert set(data["table"]) == set(modes)
    markdown = result.with_suffix(".md").read_text()
    assert all(f"| {mode} " in markdown for mode in modes) and data["command"]


def test_every_pytest_benchmark_twin_imports():
    """`pytest benchmarks/ --benchmark-only` collects every twin: a name a twin imports from a script or the
    harness still exists (collection imports each module; nothing is run)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly",
                           str(REPO / "benchmarks")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for twin in sorted((REPO / "benchmarks").glob("test_*.py")):
        assert f"benchmarks/{twin.name}: " in proc.stdout, twin.name
