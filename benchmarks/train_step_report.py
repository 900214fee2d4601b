"""The training-step benchmark's figures (bench_train_step.py): per-mode medians, paired ratios, targets, the table.

It reads the benchmark's stream (train_step_*.jsonl: one "start" line, one "run" line per finished training run,
"skipped" lines for modes that cannot run here, an "end" line), so the same figures come out of a finished run and
of one cut by its time limit (benchmarks/gpu_run.py). It imports neither torch nor the package.

Targets (tokens/s, the paired median over repetitions): full >= 0.99x plain (the safety terms cost at most 1%
over plain fused SFT at equal rows); full >= 1.2x hf (the model's own loss). Stated at the GPU shape; elsewhere
(the CPU smoke) informational.
"""
from __future__ import annotations

import statistics

from harness import quartiles

MODES = ("full", "plain", "hf", "liger")
MODE_TITLES = {"full": "SCFT + DeRTa, SCFTTrainer, fused loss (LM + RTO + head)",
               "plain": "plain SFT, Trainer, apply_scft_fast(model) (fused LM loss)",
               "hf": "plain SFT, Trainer, the model's own loss (logits materialized)",
               "liger": "plain SFT, Trainer, Liger-Kernel fused linear cross-entropy"}
# (mode, baseline, least ratio of full's tokens/s to the baseline's)
TARGETS = (("full", "plain", 0.99), ("full", "hf", 1.2))


def run_figures(step_times: list[float], tokens: list[int], warmup: int) -> dict:
    """A run's figures over its steps after the warm-up: median step time, median tokens/s."""
    timed = list(zip(step_times, tokens))[warmup:]
    return {"median_step_s": statistics.median(t for t, _ in timed),
            "tokens_per_s": statistics.median(n / t for t, n in timed), "timed_steps": len(timed)}


def summarize(lines: list[dict]) -> dict:
    """{"start", "modes": per-mode medians over repetitions, "paired": per-baseline ratios, "targets", "skipped",
    "errors", "runs_done", "end"} from the stream's lines."""
    start = next((line for line in lines if line["event"] == "start"), None)
    runs = [line for line in lines if line["event"] == "run" and "error" not in line]
    errors = [f"{line['mode']} (repetition {line['rep']}): {line['error']}" for line in lines
              if line["event"] == "run" and "error" in line]
    skipped = {line["mode"]: line["reason"] for line in lines if line["event"] == "skipped"}
    modes = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        peaks = [r["peak_memory_bytes"] for r in mine if r["peak_memory_bytes"] is not None]
        modes[mode] = {"runs": len(mine), "median_step_s": statistics.median(r["median_step_s"] for r in mine),
                       "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                       "peak_memory_bytes": statistics.median(peaks) if peaks else None,
                       "train_loss": mine[-1].get("train_loss")}
    paired, targets = {}, []
    for mode, baseline, least in TARGETS:
        by_rep = {r["rep"]: r for r in runs if r["mode"] == baseline}
        ratios = [r["tokens_per_s"] / by_rep[r["rep"]]["tokens_per_s"] for r in runs
                  if r["mode"] == mode and r["rep"] in by_rep]
        if not ratios:
            continue
        q1, med, q3 = quartiles(ratios)
        paired[baseline] = {"ratios": ratios, "median": med, "q1": q1, "q3": q3}
        targets.append({"target": f"{mode} tokens/s >= {least}x {baseline}", "value": med, "threshold": least,
                        "pass": med >= least, "at_target_shape": bool(start and start["at_target_shape"]),
                        "text": f"{med:.3f}x (paired over {len(ratios)} repetitions, "
                                f"{', '.join(f'{r:.3f}' for r in ratios)})"})
    end = next((line for line in lines if line["event"] == "end"), None)
    return {"start": start, "modes": modes, "paired": paired, "targets": targets, "skipped": skipped,
            "errors": errors, "runs_done": len(runs), "end": end,
            "resident_before": [r.get("resident_before_bytes") for r in runs]}


def _gib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**30:,.2f}"


def render(report: dict) -> list[str]:
    """The Markdown lines: what ran, the per-mode table, the targets met or missed."""
    start = report["start"]
    if start is None:
        return ["- training step: no figures (the run stopped before its first line)"]
    m = start["model"]
    lines = [f"- model: random Llama, H={m['hidden']}, I={m['intermediate']}, L={m['layers']}, heads "
             f"{m['heads']}/{m['kv_heads']}, V={m['vocab']}, {m['params'] / 1e6:,.1f}M parameters; "
             f"{start['precision']}; attention {start['attention']}",
             f"- batches: one packed row per step, median {statistics.median(start['tokens_per_pack']):,.0f} tokens and "
             f"{statistics.median(start['loss_rows_per_pack']):,.0f} loss rows (the same in every mode); "
             f"{start['warmup']} warm-up + {start['steps']} timed steps per run, {start['repeats']} repetitions, "
             f"order rotated; optimizer {start['optim']}",
             f"- memory: {start['memory_method']}", "",
             "| mode | what | runs | median step ms | tokens/s | peak GiB | train loss |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        if mode in report["modes"]:
            f = report["modes"][mode]
            loss = "" if f["train_loss"] is None else f"{f['train_loss']:.4f}"
            lines.append(f"| {mode} | {MODE_TITLES[mode]} | {f['runs']} | {f['median_step_s'] * 1e3:,.1f} | "
                         f"{f['tokens_per_s']:,.0f} | {_gib(f['peak_memory_bytes'])} | {loss} |")
        elif mode in report["skipped"]:
            lines.append(f"| {mode} | {MODE_TITLES[mode]} | not run: {report['skipped'][mode]} | | | | |")
    lines += [f"- FAILED run: {e}" for e in report["errors"]]
    left = [r for r in report["resident_before"] if r]
    if left and max(left) > 2**30:
        lines.append(f"- memory still allocated when a run began (left by the runs before it): up to {_gib(max(left))} "
                     "GiB, inside that run's peak")
    full = report["modes"].get("full")
    for mode in ("plain", "hf", "liger"):
        other = report["modes"].get(mode)
        if full and other and full["peak_memory_bytes"] and other["peak_memory_bytes"]:
            lines.append(f"- peak memory full / {mode}: {full['peak_memory_bytes'] / other['peak_memory_bytes']:.3f}x")
    if report["end"] is None or report["end"].get("cut"):
        cut = report["end"]["cut"] if report["end"] else "no end line (the process was killed)"
        lines.append(f"- CUT: {cut}; {report['runs_done']} runs finished")
    scope = "" if start["at_target_shape"] else " (informational: not the GPU shape)"
    lines += [f"- {'met' if t['pass'] else 'MISSED'}: {t['target']}: {t['text']}{scope}" for t in report["targets"]]
    if not report["targets"]:
        lines.append("- targets: none evaluated (full and its baselines did not both finish a repetition)")
    return lines
