"""The GPU run: one command on a lent GPU that returns every figure it can within its time budget.

    bash benchmarks/gpu_run.sh OUT_DIR            # on a CUDA machine (make gpu-check OUT=DIR)
    bash benchmarks/gpu_run.sh --smoke OUT_DIR    # on CPU, tiny shapes, under a minute: every code path
    python benchmarks/gpu_run.py summary OUT_DIR  # the table again, from whatever OUT_DIR holds

In order: the install (the wheels in .whl/ and the project, only where not importable), verified before anything
is measured (``import scft_fast.kernels`` and one Triton epilogue row against its torch twin: a failure stops the
run at once with the reason), which also records the versions and the device (versions.json); then ``STEPS``,
highest priority first; then the summary (summary.md, printed last, and summary.json). Every file goes under
OUT_DIR: steps.jsonl (one line per step: exit status, seconds, its limit, whether it was cut), each step's log, and
each benchmark's results, streamed (``*.jsonl``, one line per figure as it is measured) beside its .json and .md.

Time. The whole run stays within GPU_RUN_BUDGET_S (default ``BUDGET_S``): the steps' limits add up inside it
(tests/test_gpu_run_smoke.py checks the table), and a step never outlives its limit or what is left of the budget.
At the limit less ``GRACE_S`` the step's process group gets SIGINT (the benchmarks stop and write what they
measured; pytest writes its report), at the limit SIGKILL. A cut step's figures are still read from its stream: the
summary names the step, the limit that cut it and its last line.

Smoke mode (--smoke): the same steps on CPU at tiny shapes (Triton through its interpreter), with the packages the
GPU image lacks hidden (``ABSENT_ON_GPU_IMAGE``), so that everything but the device is exercised before a GPU is lent.

Adding a step is one line in ``STEPS``: name, time limit, what it measures, its command on a GPU and in smoke
mode (after the interpreter; ``{out}`` is OUT_DIR). Take its seconds from another step's limit: the table must fit
the budget.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 400  # the GPU call is lent ~420 s of wall time; the rest is the summary's and the machine's
SUMMARY_RESERVE_S = 10  # kept for the summary at the end
GRACE_S = 5  # between SIGINT and SIGKILL at a step's limit
MIN_STEP_S = 5  # a step with less time left than this is skipped
INSTALL_LIMIT_S = 35
VERIFY_LIMIT_S = 30
# Hidden in smoke mode, as the GPU image has none of them (shared/device/README.md): a step that needs one fails in
# the smoke run as it would there.
ABSENT_ON_GPU_IMAGE = ("datasets", "deepspeed", "pyarrow", "trl", "liger_kernel", "cut_cross_entropy")

# The op benchmark at the GPU's target shape, and the rows that carry its targets.
OP_GPU = ("benchmarks/bench_op.py", "--device", "cuda", "--dtype", "bfloat16", "--hidden", "4096", "--vocab",
          "128256", "--backends", "triton", "--reps", "30", "--warmup", "3", "--no-progress", "--out-dir", "{out}")
OP_SMOKE = ("benchmarks/bench_op.py", "--device", "cpu", "--quick", "--dtype", "float32", "--hidden", "32", "--vocab",
            "512", "--backends", "torch", "--reps", "2", "--warmup", "0", "--threads", "1", "--no-progress",
            "--out-dir", "{out}")
TARGET_ROWS = "gemm,naive,scft_lm:triton:auto,scft_full:triton:auto,liger,liger:fp32,cce:cce,cce:exact"
TARGET_ROWS_SMOKE = "gemm,naive,scft_lm:torch:auto,scft_full:torch:auto"
CUDA_TESTS = ("tests/test_kernels_safety_epilogue.py", "tests/test_kernels_cls_head.py",
              "tests/test_safety_loss.py", "tests/test_safety_loss_edge_cases.py", "tests/test_safety_loss_passes.py",
              "tests/test_safety_loss_accumulation.py", "tests/test_safety_loss_compile.py",
              "tests/test_kernels_compile.py")
# -P: the repository root off sys.path, or its kernels/ folder would pose as the `kernels` library transformers
# looks for; -p gpu_run: this file's pytest hooks stream one line per test (tests.jsonl).
PYTEST = ("-P", "-m", "pytest", "-p", "gpu_run", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-rfEs",
          "--timeout=120", *CUDA_TESTS)


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int
    what: str
    gpu: tuple[str, ...]  # the command after the interpreter, on a GPU; "{out}" is the output directory
    smoke: tuple[str, ...] | None  # the same in --smoke mode; None: not run there (another step has its code path)
    stream: str = ""  # glob of the stream it writes under OUT_DIR: where a cut step stopped


# Priority order: the rows that carry the targets first (the op at N=8192, the training step), then the rest.
STEPS = (
    Step("warmup", 70, "first call of every op row the run times, at N=8192: Triton JIT, autotuning, torch.compile",
         ("benchmarks/gpu_run.py", "warmup", "{out}", "--device", "cuda", "--only",
          f"{TARGET_ROWS},cce:torch_compile,scft_"),
         ("benchmarks/gpu_run.py", "warmup", "{out}", "--device", "cpu", "--only", TARGET_ROWS_SMOKE),
         "warmup.jsonl"),
    Step("op_main", 50, "bench_op.py N=8192: the three GEMMs, scft LM-only and full, Liger, CCE (the targets)",
         (*OP_GPU, "--rows", "8192", "--only", TARGET_ROWS, "--tag", "main"),
         (*OP_SMOKE, "--rows", "96", "--only", TARGET_ROWS_SMOKE, "--tag", "main", "--no-memory"),
         "op_*_main.jsonl"),
    Step("train_step", 70, "training steps: full SCFT + DeRTa vs plain fused SFT vs the model's own loss vs Liger",
         ("benchmarks/bench_train_step.py", "--device", "cuda", "--out-dir", "{out}"),
         ("benchmarks/bench_train_step.py", "--device", "cpu", "--smoke", "--threads", "1", "--out-dir", "{out}"),
         "train_step_*.jsonl"),
    Step("op_compiled", 25, "bench_op.py N=8192: CCE torch_compile against scft LM-only",
         (*OP_GPU, "--rows", "8192", "--only", "gemm,scft_lm:triton:auto,cce:torch_compile", "--tag", "compiled"),
         None, "op_*_compiled.jsonl"),
    Step("ceilings", 20, "copy GB/s, the op's GEMMs at its chunk shapes, the epilogue's GB/s",
         ("benchmarks/bench_ceilings.py", "--device", "cuda", "--out-dir", "{out}"),
         ("benchmarks/bench_ceilings.py", "--device", "cpu", "--quick", "--backend", "torch", "--reps", "3",
          "--warmup", "1", "--out-dir", "{out}"), "ceilings_*.jsonl"),
    Step("op_options", 25, "bench_op_options.py: what z_loss, token stats, label smoothing, return_lse and "
         "reduction='none' cost over the default call, and reduction='none' beside CCE's and Liger's",
         ("benchmarks/bench_op_options.py", "--device", "cuda", "--out-dir", "{out}"),
         ("benchmarks/bench_op_options.py", "--device", "cpu", "--smoke", "--out-dir", "{out}"),
         "op_options_*.jsonl"),
    Step("tests", 45, "the CUDA tests: kernels, the op, the ahead-of-time compile check",
         PYTEST, (*PYTEST, "-k", "accumulat or touches_the_weight_gradient"), "tests.jsonl"),
    Step("op_more", 15, "bench_op.py N=8192: scft LM-only and full at chunk auto / 2048 / 4096",
         (*OP_GPU, "--rows", "8192", "--only", "gemm,scft_", "--chunk-sizes", "2048,4096", "--tag", "more",
          "--no-memory"), None, "op_*_more.jsonl"),
    Step("versions_end", 5, "clocks at the end", ("benchmarks/gpu_run.py", "versions", "{out}", "--end"),
         ("benchmarks/gpu_run.py", "versions", "{out}", "--end")),
)
# Where each op run's figures are, in the summary's order.
OP_TAGS = ("main", "compiled", "more")


def planned_seconds(steps=STEPS) -> int:
    """What the run takes at most: the install, its check, every step at its limit and the summary."""
    return INSTALL_LIMIT_S + VERIFY_LIMIT_S + sum(s.limit_s for s in steps) + SUMMARY_RESERVE_S


# ----------------------------------------------------------------------------- running steps

def run_limited(command: list[str], log: Path, limit_s: float, env: dict) -> tuple[int, float, bool]:
    """command in its own process group, output to log; SIGINT at limit_s - GRACE_S, SIGKILL at limit_s.
    Returns (exit status, seconds, cut)."""
    began = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
        cut = False
        try:
            proc.wait(timeout=max(limit_s - GRACE_S, 1))
        except subprocess.TimeoutExpired:
            cut = True
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        except BaseException:  # the run itself stopped (SIGTERM from outside): take the step down with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return proc.returncode, time.monotonic() - began, cut


class StepLog:
    """OUT_DIR/steps.jsonl, one line per step as it ends."""

    def __init__(self, out: Path):
        self.path = out / "steps.jsonl"
        self.path.write_text("")

    def add(self, name: str, rc: int | None, seconds: float, limit_s: float | None, status: str, note: str) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": name, "rc": rc, "seconds": round(seconds, 1), "limit_s": limit_s,
                                "status": status, "note": note}) + "\n")
        exit_status = "" if rc is None else f"exit {rc}, "
        print(f"gpu_run: {name}: {status} ({exit_status}{seconds:.0f} s){': ' + note if note else ''}", flush=True)


def hide_absent_packages() -> str:
    """A folder whose sitecustomize.py marks ABSENT_ON_GPU_IMAGE as not installed (None in sys.modules:
    importlib.util.find_spec answers None and an import raises ImportError, as where they are missing)."""
    folder = tempfile.mkdtemp(prefix="gpu_run_image_")
    Path(folder, "sitecustomize.py").write_text(
        "# gpu_run.py --smoke: the GPU image has none of these\n"
        f"import sys\nsys.modules.update(dict.fromkeys({ABSENT_ON_GPU_IMAGE!r}))\n")
    return folder


def install(py: str, env: dict, deadline: float) -> tuple[bool, str]:
    """The wheels of .whl/ (Liger-Kernel, CCE) into a temporary target and the project, each only where not
    importable already; env's PYTHONPATH gains them. Returns (ok, what was done)."""
    done = []

    def left() -> float:
        return max(deadline - time.monotonic(), 1)

    def python(*args, timeout=None) -> subprocess.CompletedProcess:
        return subprocess.run([py, *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout or left())

    if python("-P", "-c", "import liger_kernel, cut_cross_entropy").returncode == 0:
        done.append("Liger-Kernel and CCE import already")
    elif list(REPO.glob(".whl/*.whl")):
        site = tempfile.mkdtemp(prefix="gpu_run_site_")
        wheels = [str(p) for p in sorted(REPO.glob(".whl/*.whl"))]
        proc = python("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", site,
                      *wheels)
        if proc.returncode == 0:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (site, env.get("PYTHONPATH"))))
            done.append(f"{len(wheels)} wheels from .whl/ installed into {site}")
        else:
            done.append(f"the wheels in .whl/ did not install (their rows will say so): {proc.stderr.strip()[-300:]}")
    else:
        done.append("no .whl/ (shared/device/prepare-wheels.sh fills it): the Liger and CCE rows will say not run")
    if python("-P", "-c", "import scft_fast.kernels").returncode == 0:
        done.append("scft_fast imports already")
        return True, "; ".join(done)
    proc = python("-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", ".")
    if proc.returncode == 0:
        done.append("scft_fast installed (pip install --no-deps --no-build-isolation -e .)")
        return True, "; ".join(done)
    # The layout setup.py declares (kernels/ installed as scft_fast.kernels), without pip: the check that follows
    # says whether it is usable.
    package = Path(tempfile.mkdtemp(prefix="gpu_run_package_"))
    shutil.copytree(REPO / "scft_fast", package / "scft_fast")
    shutil.copytree(REPO / "kernels", package / "scft_fast" / "kernels")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(package), env.get("PYTHONPATH"))))
    done.append(f"pip install -e . failed ({proc.stderr.strip()[-300:]}): scft_fast copied to {package} with "
                "kernels/ as scft_fast.kernels")
    return True, "; ".join(done)


