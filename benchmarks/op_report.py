"""The op benchmark's figures (bench_op.py): per-row statistics, paired full / LM-only ratios, the loss check, the
targets met or missed, and the Markdown report.

Targets, by what they measure. CPU: full / LM-only step time <= 1.03; LM-only >= 1.3x faster than each F.lce row,
and its peak memory <= theirs. GPU: LM-only <= 1.3x the three GEMMs' time; full / LM-only <= 1.01 (paired
median); LM-only faster than each Liger and CCE row; loss workspace < 4 GiB. They are stated at the target shapes
(bench_op.py's TARGET_SHAPES); elsewhere they are informational.

``stats_from_stream`` rebuilds the figures from bench_op.py's stream (op_*.jsonl) when its run was cut before it
wrote its JSON. This module imports neither torch nor the package: benchmarks/gpu_run.py's summary reads results
with it whatever state the install is in.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

from harness import noise_mark, quartiles, spread

if TYPE_CHECKING:
    from op_rows import Row

# The targets' heading per device type: what they compare.
TARGETS_MEASURED = {"cpu": "full / LM-only step time; LM-only vs F.lce, time and memory",
                    "cuda": "LM-only vs the three GEMMs; full / LM-only (paired); LM-only vs Liger and CCE; "
                            "loss workspace"}


def row_stats(row: Row, flops: float, grad_bytes: int) -> dict:
    out = {"key": row.key, "label": row.label, "family": row.family, "backend": row.backend, "chunk": row.chunk,
           "loss": row.loss, "peak_bytes": row.peak_bytes, "error": row.error, "times_s": row.times,
           "workspace_bytes": None if row.peak_bytes is None else row.peak_bytes - grad_bytes}
    if row.times:
        out.update(spread(row.times))
        out["tflops"] = flops / out["median_s"] / 1e12
    return out


def add_paired_ratios(stats: list[dict]) -> None:
    """full / LM-only per repetition (both rows ran in the same repetition, interleaved), then the median: a load
    spike or a clock change hits both halves of a pair alike."""
    by_key = {st["key"]: st for st in stats}
    for st in stats:
        lm = by_key.get(st["key"].replace("scft_full:", "scft_lm:")) if st["family"] == "scft_full" else None
        if not lm or not st["times_s"] or len(st["times_s"]) != len(lm["times_s"]):
            continue
        q1, med, q3 = quartiles([f / m for f, m in zip(st["times_s"], lm["times_s"])])
        st.update(paired_ratio=med, paired_ratio_q1=q1, paired_ratio_q3=q3)


def check_losses(stats: list[dict], dtype: str) -> list[str]:
    """Every LM-only row must compute the naive row's loss, every full row the first full row's: a fast row
    that computes something else is a bug, not a result. Marks stats with loss_rel_diff; returns warnings."""
    tol = 1e-4 if dtype == "float32" else 1e-2  # summation order (fp32); bf16/fp16 logits rounding
    refs = {}
    for st in stats:
        if st["loss"] is not None and st["family"] in ("naive", "scft_full"):
            refs.setdefault(st["family"], st["loss"])
    warnings = []
    for st in stats:
        ref = refs.get("scft_full" if st["family"] == "scft_full" else "naive")
        if st["loss"] is None or ref is None or st["family"] == "gemm":
            continue
        st["loss_rel_diff"] = abs(st["loss"] - ref) / max(abs(ref), 1e-30)
        st["loss_mismatch"] = not st["loss_rel_diff"] <= tol
        if st["loss_mismatch"]:
            warnings.append(f"LOSS MISMATCH: {st['key']} gives {st['loss']:.6f}, reference {ref:.6f} "
                            f"(relative difference {st['loss_rel_diff']:.1e} > {tol:.0e})")
    return warnings


def _fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def _by_key(stats: list[dict]) -> dict[str, dict]:
    return {s["key"]: s for s in stats if "median_s" in s}


def evaluate_targets(stats: list[dict], device_type: str, at_target_shape: bool) -> list[dict]:
    """met / missed per target, with the figure; only meaningful at the target shape and dtype."""
    s = _by_key(stats)
    memory = {st["key"]: st for st in stats if st.get("peak_bytes") is not None}
    out = []

    def add(name, value, op, threshold, fmt, detail=""):
        ok = {"<=": value <= threshold, ">=": value >= threshold, "<": value < threshold}[op]
        out.append({"target": name, "value": value, "op": op, "threshold": threshold, "pass": bool(ok),
                    "text": f"{fmt.format(value)} {op} {fmt.format(threshold)}", "detail": detail})

    backends = sorted({st["key"].split(":")[1] for st in stats
                       if st["key"].startswith("scft_lm:") and st["key"].endswith(":auto")})
    for b in backends:
        lm, full = s.get(f"scft_lm:{b}:auto"), s.get(f"scft_full:{b}:auto")
        if device_type == "cpu":
            if lm and full:
                add(f"CPU [{b}] full <= 1.03x LM-only", full["median_s"] / lm["median_s"], "<=", 1.03, "{:.3f}x",
                    f"{full['median_s'] * 1e3:.0f} ms vs {lm['median_s'] * 1e3:.0f} ms")
            for anchor in ("lce_ref", "lce_auto", "lce_aspect"):
                a = s.get(anchor)
                if lm and a:
                    add(f"CPU [{b}] LM-only >= 1.3x faster than {a['label']}", a["median_s"] / lm["median_s"],
                        ">=", 1.3, "{:.2f}x", f"{lm['median_s'] * 1e3:.0f} ms vs {a['median_s'] * 1e3:.0f} ms")
                lm_mem, a_mem = memory.get(f"scft_lm:{b}:auto"), memory.get(anchor)
                if lm_mem and a_mem:
                    add(f"CPU [{b}] LM-only memory <= {a_mem['label']}", lm_mem["peak_bytes"] / 2**20, "<=",
                        a_mem["peak_bytes"] / 2**20, "{:,.1f} MiB")
        else:
            gemm = s.get("gemm")
            if lm and gemm:
                add(f"GPU [{b}] LM-only <= 1.3x the three GEMMs' time", lm["median_s"] / gemm["median_s"], "<=", 1.3,
                    "{:.3f}x", f"{lm['median_s'] * 1e3:.2f} ms vs {gemm['median_s'] * 1e3:.2f} ms (gemm x3), "
                               f"{lm['tflops']:.0f} vs {gemm['tflops']:.0f} TFLOP/s")
            if full and "paired_ratio" in full:
                add(f"GPU [{b}] full / LM-only <= 1.01 (paired median)", full["paired_ratio"], "<=", 1.01, "{:.4f}",
                    f"IQR {full['paired_ratio_q1']:.4f}-{full['paired_ratio_q3']:.4f}")
            for anchor in ("liger", "liger:fp32", "cce:cce", "cce:exact", "cce:torch_compile"):
                a = s.get(anchor)
                if lm and a:
                    add(f"GPU [{b}] LM-only faster than {a['label']}", lm["median_s"] / a["median_s"], "<", 1.0,
                        "{:.3f}x", f"{lm['median_s'] * 1e3:.2f} ms vs {a['median_s'] * 1e3:.2f} ms")
            for fam, key in (("LM-only", f"scft_lm:{b}:auto"), ("full", f"scft_full:{b}:auto")):
                row = memory.get(key)
                if row:
                    add(f"GPU [{b}] {fam} loss workspace < 4 GiB", row["workspace_bytes"] / 2**30, "<", 4.0,
                        "{:.2f} GiB", f"peak {row['peak_bytes'] / 2**30:.2f} GiB minus the gradients it returns")
    for t in out:
        t["at_target_shape"] = at_target_shape
    return out


def stats_from_stream(lines: list[dict]) -> dict:
    """bench_op.py's figures from its stream: the rows (with the error of one that failed), the repetitions that
    completed (warm-up ones left out), the peak memory measured so far; the paired ratios, loss check and targets over those. Returns {"start": the run's
    description, "stats", "targets", "loss_warnings", "reps_done", "memory_done", "end": its last line or None}."""
    start = next((line for line in lines if line["event"] == "start"), None)
    if start is None:
        return {"start": None, "stats": [], "targets": [], "loss_warnings": [], "reps_done": 0, "memory_done": 0,
                "end": None}
    rows = {line["key"]: SimpleNamespace(**{k: v for k, v in line.items() if k != "event"}, times=[], peak_bytes=None)
            for line in lines if line["event"] == "row"}
    reps = [line for line in lines if line["event"] == "rep" and not line["warmup"]]
    for rep in reps:
        for key, seconds in rep["times"].items():
            rows[key].times.append(seconds)
    for line in lines:
        if line["event"] == "error":
            rows[line["key"]].error = line["error"]
    memory = [line for line in lines if line["event"] == "memory"]
    for line in memory:
        rows[line["key"]].peak_bytes = line.get("peak_bytes")
        rows[line["key"]].error = rows[line["key"]].error or line.get("error")
    stats = [row_stats(row, start["flops_per_call"], row.grad_bytes) for row in rows.values()]
    add_paired_ratios(stats)
    loss_warnings = check_losses(stats, start["dtype"])
    end = next((line for line in lines if line["event"] == "end"), None)
    return {"start": start, "stats": stats, "targets": evaluate_targets(stats, start["device_type"],
                                                                        start["at_target_shape"]),
            "loss_warnings": loss_warnings, "reps_done": len(reps), "memory_done": len(memory), "end": end}


def render_table(stats: list[dict], noise: float) -> list[str]:
    s = _by_key(stats)
    anchor = s.get("lce_auto")
    lines = ["| row | backend | chunk | median ms | IQR ms | min-max ms | peak MiB | TFLOP/s | full/LM (paired) | "
             "speed vs F.lce chunked | loss |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for st in stats:
        if st["error"]:
            lines.append(f"| {st['label']} | {st['backend']} | {st['chunk']} | FAILED: {st['error']} |"
                         " | | | | | | |")
            continue
        if "median_s" not in st:
            lines.append(f"| {st['label']} | {st['backend']} | {st['chunk']} | - | - | - | "
                         f"{_fmt_mib(st['peak_bytes'])} | - | | | "
                         f"{'' if st['loss'] is None else format(st['loss'], '.5f')} |")
            continue
        ratio = f"{st['paired_ratio']:.3f}x" if "paired_ratio" in st else ""
        vs = f"{anchor['median_s'] / st['median_s']:.2f}x" if anchor else ""
        flag = noise_mark(st["spread"], noise)
        lines.append(
            f"| {st['label']} | {st['backend']} | {st['chunk']} | {st['median_s'] * 1e3:,.1f}{flag} | "
            f"{st['q1_s'] * 1e3:,.1f}-{st['q3_s'] * 1e3:,.1f} | {st['min_s'] * 1e3:,.1f}-{st['max_s'] * 1e3:,.1f} | "
            f"{_fmt_mib(st['peak_bytes'])} | {st['tflops']:.3f} | {ratio} | {vs} | "
            f"{'' if st['loss'] is None else format(st['loss'], '.5f')}"
            f"{' !' if st.get('loss_mismatch') else ''} |")
    return lines


def render_markdown(meta: dict, stats: list[dict], targets: list[dict], loss_warnings: list[str], noise: float,
                    sources_end: str) -> str:
    """The result's .md: what ran where (from ``meta``), the table, the targets, the loss check."""
    shape, load_start, load_end = meta["shape"], meta["loadavg_start"], meta["loadavg_end"]
    header = [
        f"# safety_loss fwd+bwd benchmark: {meta['device']}",
        "",
        f"- date: {meta['date_utc']}; commit: {meta['commit']} (sources {meta['sources_digest']}); "
        f"torch {meta['torch']}; python {meta['python']}",
        f"- command: `{meta['command']}`",
        f"- shape: N={shape['N']}, H={shape['H']}, V={shape['V']}, dtype {meta['dtype']}; N_loss={shape['N_loss']} "
        f"rows with a target ({meta['prompt_frac']:.0%} prompt rows ignored); full run: {shape['N_transition']} of "
        f"them RTO, S={shape['S']} pooled rows, C={shape['C']}",
        f"- TFLOP/s = {meta['flops_formula']} = {meta['flops_per_call'] / 1e9:,.1f} GFLOP per call, divided by the "
        "median time",
        f"- timing: {meta['timing_method']}; {meta['warmup']} warm-up + {meta['reps']} timed calls per row; "
        f"'~' marks IQR > {noise:.0%} of the median",
        f"- memory: {meta['memory_method'] or 'not measured'}; workspace = peak minus the gradients returned",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v is not None),
        "- float32 accumulation of grad_W: "
        + ("; ".join(f"{k}: {v}" for k, v in meta["fp32_accumulation_paths"].items())
           or "not run (no scft row computed a weight gradient)"),
        f"- load average (1, 5, 15 min): start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
        f"end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}"
        + (" (shared machine: other jobs may run beside this one)" if meta["device_type"] == "cpu" else ""),
    ]
    if meta["sources_changed_during_run"]:
        header.append(f"- WARNING: the op's sources changed during this run (digest {meta['sources_digest']} -> "
                      f"{sources_end}, commit {meta['commit']} -> {meta['commit_end']}): timings use the code "
                      "imported at the start; memory subprocesses may have run the new code")
    if meta.get("cut"):
        header.append(f"- CUT: {meta['cut']}; the figures are over the repetitions that completed")
    if meta["skipped"]:
        header.append(f"- not run: {'; '.join(meta['skipped'])}")
    if meta["note"]:
        header.append(f"- note: {meta['note']}")
    target_lines = ["", f"## Targets ({TARGETS_MEASURED[meta['device_type']]})" + ("" if meta["at_target_shape"] else
                                                              " -- informational: not the target shape/dtype"), ""]
    for t in targets:
        target_lines.append(f"- {'met' if t['pass'] else 'MISSED'}: {t['target']}: {t['text']}"
                            + (f" ({t['detail']})" if t["detail"] else ""))
    if not targets:
        target_lines.append("- none evaluated (rows missing)")
    if loss_warnings:
        target_lines += ["", "## Loss check (LM-only rows against the naive row, full rows against each other)", ""]
        target_lines += [f"- {w}" for w in loss_warnings]
    return "\n".join(header + [""] + render_table(stats, noise) + target_lines) + "\n"
