"""What every benchmark script shares: timing, memory, the environment record, result writers, argparse pieces.

Timing. ``time_call`` times one call (CUDA events on CUDA, perf_counter on CPU); ``rotations`` gives the
interleaved order (each repetition runs every item once, the order rotated by one each time: ABCD BCDA CDAB) so
that a load spike on a shared machine hits every row alike; ``spread`` is the median / quartiles / IQR summary,
``noise_mark`` the '~' of a row whose IQR exceeds a share of its median.

Memory. CPU: ``reset_peak_rss`` (the VmHWM high-water mark, through /proc/self/clear_refs) and
``proc_status_kib``; ``peak_rss_mib`` (ru_maxrss, the process's peak since it started). CUDA:
``torch.cuda.max_memory_allocated`` (``peak_memory_mib``).

Environment. ``git_commit``, ``source_digest``, ``cpu_name`` / ``device_name``, ``load_average``,
``library_versions``, ``command_line``: what a result file records beside its figures.

Streams. ``ResultStream`` appends one JSON line per measured figure and flushes it at once, so a run stopped by a
time limit leaves everything it measured; ``read_stream`` reads such a file back, a cut last line dropped;
``StopRequest`` turns SIGINT into a request that a measuring loop honours between figures.

Runs in fresh processes. ``save_random_llama`` writes one random-initialized Llama + the embedded tokenizer that
every run loads; ``run_worker`` runs ``script --worker MODE MODEL_DIR RESULT_JSON`` and returns its JSON.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LIBRARIES = ("triton", "transformers", "liger-kernel", "cut-cross-entropy")
T = TypeVar("T")


# ----------------------------------------------------------------------------- timing

def time_call(fn: Callable[[], object], device) -> float:
    """Seconds of one call of fn: CUDA events around it on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rotations(items: Sequence[T], repetitions: int) -> list[list[T]]:
    """One order per repetition, rotated by one each time (ABCD BCDA CDAB ...)."""
    n = max(1, len(items))
    return [list(items[r % n:]) + list(items[:r % n]) for r in range(repetitions)]