def _stopped_from_outside(signum, frame):
    """SIGTERM (a wall-clock limit around the whole run): stop the running step, then write the summary."""
    raise KeyboardInterrupt


def run(out: Path, smoke: bool, only: list[str], limits: dict[str, int], extra: dict[str, list[str]],
        py: str) -> int:
    began = time.monotonic()
    budget = float(os.environ.get("GPU_RUN_BUDGET_S", BUDGET_S))
    steps = [s for s in STEPS if not only or s.name in only]
    steps = [Step(s.name, limits.get(s.name, s.limit_s), s.what, s.gpu, s.smoke, s.stream) for s in steps]
    log = StepLog(out)
    env = dict(os.environ, PYTHONUNBUFFERED="1", GPU_RUN_TESTS_STREAM=str(out / "tests.jsonl"),
               SCFT_KERNEL_RESOURCES_OUT=str(out / "kernel_resources.json"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO / "benchmarks"), env.get("PYTHONPATH"))))
    if smoke:
        env["TRITON_INTERPRET"] = "1"
        env["PYTHONPATH"] = os.pathsep.join((hide_absent_packages(), env["PYTHONPATH"]))
    else:
        env.pop("TRITON_INTERPRET", None)
    print(f"gpu_run: budget {budget:.0f} s; the planned limits add up to {planned_seconds(steps)} s", flush=True)
    signal.signal(signal.SIGTERM, _stopped_from_outside)

    def left() -> float:
        return budget - SUMMARY_RESERVE_S - (time.monotonic() - began)

    try:
        if smoke:
            log.add("install", 0, 0, None, "skipped", f"smoke mode: {py} as it is, {', '.join(ABSENT_ON_GPU_IMAGE)} "
                                                      "hidden")
        else:
            t0 = time.monotonic()
            try:
                ok, note = install(py, env, t0 + min(INSTALL_LIMIT_S, max(left(), 1)))
            except subprocess.TimeoutExpired as e:
                ok, note = False, f"stopped at its {INSTALL_LIMIT_S} s limit in: {' '.join(map(str, e.cmd))[-200:]}"
            log.add("install", 0 if ok else 1, time.monotonic() - t0, INSTALL_LIMIT_S, "ok" if ok else "FAILED", note)
            if not ok:
                return summary(out, smoke)
        rc, seconds, cut = run_limited([py, "-P", "benchmarks/gpu_run.py", "verify", str(out)] +
                                       (["--device", "cpu"] if smoke else []), out / "verify.log",
                                       min(VERIFY_LIMIT_S, max(left(), 1)), env)
        reason = (out / "verify.log").read_text().strip().splitlines()
        note = reason[-1] if reason else ""
        log.add("verify", rc, seconds, VERIFY_LIMIT_S, "ok" if rc == 0 else "cut" if cut else "FAILED", note)
        if rc != 0:
            return summary(out, smoke)
        for step in steps:
            remaining = left()
            if remaining < MIN_STEP_S:
                log.add(step.name, None, 0, step.limit_s, "skipped", f"the run's {budget:.0f} s budget is spent")
                continue
            command = step.smoke if smoke else step.gpu
            if command is None:
                log.add(step.name, None, 0, step.limit_s, "skipped", "GPU only: STEPS gives it no smoke command")
                continue
            limit = min(step.limit_s, remaining)
            command = [py, *(a.replace("{out}", str(out)) for a in command), *extra.get(step.name, [])]
            print(f"gpu_run: {step.name} (limit {limit:.0f} s): {step.what}", flush=True)
            rc, seconds, cut = run_limited(command, out / f"{step.name}.log", limit, env)
            if cut:
                by = f"its {step.limit_s} s limit" if limit == step.limit_s else \
                    f"the run's budget ({limit:.0f} s were left of {budget:.0f} s)"
                log.add(step.name, rc, seconds, step.limit_s, "cut", f"stopped at {by}; {where(out, step)}")
            else:
                log.add(step.name, rc, seconds, step.limit_s, "ok" if rc == 0 else "FAILED", step.what)
    except KeyboardInterrupt:
        log.add("run", None, time.monotonic() - began, budget, "cut", "the run was stopped from outside (SIGTERM or "
                                                                      "SIGINT)")
    return summary(out, smoke)


