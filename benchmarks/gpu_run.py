"""The Python half of ``benchmarks/gpu_run.sh``: what the machine is, and the short table printed last.

    python benchmarks/gpu_run.py versions OUT_DIR [--end]   # versions.json: libraries, device, clocks
                                                             # (--end: the clocks again, at the end)
    python benchmarks/gpu_run.py summary OUT_DIR            # summary.md + summary.json from every file in OUT_DIR

The summary reads only what the run wrote into OUT_DIR (steps.tsv, tests.xml, ceilings_*.json, op_*.json), so it
also tells what is missing: a step that did not run or wrote nothing is a line saying so, never a crash.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# Fields every nvidia-smi since the Kepler generation answers; the full clock / power report goes to the log.
NVIDIA_SMI_FIELDS = ("name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
                     "power.draw,power.limit,temperature.gpu")
OP_RUNS = ("main", "small")  # bench_op.py --tag of the N=8192 run (it carries the targets) and the N=4096 run


def _nvidia_smi() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {"available": False, "note": "nvidia-smi not found"}
    query = subprocess.run(["nvidia-smi", f"--query-gpu={NVIDIA_SMI_FIELDS}", "--format=csv,noheader"],
                           capture_output=True, text=True)
    report = subprocess.run(["nvidia-smi", "-q", "-d", "CLOCK,PERFORMANCE,POWER,TEMPERATURE"], capture_output=True,
                            text=True)
    values = [v.strip() for v in query.stdout.strip().splitlines()[0].split(",")] if query.returncode == 0 and \
        query.stdout.strip() else []
    return {"available": True, "fields": dict(zip(NVIDIA_SMI_FIELDS.split(","), values)),
            "query_error": query.stderr.strip() or None, "report": report.stdout}


def versions(out_dir: Path, end: bool) -> int:
    path = out_dir / "versions.json"
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
             "versions": library_versions(), "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available()
             else None, "torch_has": {"F.linear_cross_entropy": hasattr(F, "linear_cross_entropy"),
                                      "torch.nn.LinearCrossEntropyOptions":
                                          hasattr(torch.nn, "LinearCrossEntropyOptions")},
             "cuda_available": torch.cuda.is_available(), "nvidia_smi": _nvidia_smi()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                           "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30}
    path.write_text(json.dumps(found, indent=1) + "\n")
    for key in ("date_utc", "commit", "python", "versions", "torch_has", "device"):
        if key in found:
            print(f"{key}: {found[key]}")
    print(f"nvidia-smi: {found['nvidia_smi'].get('fields') or found['nvidia_smi'].get('note')}")
    if found["nvidia_smi"].get("report"):
        print(found["nvidia_smi"]["report"])
    return 0


# ----------------------------------------------------------------------------- summary

def _steps(out_dir: Path) -> list[dict]:
    path = out_dir / "steps.tsv"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        name, rc, seconds, *note = line.split("\t")
        steps.append({"step": name, "rc": int(rc), "seconds": int(seconds), "note": note[0] if note else ""})
    return steps


def _tests(out_dir: Path) -> dict | None:
    path = out_dir / "tests.xml"
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def _latest(out_dir: Path, pattern: str) -> dict | None:
    found = sorted(out_dir.glob(pattern))
    return json.loads(found[-1].read_text()) if found else None


def summary(out_dir: Path, smoke: bool) -> int:
    steps = _steps(out_dir)
    tests = _tests(out_dir)
    ceilings = _latest(out_dir, "ceilings_*.json")
    ops = {tag: _latest(out_dir, f"op_*_{tag}.json") for tag in OP_RUNS}
    version_info = json.loads((out_dir / "versions.json").read_text()) if (out_dir / "versions.json").exists() else {}
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

    lines += ["", "| step | exit | s | note |", "|---|---:|---:|---|"]
    for st in steps:
        lines.append(f"| {st['step']} | {st['rc']} | {st['seconds']} | {st['note']} |")
    if tests is not None:
        passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
        lines.append(f"- tests: {passed} passed, {tests['skipped']} skipped, {tests['failures'] + tests['errors']} "
                     f"failed{': ' + ', '.join(tests['failed']) if tests['failed'] else ''}")
    else:
        lines.append("- tests: no tests.xml (the test step did not run)")

    if ceilings:
        lines += ["", "| ceiling | rate | unit |", "|---|---:|---|"]
        for r in ceilings["rows"]:
            extra = f" ({r['share_of_copy']:.0%} of copy)" if "share_of_copy" in r else ""
            lines.append(f"| {r['row']} | {r['rate']:,.4g}{extra} | {r['unit']} |")
        lines.append(f"- dW GEMMs through `{ceilings['fp32_accumulation_path']}`")
    else:
        lines.append("- ceilings: no ceilings_*.json (the step did not run or failed)")

    verdicts = []
    for tag, op in ops.items():
        if op is None:
            lines.append(f"- op benchmark {tag}: no op_*_{tag}.json (the step did not run or failed)")
            continue
        shape = op["meta"]["shape"]
        lines += ["", f"op, N={shape['N']} (N_loss={shape['N_loss']}), H={shape['H']}, V={shape['V']}, "
                      f"{op['meta']['dtype']}:", "",
                  "| row | chunk | median ms | TFLOP/s | peak GiB | full/LM paired |", "|---|---|---:|---:|---:|---:|"]
        for st in op["rows"]:
            if st.get("error"):
                lines.append(f"| {st['label']} {st['backend']} | {st['chunk']} | FAILED: {st['error'][:80]} | | | |")
                continue
            if "median_s" not in st:
                continue
            peak = "-" if st.get("peak_bytes") is None else f"{st['peak_bytes'] / 2**30:.2f}"
            ratio = f"{st['paired_ratio']:.4f}" if "paired_ratio" in st else ""
            name = f"{st['label']} {st['backend']}".strip()
            lines.append(f"| {name} | {st['chunk']} | {st['median_s'] * 1e3:,.3f} | {st['tflops']:,.4g} | {peak} | "
                         f"{ratio} |")
        paths = op["meta"].get("fp32_accumulation_paths") or {}
        ran = "; ".join(f"{k}: {p}" for k, p in paths.items()) or "none"
        lines.append(f"- float32 accumulation path that ran: {ran}")
        if op["meta"]["skipped"]:
            lines.append(f"- not run: {'; '.join(op['meta']['skipped'])}")
        if tag == OP_RUNS[0]:
            scope = "" if op["meta"]["at_target_shape"] else " (informational: not the target shape)"
            verdicts = [f"- {'met' if t['pass'] else 'MISSED'}: {t['target']}: {t['text']}{scope}"
                        for t in op["targets"]]
    lines += ["", "## Targets (GPU: LM-only vs the three GEMMs, full / LM-only, LM-only vs Liger and CCE, loss "
                  "workspace, at bf16, H=4096, V=128256, N=8192; CPU: full / LM-only, LM-only vs F.lce)", ""]
    lines += verdicts or ["- none evaluated (the N=8192 op run is missing)"]
    text = "\n".join(lines) + "\n"
    (out_dir / "summary.md").write_text(text)
    failed_steps = [st["step"] for st in steps if st["rc"] != 0]
    (out_dir / "summary.json").write_text(json.dumps(
        {"steps": steps, "tests": tests, "failed_steps": failed_steps,
         "targets": [] if ops[OP_RUNS[0]] is None else ops[OP_RUNS[0]]["targets"]}, indent=1) + "\n")
    print(text, end="")
    return 1 if failed_steps else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="versions and summary for benchmarks/gpu_run.sh")
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("versions", help="write OUT_DIR/versions.json (libraries, device, clocks) and print it")
    v.add_argument("out_dir", type=Path, help="the run's output directory")
    v.add_argument("--end", action="store_true", help="add the clocks at the end of the run to versions.json")
    s = sub.add_parser("summary", help="write OUT_DIR/summary.md + summary.json and print the table")
    s.add_argument("out_dir", type=Path, help="the run's output directory")
    s.add_argument("--smoke", action="store_true", help="label the table as a CPU smoke run")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.command == "versions":
        return versions(args.out_dir, args.end)
    return summary(args.out_dir, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