def quartiles(times: Sequence[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, q2, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, q2, q3


def spread(times: Sequence[float]) -> dict:
    """median_s, q1_s, q3_s, min_s, max_s and spread (IQR / median) of a row's times."""
    q1, med, q3 = quartiles(times)
    return dict(median_s=med, q1_s=q1, q3_s=q3, min_s=min(times), max_s=max(times), spread=(q3 - q1) / med)


def noise_mark(iqr_over_median: float, threshold: float) -> str:
    return " ~" if iqr_over_median > threshold else ""


# ----------------------------------------------------------------------------- memory

def proc_status_kib(field_name: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def rss_mib() -> float | None:
    """This process's resident set now, or None where /proc is not there."""
    try:
        return proc_status_kib("VmRSS") / 1024
    except (OSError, RuntimeError):
        return None


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_mib(device_type: str) -> float:
    """CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS (ru_maxrss)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


# ----------------------------------------------------------------------------- environment

def git_commit() -> str:
    """The short commit of the tree, '+dirty' when tracked files differ from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_digest() -> str:
    """Hash of the op's sources in the working tree (scft_fast/, kernels/, csrc/): taken at the start and the end
    of a run, it tells whether the code measured changed underneath it (a shared tree moves)."""
    digest = hashlib.sha256()
    for folder in ("scft_fast", "kernels", "csrc"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".cpp", ".h", ".cu"):
                digest.update(str(path.relative_to(REPO)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def device_name(device) -> str:
    """The GPU's name, or the CPU's with its logical CPUs and torch's threads."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def load_average_text() -> str:
    """The 1, 5 and 15 min load averages as "0.12 0.34 0.56" ("n/a" where there are none)."""
    load = load_average()
    return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)


def library_versions() -> dict[str, str | None]:
    """Versions of what the rows run on (None: not importable here)."""
    import torch

    found = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def command_line(script: str, argv: Sequence[str]) -> str:
    """How the run was started, relative to the repository: "python benchmarks/bench_x.py ARGS"."""
    return "python " + shlex.join([os.path.relpath(os.path.abspath(script), REPO), *argv])


def run_record(script: str, argv: Sequence[str], device, started: datetime.datetime) -> dict:
    """What every result file says about its run: when, the command, the commit, the device and the versions."""
    return {"date_utc": started.strftime("%Y-%m-%d %H:%M:%S UTC"), "command": command_line(script, argv),
            "commit": git_commit(), "device": device_name(device), "device_type": device.type,
            "python": platform.python_version(), "versions": library_versions()}


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# ----------------------------------------------------------------------------- writers

def result_stem(prefix: str, device: str, started: datetime.datetime, tag: str = "") -> str:
    """<prefix>_<device>_<UTC date>[_<tag>], the name of a result's .json and .md."""
    return f"{prefix}_{device}_{started.strftime('%Y%m%dT%H%MZ')}{('_' + tag) if tag else ''}"


def write_results(out_dir: str | Path, stem: str, payload: dict, markdown: str, indent: int = 1) -> Path:
    """Writes out_dir/stem.json (payload) and out_dir/stem.md (markdown); returns out_dir/stem."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=indent) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    return out / stem


# ----------------------------------------------------------------------------- streams

class ResultStream:
    """OUT.jsonl, one ``{"event": ..., ...}`` line per figure, written and flushed as it is measured: a run stopped by
    its time limit (SIGINT, then SIGKILL: benchmarks/gpu_run.py) still leaves every figure it measured."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")

    def write(self, event: str, **fields) -> None:
        self._file.write(json.dumps({"event": event, **fields}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class StopRequest:
    """SIGINT (benchmarks/gpu_run.py sends it at a step's time limit; Ctrl-C) as a request to stop at the next
    point where the figures are whole: a measuring loop checks ``requested`` between repetitions."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True


def read_stream(path: str | Path) -> list[dict]:
    """The lines of a ResultStream file; a last line cut mid-write (the process killed) is dropped."""
    lines = []
    for text in Path(path).read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            break
    return lines


# ----------------------------------------------------------------------------- argparse pieces

def add_device_argument(ap: argparse.ArgumentParser, picks: str) -> None:
    import torch

    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help=f"cpu or cuda; picks {picks}; default cuda when available, else cpu")


def check_device(ap: argparse.ArgumentParser, device: str) -> str:
    """'cpu' or 'cuda' for --device; a usage error when CUDA is asked for and not there."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
    return "cuda" if device.startswith("cuda") else "cpu"


def add_note_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--note", default="", help="free text recorded with the results (e.g. machine load)")


def add_run_arguments(ap: argparse.ArgumentParser, result_name: str, seed_help: str) -> None:
    """The flags of the scripts that train in fresh processes (bench_train.py, bench_sft.py)."""
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")
    ap.add_argument("--out", default=str(RESULTS), help=f"directory for {result_name}_<device>_<date>.json/.md "
                                                        "(default benchmarks/results)")
    ap.add_argument("--no-save", action="store_true", help="print only, write no result files")
    add_note_argument(ap)
    ap.add_argument("--worker", nargs=3, metavar=("MODE", "MODEL_DIR", "RESULT_JSON"), help=argparse.SUPPRESS)


def add_model_shape_arguments(ap: argparse.ArgumentParser, defaults: dict[str, dict], vocab_help: str) -> None:
    """--hidden, --intermediate, --layers, --heads, --kv-heads, --vocab; help names each preset's default."""
    def per_preset(key: str) -> str:
        return ", ".join(f"{name} {d[key]}" for name, d in defaults.items())

    ap.add_argument("--hidden", type=int, help=f"hidden size ({per_preset('hidden')})")
    ap.add_argument("--intermediate", type=int, help=f"MLP width ({per_preset('intermediate')})")
    ap.add_argument("--layers", type=int, help=f"decoder layers ({per_preset('layers')})")
    ap.add_argument("--heads", type=int, help=f"attention heads ({per_preset('heads')})")
    ap.add_argument("--kv-heads", type=int, help=f"key/value heads ({per_preset('kv_heads')})")
    ap.add_argument("--vocab", type=int, help=f"{vocab_help} ({per_preset('vocab')})")


# ----------------------------------------------------------------------------- runs in fresh processes

def save_random_llama(shape, directory: str) -> dict:
    """Saves the random-initialized Llama of ``shape`` (hidden, intermediate, layers, heads, kv_heads, vocab,
    seed) + the embedded tokenizer, so every run loads the same weights."""
    from scft_fast.data import load_default_tokenizer
    from scft_fast.hf.presets import random_causal_lm

    tokenizer = load_default_tokenizer()
    if shape.vocab < len(tokenizer):
        raise ValueError(f"--vocab {shape.vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    model = random_causal_lm(
        "llama", tokenizer, seed=shape.seed, vocab_size=shape.vocab, hidden_size=shape.hidden,
        intermediate_size=shape.intermediate, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
        attn_implementation="sdpa")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "lm_head_params": shape.vocab * shape.hidden, "tokenizer_vocab": len(tokenizer)}


def run_worker(script: str, mode: str, model_dir: str, argv: list[str]) -> dict:
    """One mode in a fresh process (its own peak RSS): ``script ARGV --worker MODE MODEL_DIR RESULT_JSON``; the
    JSON it writes, with the run's wall time."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, os.path.abspath(script), *argv, "--worker", mode, model_dir, result_path]
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(result_path) as f:
        result = json.load(f)
    os.unlink(result_path)
    result["wall_s"] = time.perf_counter() - began
    return result
