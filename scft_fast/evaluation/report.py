"""The evaluation's outputs for people: a table of every model's figures side by side, and a plot."""
from __future__ import annotations

import numpy as np

TABLE_ROWS = [  # (label, section, key): one printed row per metric
    ("head accuracy", "head", "accuracy"), ("head AUROC", "head", "auroc"), ("head FPR", "head", "fpr"),
    ("head TPR", "head", "tpr"), ("threshold used", "threshold", "value"),
    ("calibrated threshold", "calibration", "threshold"), ("  FPR there", "calibration", "fpr"),
    ("  TPR there", "calibration", "tpr"), ("harmful: refusal rate", "harmful", "refusal_rate"),
    ("harmful: blocked rate", "harmful", "blocked_rate"), ("harmful: refused or blocked", "harmful", "safe_rate"),
    ("benign: over-refusal rate", "benign", "over_refusal_rate"),
    ("benign: false-block rate", "benign", "false_block_rate"),
]


def truncated_prompts(report: dict) -> int:
    """Harmful and benign prompts whose first tokens were dropped to fit the model's positions."""
    return sum(report[section]["truncated_prompts"] for section in ("harmful", "benign") if report[section])


def table_rows(report: dict) -> list[tuple[str, float | None]]:
    sections = {**report, "calibration": (report.get("head") or {}).get("calibration")}
    rows = [(label, (sections.get(section) or {}).get(key)) for label, section, key in TABLE_ROWS]
    for attack in report["attack"]:
        rows += [(f"attack k={attack['k']}: refusal within m", attack["refusal_rate"]),
                 (f"attack k={attack['k']}: blocked rate", attack["blocked_rate"])]
    return rows


def format_table(reports: dict[str, dict]) -> str:
    """One column per model (baseline first), a delta column when there are two."""
    names = list(reports)
    columns = [dict(table_rows(reports[name])) for name in names]
    labels = [label for label, _ in table_rows(reports[names[-1]])]

    def cell(value):  # a calibrated threshold can be far below 0.001
        if value is None:
            return "n/a"
        return f"{value:.3f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"

    header = f"{'metric':<34}" + "".join(f"{name:>12}" for name in names) + ("       delta" if len(names) == 2 else "")
    lines = [header, "-" * len(header)]
    for label in labels:
        values = [column.get(label) for column in columns]
        line = f"{label:<34}" + "".join(f"{cell(v):>12}" for v in values)
        if len(names) == 2:
            line += f"{'n/a' if None in values else f'{values[1] - values[0]:+.3f}':>12}"
        lines.append(line)
    return "\n".join(lines)


def plot_reports(reports: dict[str, dict], path: str, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    roc_ax, bar_ax, attack_ax = axes
    for name, report in reports.items():
        if report["head"] and "roc" in report["head"]:
            fpr, tpr = report["head"]["roc"]
            roc_ax.plot(fpr, tpr, label=f"{name} (AUROC {report['head']['auroc']:.3f})")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_ax.set(title="head on labeled pairs", xlabel="false-positive rate", ylabel="true-positive rate")
    bars = [(label, section, key) for label, section, key in TABLE_ROWS if section in ("harmful", "benign")]
    width = 0.8 / len(reports)
    for i, (name, report) in enumerate(reports.items()):
        values = [(report.get(section) or {}).get(key) for _, section, key in bars]
        bar_ax.bar(np.arange(len(bars)) + i * width, [np.nan if v is None else v for v in values], width,
                   label=name)
    bar_ax.set_xticks(np.arange(len(bars)) + 0.4 - width / 2,
                      [label.replace(": ", ":\n") for label, _, _ in bars], fontsize=7, rotation=20)
    bar_ax.set(title="responses (greedy)", ylabel="rate", ylim=(0, 1.05))
    for name, report in reports.items():
        ks = [a["k"] for a in report["attack"]]
        attack_ax.plot(ks, [a["refusal_rate"] for a in report["attack"]], marker="o", label=f"{name}: refusal")
        if any(a["blocked_rate"] is not None for a in report["attack"]):
            attack_ax.plot(ks, [a["blocked_rate"] for a in report["attack"]], marker="s", linestyle="--",
                           label=f"{name}: blocked")
    attack_ax.set(title="completion attack", xlabel="k forced harmful words", ylabel="rate", ylim=(-0.05, 1.05))
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"scft-fast eval (threshold {threshold})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
