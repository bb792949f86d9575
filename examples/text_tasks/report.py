"""The results table (Markdown) and the plots (PNG), aggregated over seeds.

A per-seed result is a dict:
  {"seed": int, "tasks": [names],
   "rows": {label: {"test": {task: acc}, "val": {task: acc}, "chosen": {param: value}, "at_edge": bool}},
   "sweep": {label: [{"drop_rate", "lambda", "val_norm", "test_norm", "test_avg"}]},
   "counts": {K: {label: {"tasks": [names], "test_norm": float, "test_avg": float}}}}
Accuracies are fractions; the table shows percentages. With several seeds a cell is "mean ± std".
"Gap closed" is (merged average - pretrained average) / (fine-tuned average - pretrained average): the
fraction of what fine-tuning gained that the merge keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

PRETRAINED, FINETUNED = "Pretrained (zero-shot heads)", "Fine-tuned (individual)"


def _cell(values: Sequence[float]) -> str:
    values = 100.0 * np.asarray(values, float)

    def num(v: float) -> str:
        return f"{round(float(v), 1) + 0.0:.1f}"  # + 0.0: no "-0.0"

    if len(values) == 1:
        return num(values[0])
    return f"{num(values.mean())} ± {num(values.std(ddof=1))}"


def row_scores(result: Mapping, label: str) -> dict[str, float]:
    """Per-task test accuracy plus 'Avg', 'Normalized' (mean of acc / fine-tuned acc) and 'Gap closed'."""
    test = result["rows"][label]["test"]
    ft = result["rows"][FINETUNED]["test"]
    pre = result["rows"][PRETRAINED]["test"]
    tasks = result["tasks"]
    scores = {t: test[t] for t in tasks}
    scores["Avg"] = float(np.mean([test[t] for t in tasks]))
    scores["Normalized"] = float(np.mean([test[t] / ft[t] for t in tasks]))
    gap = float(np.mean([ft[t] - pre[t] for t in tasks]))
    scores["Gap closed"] = float(np.mean([test[t] - pre[t] for t in tasks])) / gap if abs(gap) > 1e-9 else float("nan")
    return scores


def _format_chosen(chosen: Mapping, at_edge: bool = False) -> str:
    if not chosen:
        return ""
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in sorted(chosen.items()))
    return text + (" (at the edge of its grid)" if at_edge else "")


def main_table(results: Sequence[Mapping], labels: Sequence[str]) -> str:
    """Markdown table: one row per method, test accuracy (%) per task, average, normalized average."""
    tasks = list(results[0]["tasks"])
    columns = tasks + ["Avg", "Normalized", "Gap closed"]
    lines = ["| Method | " + " | ".join(columns) + " | Chosen on validation |",
             "|---|" + "---:|" * len(columns) + "---|"]
    for label in labels:
        per_seed = [row_scores(r, label) for r in results]
        chosen = "; ".join(dict.fromkeys(_format_chosen(r["rows"][label].get("chosen", {}),
                                                        r["rows"][label].get("at_edge", False)) for r in results))
        cells = [_cell([s[c] for s in per_seed]) for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {chosen} |")
    return "\n".join(lines)


def sweep_table(results: Sequence[Mapping]) -> str:
    lines = ["| Method | Drop rate | lambda | Normalized (val) | Normalized (test) |", "|---|---:|---:|---:|---:|"]
    for label in results[0].get("sweep", {}):
        for i, point in enumerate(results[0]["sweep"][label]):
            points = [r["sweep"][label][i] for r in results if i < len(r["sweep"].get(label, []))]
            lam = "; ".join(dict.fromkeys(f"{p['lambda']:.4g}" for p in points))
            lines.append(f"| {label} | {point['drop_rate']:g} | {lam} | {_cell([p['val_norm'] for p in points])}"
                         f" | {_cell([p['test_norm'] for p in points])} |")
    return "\n".join(lines)


def count_labels(results: Sequence[Mapping], labels: Sequence[str]) -> list[str]:
    """The labels of `labels` that every point of the number-of-tasks curve has."""
    counts = results[0].get("counts", {})
    return [l for l in labels if counts and all(l in counts[k] for r in results for k in r["counts"])]


def counts_table(results: Sequence[Mapping], labels: Sequence[str]) -> str:
    counts = sorted(results[0].get("counts", {}), key=int)
    lines = ["| Method | " + " | ".join(f"{k} tasks" for k in counts) + " |", "|---|" + "---:|" * len(counts)]
    for label in count_labels(results, labels):
        cells = [_cell([r["counts"][k][label]["test_norm"] for r in results]) for k in counts]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(results: Sequence[Mapping], labels: Sequence[str], header: str) -> str:
    """The whole results file: main table, drop-rate sweep, number-of-tasks table."""
    merge_labels = [l for l in labels if l not in (PRETRAINED, FINETUNED)]
    parts = [header, "", "### Test accuracy (%) per task; hyperparameters chosen on validation", "",
             main_table(results, labels), "",
             "Normalized = mean over tasks of (merged accuracy / individually fine-tuned accuracy). Gap closed = "
             "(merged - pretrained) / (fine-tuned - pretrained), on the task averages.", ""]
    if results[0].get("sweep"):
        parts += ["### Drop-rate sweep (lambda at its choice before the drop rate was searched)", "",
                  sweep_table(results), ""]
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
    fig, ax = plt.subplots(figsize=(max(1.6 + 1.5 * len(columns), 9.0), 4.2), dpi=90)
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
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    ax.set_title("Per-task test accuracy by method", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def plot_counts(results: Sequence[Mapping], labels: Sequence[str], path: Path,
                colors: Mapping[str, str] | None = None) -> None:
    plt = _plt()
    colors = colors or _colors(labels)
    counts = sorted(results[0]["counts"], key=int)
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=90)
    for i, label in enumerate(labels):
        if label not in count_labels(results, [label]):
            continue
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
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def plot_sweep(results: Sequence[Mapping], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=90)
    for n, (label, points) in enumerate(results[0]["sweep"].items()):
        rates = [p["drop_rate"] for p in points]
        for key, style in (("test_norm", "-"), ("val_norm", "--")):
            values = np.array([[p[key] for p in r["sweep"][label]] for r in results]) * 100
            ax.plot(rates, values.mean(0), style, marker="o", color=f"C{n}", label=f"{label} ({key.split('_')[0]})")
    ax.set_xlabel("drop rate p")
    ax.set_ylabel("normalized accuracy (%)")
    ax.legend(fontsize=7)
    ax.set_title("Drop-rate sweep", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
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