def where(out: Path, step: Step) -> str:
    """Where a cut step stopped, from its stream: what it wrote when it stopped, or its last line when it was killed
    before it could."""
    found = sorted(out.glob(step.stream)) if step.stream else []
    if not found:
        return "it wrote no stream" if step.stream else "its log says where"
    from harness import read_stream

    lines = read_stream(found[-1])
    if not lines:
        return f"{found[-1].name} is empty"
    if lines[-1].get("event") == "end" and lines[-1].get("cut"):
        return f"{found[-1].name}: {len(lines)} lines, then {lines[-1]['cut']}"
    last = json.dumps(lines[-1])
    return f"{found[-1].name}: {len(lines)} lines, no end (killed); the last: {last[:160]}" \
           f"{'...' if len(last) > 160 else ''}"


# ----------------------------------------------------------------------------- steps implemented here

def verify(out: Path, device: str) -> int:
    """versions.json, then: the install is usable, scft_fast.kernels imports and one row through the Triton
    epilogue equals the torch twin's. Prints one line last: what was checked, or why it failed."""
    try:
        versions(out, end=False)
        import torch

        from scft_fast import IGNORE_INDEX
        from scft_fast.kernels import safety_epilogue_triton
        from scft_fast.ops.safety_epilogue import safety_epilogue_torch

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        vocab = 128256 if device == "cuda" else 512
        gen = torch.Generator(device=device).manual_seed(0)
        logits = (2 * torch.randn(1, vocab, device=device, generator=gen)).to(dtype)
        target = torch.tensor([7], device=device)
        scale = torch.tensor(1.0, device=device)
        args = (target, torch.full_like(target, IGNORE_INDEX), scale, scale, None, IGNORE_INDEX)
        grad_triton, grad_torch = logits.clone(), logits.clone()
        began = time.perf_counter()
        sums_triton = safety_epilogue_triton(grad_triton, *args)
        sums_torch = safety_epilogue_torch(grad_torch, *args)
        seconds = time.perf_counter() - began
        torch.testing.assert_close(sums_triton, sums_torch, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_triton.float(), grad_torch.float(), rtol=1e-2 if device == "cuda" else 1e-5,
                                   atol=1e-6)
    except Exception as e:  # the reason is the result
        print(f"install not usable: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        return 1
    print(f"verified: scft_fast.kernels imports; one {dtype} row of V={vocab} through the Triton epilogue on {device} "
          f"equals the torch twin (first call, compile included: {seconds:.1f} s)")
    return 0


def warmup(out: Path, device: str, only: list[str]) -> int:
    """What the run's first calls would compile, timed, one line in warmup.jsonl as each completes: the "auto"
    backend (CUDA: Triton; CPU: the C++ extension, built on its first use), then the op rows ``only`` names (key
    prefixes, as bench_op.py --only) at N=8192 on CUDA (tiny on CPU), in bench_op.py's order with Liger and CCE
    last, each called twice (the first call compiles or autotunes and loads, the second is the steady time). Triton and
    inductor keep what they compiled in their on-disk caches: the measuring steps' processes only load it."""
    import torch

    from harness import ResultStream, time_call
    from op_rows import Problem, build_rows, clear_grads, make_inputs
    from scft_fast.ops.backends import resolve_backend

    shape = dict(rows=8192, hidden=4096, vocab=128256, dtype=torch.bfloat16) if device == "cuda" else \
        dict(rows=96, hidden=32, vocab=512, dtype=torch.float32)
    p = Problem(device=torch.device(device), prompt_frac=1 / 3, transition_frac=0.25, seq_len=256, classes=2, seed=0,
                **shape)
    x = make_inputs(p)
    rows, skipped = build_rows(p, x, ["triton"] if device == "cuda" else ["torch"], [2048, 4096] if device == "cuda"
                               else [32, 64])
    rows = [r for r in rows if any(r.key == k or r.key.startswith(k) for k in only)]
    order = sorted(rows, key=lambda r: r.family in ("liger", "cce"))  # CCE's torch.compile last: it is the longest
    stream = ResultStream(out / "warmup.jsonl")
    stream.write("start", shape={k: str(v) for k, v in shape.items()}, rows=[r.key for r in order], skipped=skipped)
    began = time.perf_counter()
    backend = resolve_backend("auto", p.device)
    stream.write("row", key=f"auto backend: {backend.epilogue.__name__}", first_s=time.perf_counter() - began,
                 second_s=0.0)
    def wall(fn) -> float:
        """Seconds of host and device time: a first call's compile is host time, which CUDA events would miss."""
        if p.device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if p.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    failed = 0
    for row in order:
        try:
            clear_grads(x)
            first = wall(row.step)
            clear_grads(x)
            second = time_call(row.step, p.device)
        except Exception as e:  # reported; the measuring step shows the same row failing
            failed += 1
            stream.write("row", key=row.key, error=f"{type(e).__name__}: {e}"[:500])
            print(f"{row.key}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        stream.write("row", key=row.key, first_s=first, second_s=second)
        print(f"{row.key:>32}: first call {first:8.3f} s, second {second * 1e3:9.2f} ms", flush=True)
    stream.write("end")
    return 1 if failed else 0


def _nvidia_smi() -> dict:
    fields = ("name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,"
              "power.limit,temperature.gpu")
    if shutil.which("nvidia-smi") is None:
        return {"available": False, "note": "nvidia-smi not found"}
    query = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                           text=True)
    report = subprocess.run(["nvidia-smi", "-q", "-d", "CLOCK,PERFORMANCE,POWER,TEMPERATURE"], capture_output=True,
                            text=True)
    values = [v.strip() for v in query.stdout.strip().splitlines()[0].split(",")] if query.returncode == 0 and \
        query.stdout.strip() else []
    return {"available": True, "fields": dict(zip(fields.split(","), values)), "query_error": query.stderr.strip()
            or None, "report": report.stdout}


def versions(out: Path, end: bool) -> int:
    """versions.json: python, torch, triton, transformers, Liger-Kernel, CCE, the device, nvidia-smi's clocks;
    --end adds the clocks at the end of the run."""
    path = out / "versions.json"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    if end:
        found = json.loads(path.read_text()) if path.exists() else {}
        found["end"] = {"date_utc": now, "nvidia_smi": _nvidia_smi()}
        path.write_text(json.dumps(found, indent=1) + "\n")
        smi = found["end"]["nvidia_smi"]
        print(f"clocks at the end: {smi.get('fields') or smi.get('note')}")
        return 0
    import torch
    import torch.nn.functional as F

    from harness import git_commit, library_versions

    found = {"date_utc": now, "commit": git_commit(), "python": platform.python_version(),
             "versions": library_versions(), "cuda_available": torch.cuda.is_available(),
             "torch_has": {"F.linear_cross_entropy": hasattr(F, "linear_cross_entropy"),
                           "torch.nn.LinearCrossEntropyOptions": hasattr(torch.nn, "LinearCrossEntropyOptions")},
             "nvidia_smi": _nvidia_smi()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                           "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30}
    path.write_text(json.dumps(found, indent=1) + "\n")
    for key in ("date_utc", "commit", "python", "versions", "torch_has", "device"):
        if key in found:
            print(f"{key}: {found[key]}")
    if found["nvidia_smi"].get("report"):
        print(found["nvidia_smi"]["report"])
    return 0


# ----------------------------------------------------------------------------- pytest hooks (-p gpu_run)

def pytest_runtest_logstart(nodeid, location):
    _test_line({"event": "start", "test": nodeid})


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _test_line({"event": "result", "test": report.nodeid, "when": report.when, "outcome": report.outcome,
                    "seconds": round(report.duration, 2),
                    "message": str(report.longrepr)[-600:] if report.outcome == "failed" else None})


def pytest_collectreport(report):
    if report.outcome == "failed":
        _test_line({"event": "result", "test": report.nodeid, "when": "collect", "outcome": "failed",
                    "seconds": 0.0, "message": str(report.longrepr)[-600:]})


def _test_line(line: dict) -> None:
    path = os.environ.get("GPU_RUN_TESTS_STREAM")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


# ----------------------------------------------------------------------------- summary

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _latest(out: Path, pattern: str) -> Path | None:
    found = sorted(out.glob(pattern))
    return found[-1] if found else None


def _tests(out: Path) -> list[str]:
    from harness import read_stream

    path = out / "tests.jsonl"
    if not path.exists():
        return ["- tests: not run (no tests.jsonl)"]
    lines = read_stream(path)
    results = [line for line in lines if line["event"] == "result"]
    counts = {k: sum(1 for r in results if r["outcome"] == k and (r["when"] == "call" or k != "passed"))
              for k in ("passed", "failed", "skipped")}
    finished = {r["test"] for r in results}
    running = [line["test"] for line in lines if line["event"] == "start" and line["test"] not in finished]
    text = [f"- tests: {counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed"
            + (f"; cut while running {running[-1]}" if running else "")]
    text += [f"  - FAILED {r['test']} ({r['when']}): {(r['message'] or '').splitlines()[-1][:200]}" for r in results
             if r["outcome"] == "failed"]
    return text


def _ceilings(out: Path) -> list[str]:
    from harness import read_stream

    stream = _latest(out, "ceilings_*.jsonl")
    if stream is None:
        return ["- ceilings: not run (no ceilings_*.jsonl)"]
    lines = read_stream(stream)
    rows = [line for line in lines if line["event"] == "row"]
    start = next((line for line in lines if line["event"] == "start"), {})
    text = ["", "| ceiling | rate | unit |", "|---|---:|---|"]
    for r in rows:
        extra = f" ({r['share_of_copy']:.0%} of copy)" if "share_of_copy" in r else ""
        text.append(f"| {r['row']} | {r['rate']:,.4g}{extra} | {r['unit']} |")
    text.append(f"- dW GEMMs through `{start.get('fp32_accumulation_path')}`")
    end = next((line for line in lines if line["event"] == "end"), None)
    if end is None or end.get("cut"):
        text.append(f"- CUT: {end['cut'] if end else 'no end line (killed)'}; {len(rows)} rows measured")
    return text


def _op(out: Path, tag: str) -> tuple[list[str], list[dict]]:
    """The op run's table from its stream (the JSON's figures when it finished, the same computation when cut)."""
    from harness import read_stream
    from op_report import stats_from_stream

    stream = _latest(out, f"op_*_{tag}.jsonl")
    if stream is None:
        return [f"- op benchmark {tag}: not run (no op_*_{tag}.jsonl)"], []
    found = stats_from_stream(read_stream(stream))
    start = found["start"]
    if start is None:
        return [f"- op benchmark {tag}: {stream.name} has no start line"], []
    shape = start["shape"]
    text = ["", f"op {tag}, N={shape['N']} (N_loss={shape['N_loss']}), H={shape['H']}, V={shape['V']}, "
                f"{start['dtype']}; {found['reps_done']} of {start['reps']} timed repetitions:", "",
            "| row | chunk | first call s | median ms | TFLOP/s | peak GiB | full/LM paired |",
            "|---|---|---:|---:|---:|---:|---:|"]
    first = {line["key"]: line.get("first_call_s") for line in read_stream(stream) if line["event"] == "row"}
    for st in found["stats"]:
        name = f"{st['label']} {st['backend']}".strip()
        first_s = "" if first.get(st["key"]) is None else f"{first[st['key']]:.2f}"
        if st.get("error"):
            text.append(f"| {name} | {st['chunk']} | {first_s} | FAILED: {st['error'][:80]} | | | |")
            continue
        if "median_s" not in st:
            text.append(f"| {name} | {st['chunk']} | {first_s} | - | | | |")
            continue
        peak = "-" if st.get("peak_bytes") is None else f"{st['peak_bytes'] / 2**30:.2f}"
        ratio = f"{st['paired_ratio']:.4f}" if "paired_ratio" in st else ""
        text.append(f"| {name} | {st['chunk']} | {first_s} | {st['median_s'] * 1e3:,.3f} | {st['tflops']:,.4g} | "
                    f"{peak} | {ratio} |")
    if start["skipped"]:
        text.append(f"- not run: {'; '.join(start['skipped'])}")
    text += [f"- {w}" for w in found["loss_warnings"]]
    end = found["end"]
    if end is None or end.get("cut"):
        text.append(f"- CUT: {end['cut'] if end else 'no end line (killed)'}: figures over the "
                    f"{found['reps_done']} repetitions that completed")
    scope = "" if start["at_target_shape"] else " (informational: not the target shape)"
    verdicts = [{**t, "run": tag, "line": f"- {'met' if t['pass'] else 'MISSED'}: [op {tag}] {t['target']}: "
                                         f"{t['text']}{scope}"} for t in found["targets"]]
    return text, verdicts


def _train_step(out: Path) -> tuple[list[str], list[dict]]:
    from harness import read_stream
    from train_step_report import render, summarize

    stream = _latest(out, "train_step_*.jsonl")
    if stream is None:
        return ["- training step: not run (no train_step_*.jsonl)"], []
    report = summarize(read_stream(stream))
    text = ["", "training step:", *render(report)]
    verdicts = [{**t, "run": "train_step", "line": f"- {'met' if t['pass'] else 'MISSED'}: [training step] "
                                                  f"{t['target']}: {t['text']}"} for t in report["targets"]]
    return text, verdicts


def _warmup(out: Path) -> list[str]:
    from harness import read_stream

    path = out / "warmup.jsonl"
    if not path.exists():
        return ["- warm-up: not run (no warmup.jsonl)"]
    rows = [line for line in read_stream(path) if line["event"] == "row"]
    done = [r for r in rows if "first_s" in r]
    text = [f"- warm-up: {len(done)} rows called twice, first calls (compile, autotune, load) "
            f"{sum(r['first_s'] for r in done):.1f} s in all: "
            + ", ".join(f"{r['key']} {r['first_s']:.1f} s" for r in done)]
    text += [f"  - FAILED {r['key']}: {r['error']}" for r in rows if "error" in r]
    return text


def summary(out: Path, smoke: bool) -> int:
    """summary.md (printed) and summary.json from what OUT_DIR holds; 1 when a step failed or was cut."""
    from harness import read_stream

    steps = read_stream(out / "steps.jsonl") if (out / "steps.jsonl").exists() else []
    version_info = _read_json(out / "versions.json") or {}
    lines = ["# gpu_run summary" + (" (CPU smoke mode: tiny shapes, figures mean nothing)" if smoke else ""), ""]
    v = version_info.get("versions", {})
    lines.append(f"- {version_info.get('device', {}).get('name', 'no CUDA device')}; torch {v.get('torch')}, triton "
                 f"{v.get('triton')}, transformers {v.get('transformers')}, liger-kernel {v.get('liger-kernel')}, "
                 f"cut-cross-entropy {v.get('cut-cross-entropy')}; commit {version_info.get('commit')}; "
                 f"{version_info.get('date_utc')}")
    clocks = version_info.get("nvidia_smi", {}).get("fields")
    if clocks:
        end = version_info.get("end", {}).get("nvidia_smi", {}).get("fields", {})
        lines.append(f"- SM clock {clocks.get('clocks.sm')} of max {clocks.get('clocks.max.sm')} at the start, "
                     f"{end.get('clocks.sm', '?')} at the end; power limit {clocks.get('power.limit')}")
    lines += ["", "| step | status | exit | s | limit s | note |", "|---|---|---:|---:|---:|---|"]
    for st in steps:
        rc = "" if st["rc"] is None else st["rc"]
        lines.append(f"| {st['step']} | {st['status']} | {rc} | {st['seconds']:.0f} | {st['limit_s'] or ''} | "
                     f"{st['note']} |")
    sections, verdicts = [], []
    for read in (_warmup, _tests, _ceilings):
        sections += read(out)
    for tag in OP_TAGS:
        text, found = _op(out, tag)
        sections += text
        verdicts += found
    text, found = _train_step(out)
    sections += text
    verdicts += found
    lines += ["", *sections, "", "## Targets (GPU: bf16, H=4096, V=128256, N=8192 for the op; the training step at "
                                 "its GPU shape)", ""]
    lines += [v["line"] for v in verdicts] or ["- none evaluated (the op and training-step runs are missing)"]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    bad = [st["step"] for st in steps if st["status"] in ("FAILED", "cut")]
    (out / "summary.json").write_text(json.dumps({"steps": steps, "failed_or_cut": bad, "targets": [
        {k: t[k] for k in ("run", "target", "value", "threshold", "pass", "at_target_shape")} for t in verdicts]},
        indent=1) + "\n")
    print(text, end="")
    return 1 if bad else 0


# ----------------------------------------------------------------------------- command line

def _pairs(values: list[str], what: str) -> dict[str, str]:
    found = {}
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep or name not in {s.name for s in STEPS}:
            raise SystemExit(f"gpu_run: {what} {value!r}: expected STEP={what.upper()} with STEP one of "
                             f"{', '.join(s.name for s in STEPS)}")
        found[name] = setting
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="The GPU run (benchmarks/gpu_run.sh) and its parts.")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="install, verify, every step within the budget, the summary")
    r.add_argument("out_dir", type=Path)
    r.add_argument("--smoke", action="store_true", help="on CPU at tiny shapes, the GPU image's absent packages hidden")
    r.add_argument("--only", default="", help="comma-separated steps to run (default all): " +
                   ", ".join(s.name for s in STEPS))
    r.add_argument("--limit", action="append", default=[], metavar="STEP=SECONDS", help="another time limit for a step")
    r.add_argument("--step-args", action="append", default=[], metavar="STEP=ARGS",
                   help="arguments added to a step's command (split on spaces)")
    r.add_argument("--python", default=sys.executable, help="the interpreter of the steps (default this one)")
    v = sub.add_parser("versions", help="write OUT_DIR/versions.json and print it")
    v.add_argument("out_dir", type=Path)
    v.add_argument("--end", action="store_true", help="add the clocks at the end of the run")
    for name, helptext in (("verify", "check the install: import and one Triton row"),
                           ("warmup", "first call of every op row the run times, timed")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("out_dir", type=Path)
        c.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
        if name == "warmup":
            c.add_argument("--only", required=True, help="comma-separated op row keys or key prefixes")
    s = sub.add_parser("summary", help="write OUT_DIR/summary.md + summary.json and print the table")
    s.add_argument("out_dir", type=Path)
    s.add_argument("--smoke", action="store_true", help="label the table as a CPU smoke run")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir.resolve()
    if args.command == "run":
        only = [n for n in args.only.split(",") if n]
        unknown = set(only) - {s.name for s in STEPS}
        if unknown:
            ap.error(f"--only: unknown steps {sorted(unknown)}; expected some of {[s.name for s in STEPS]}")
        limits = {k: int(x) for k, x in _pairs(args.limit, "limit").items()}
        extra = {k: x.split() for k, x in _pairs(args.step_args, "step-args").items()}
        return run(out, args.smoke, only, limits, extra, args.python)
    if args.command == "versions":
        return versions(out, args.end)
    if args.command == "verify":
        return verify(out, args.device)
    if args.command == "warmup":
        return warmup(out, args.device, [k for k in args.only.split(",") if k])
    return summary(out, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
