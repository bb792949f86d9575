"""The results table (Markdown) and the plots (PNG), aggregated over seeds.

A per-seed result is a dict:
  {"seed": int, "tasks": [names],
   "rows": {label: {"test": {task: acc}, "val": {task: acc}, "chosen": {param: value}}},
   "sweep": {direction: [{"drop_rate", "lambda", "val_norm", "test_norm", "test_avg"}]},
   "counts": {K: {label: {"tasks": [names], "test_norm": float, "test_avg": float}}}}
Accuracies are fractions; the table shows percentages. With several seeds a cell is "mean ± std".
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

PRETRAINED, FINETUNED = "Pretrained (zero-shot heads)", "Fine-tuned (individual)"


def _cell(values: Sequence[float]) -> str:
    values = 100.0 * np.asarray(values, float)
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def row_scores(result: Mapping, label: str) -> dict[str, float]:
    """Per-task test accuracy plus 'Avg' and 'Normalized' (mean of acc / fine-tuned acc)."""
    test = result["rows"][label]["test"]
    ft = result["rows"][FINETUNED]["test"]
    scores = {t: test[t] for t in result["tasks"]}
    scores["Avg"] = float(np.mean([test[t] for t in result["tasks"]]))
    scores["Normalized"] = float(np.mean([test[t] / ft[t] for t in result["tasks"]]))
    return scores


def _format_chosen(chosen: Mapping) -> str:
    if not chosen:
        return ""
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in sorted(chosen.items()))


def main_table(results: Sequence[Mapping], labels: Sequence[str]) -> str:
    """Markdown table: one row per method, test accuracy (%) per task, average, normalized average."""
    tasks = list(results[0]["tasks"])
    columns = tasks + ["Avg", "Normalized"]
    lines = ["| Method | " + " | ".join(columns) + " | Chosen on validation |",
             "|---|" + "---:|" * len(columns) + "---|"]
    for label in labels:
        per_seed = [row_scores(r, label) for r in results]
        chosen = "; ".join(dict.fromkeys(_format_chosen(r["rows"][label].get("chosen", {})) for r in results))
        cells = [_cell([s[c] for s in per_seed]) for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {chosen} |")
    return "\n".join(lines)


def sweep_table(results: Sequence[Mapping]) -> str:
    lines = ["| Direction | Drop rate | lambda | Normalized (val) | Normalized (test) |", "|---|---:|---:|---:|---:|"]
    for direction in results[0].get("sweep", {}):
        for i, point in enumerate(results[0]["sweep"][direction]):
            points = [r["sweep"][direction][i] for r in results]
            lam = "; ".join(dict.fromkeys(f"{p['lambda']:g}" for p in points))
            lines.append(f"| {direction} | {point['drop_rate']:g} | {lam} | {_cell([p['val_norm'] for p in points])}"
                         f" | {_cell([p['test_norm'] for p in points])} |")
    return "\n".join(lines)


def counts_table(results: Sequence[Mapping], labels: Sequence[str]) -> str:
    counts = sorted(results[0].get("counts", {}), key=int)
    lines = ["| Method | " + " | ".join(f"{k} tasks" for k in counts) + " |", "|---|" + "---:|" * len(counts)]
    for label in labels:
        cells = [_cell([r["counts"][k][label]["test_norm"] for r in results]) for k in counts]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(results: Sequence[Mapping], labels: Sequence[str], header: str) -> str:
    """The whole results file: main table, drop-rate sweep, number-of-tasks table."""
    merge_labels = [l for l in labels if l not in (PRETRAINED, FINETUNED)]
    parts = [header, "", "### Test accuracy (%) per task; hyperparameters chosen on validation", "",
             main_table(results, labels), "",
             "Normalized = mean over tasks of (merged accuracy / individually fine-tuned accuracy).", ""]
    if results[0].get("sweep"):
        parts += ["### DRM drop-rate sweep (lambda fixed at its validation choice)", "", sweep_table(results), ""]
    if results[0].get("counts"):
        parts += ["### Normalized test accuracy (%) against the number of merged tasks", "",
                  counts_table(results, merge_labels), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(labels: Sequence[str]) -> dict[str, str]:
    """One colour per method, the same in every plot."""
    palette = [f"C{i}" for i in range(10)] + ["#393b79", "#8c6d31", "#843c39", "#7b4173", "#637939"]
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def plot_per_task(results: Sequence[Mapping], labels: Sequence[str], path: Path,
                  colors: Mapping[str, str] | None = None) -> None:
    plt = _plt()
    colors = colors or _colors(labels)
    columns = list(results[0]["tasks"]) + ["Avg"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(columns), 4.2), dpi=90)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        scores = [row_scores(r, label) for r in results]
        means = [100 * np.mean([s[c] for s in scores]) for c in columns]
        errs = [100 * np.std([s[c] for s in scores], ddof=1) for c in columns] if len(scores) > 1 else None
        ax.bar(np.arange(len(columns)) + (i - (len(labels) - 1) / 2) * width, means, width, yerr=errs,
               label=label, capsize=1.5, color=colors[label])
    ax.set_xticks(np.arange(len(columns)), columns, rotation=15, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    low = min(100 * min(row_scores(r, l)[c] for r in results for l in labels for c in columns), 100)
    ax.set_ylim(max(0, low - 5), 100)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    ax.set_title("Per-task test accuracy by method", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_counts(results: Sequence[Mapping], labels: Sequence[str], path: Path,
                colors: Mapping[str, str] | None = None) -> None:
    plt = _plt()
    colors = colors or _colors(labels)
    counts = sorted(results[0]["counts"], key=int)
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=90)
    for i, label in enumerate(labels):
        values = np.array([[r["counts"][k][label]["test_norm"] for k in counts] for r in results]) * 100
        shift = 0.06 * (i - (len(labels) - 1) / 2)  # side by side, so the error bars stay readable
        ax.errorbar([int(k) + shift for k in counts], values.mean(0),
                    yerr=values.std(0, ddof=1) if len(results) > 1 else None,
                    marker="o", label=label, capsize=2, color=colors[label])
    ax.set_xlabel("number of merged tasks")
    ax.set_ylabel("normalized test accuracy (%)")
    ax.set_xticks([int(k) for k in counts])
    ax.legend(fontsize=6)
    ax.set_title("Merging more tasks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(results: Sequence[Mapping], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=90)
    for n, (direction, points) in enumerate(results[0]["sweep"].items()):
        rates = [p["drop_rate"] for p in points]
        for key, style in (("test_norm", "-"), ("val_norm", "--")):
            values = np.array([[p[key] for p in r["sweep"][direction]] for r in results]) * 100
            ax.plot(rates, values.mean(0), style, marker="o", color=f"C{n}",
                    label=f"DRM-{direction[0].upper()} ({key.split('_')[0]})")
    ax.set_xlabel("drop rate p")
    ax.set_ylabel("normalized accuracy (%)")
    ax.legend(fontsize=7)
    ax.set_title("DRM drop-rate sweep", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(results: Sequence[Mapping], labels: Sequence[str], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    merge_labels = [l for l in labels if l not in (PRETRAINED, FINETUNED)]
    colors = _colors(labels)
    paths = [directory / "per_task.png"]
    plot_per_task(results, labels, paths[0], colors)
    if results[0].get("counts"):
        paths.append(directory / "num_tasks.png")
        plot_counts(results, merge_labels, paths[-1], colors)
    if results[0].get("sweep"):
        paths.append(directory / "drop_rate_sweep.png")
        plot_sweep(results, paths[-1])
    return paths
