"""The results table (Markdown) and the plots (PNG), aggregated over seeds.

A per-seed result is a dict:
  {"seed": int, "tasks": [names],
   "rows": {label: {"test": {task: acc}, "val": {task: acc}, "test_correct": {task: "0110..."},
                    "chosen": {param: value}, "at_edge": bool,
                    "search": {param: {"tried": [values], "chosen": value, "at_edge": bool}}, "evaluations": int,
                    "ci_vs_best": [lo, hi], "ci_vs_drm_h": [lo, hi]}},
   "uniform_rows": the same rows with every method's non-matrix leaves merged by task arithmetic,
   "sweep": {label: [{"drop_rate", "lambda", "val_norm", "test_norm", "test_avg"}]},
   "counts": {K: {label: {"tasks": [names], "test_norm": float, "test_avg": float}}}}
Accuracies are fractions; the table shows percentages. With several seeds a cell is "mean ± std".
"Gap closed" is (merged average - pretrained average) / (fine-tuned average - pretrained average): the
fraction of what fine-tuning gained that the merge keeps.

Paired statistics (`add_intervals`): for each row against the best merge row and against DRM-H, the 95%
interval of the difference in normalized test accuracy from a paired bootstrap over test texts and
seeds (`PairedBootstrap`), stored as the row's `ci_vs_best` and `ci_vs_drm_h` (fractions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

PRETRAINED, FINETUNED = "Pretrained (zero-shot heads)", "Fine-tuned (individual)"
DRM_H = "DRM-H"
BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0


def encode_correct(correct) -> str:
    """Which texts were read right, as a string of 0 / 1 in the split's order (compact in JSON)."""
    return "".join("1" if c else "0" for c in np.asarray(correct, bool).ravel())


def decode_correct(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8) == ord("1")


class PairedBootstrap:
    """Paired bootstrap of a difference in normalized accuracy over test texts and seeds.

    correct_ft: per seed, {task: "0110..."} of the individually fine-tuned models (the normalizer). Each of
    the `replicates` draws the seeds with replacement and, in each seed and task, the test texts with
    replacement; the same draw serves every row (paired: both rows of a difference are read on the same
    texts, and the fine-tuned accuracy that normalizes them on those texts too). The statistic of a draw
    is the mean over the drawn seeds of mean_t (acc_A,t - acc_B,t) / acc_ft,t.
    """

    def __init__(self, correct_ft: Sequence[Mapping[str, str]], replicates: int = BOOTSTRAP_REPLICATES,
                 seed: int = BOOTSTRAP_SEED):
        rng = np.random.default_rng(seed)
        self.tasks = [sorted(c) for c in correct_ft]
        self.counts = []  # per seed, per task: (replicates, n) how often each text is drawn
        self.ft_hits = []  # per seed, per task: (replicates,) fine-tuned correct texts in the draw
        for seed_ft, tasks in zip(correct_ft, self.tasks):
            counts, hits = [], []
            for t in tasks:
                ft = decode_correct(seed_ft[t]).astype(np.float64)
                n = len(ft)
                draw = rng.integers(0, n, size=(replicates, n))
                c = np.zeros((replicates, n))
                np.add.at(c, (np.arange(replicates)[:, None], draw), 1.0)
                counts.append(c)
                hits.append(np.maximum(c @ ft, 1.0))
            self.counts.append(counts)
            self.ft_hits.append(hits)
        self.seed_draw = rng.integers(0, len(correct_ft), size=(replicates, len(correct_ft)))

    def differences(self, a: Sequence[Mapping[str, str]], b: Sequence[Mapping[str, str]]) -> np.ndarray:
        """(replicates,) bootstrap draws of normalized(A) - normalized(B); a, b: per seed {task: "0110..."}."""
        per_seed = []
        for s, tasks in enumerate(self.tasks):
            diff = [self.counts[s][i] @ (decode_correct(a[s][t]).astype(np.float64)
                                         - decode_correct(b[s][t]).astype(np.float64)) / self.ft_hits[s][i]
                    for i, t in enumerate(tasks)]
            per_seed.append(np.mean(diff, axis=0))
        per_seed = np.stack(per_seed)  # (seeds, replicates)
        return per_seed[self.seed_draw.T, np.arange(per_seed.shape[1])].mean(axis=0)

    def interval(self, a, b, level: float = 0.95) -> list[float]:
        """[lo, hi]: the central `level` interval of the bootstrap draws of normalized(A) - normalized(B)."""
        d = self.differences(a, b)
        tail = 100 * (1 - level) / 2
        return [float(np.percentile(d, tail)), float(np.percentile(d, 100 - tail))]


def _normalized_test(results: Sequence[Mapping], key: str, label: str) -> float:
    """Mean over seeds of a row's normalized test accuracy."""
    return float(np.mean([row_scores(r, label, key)["Normalized"] for r in results]))


def add_intervals(results: Sequence[dict], keys: Sequence[str] = ("rows", "uniform_rows")) -> None:
    """Set every row's `ci_vs_best` and `ci_vs_drm_h` (and each table's `best`) in place, per table
    (`keys`), pooling every seed: the same interval is written into each seed's row. Rows without
    per-text results (an older results.json) are left as they are."""
    for key in keys:
        tables = [r.get(key) or {} for r in results]
        labels = [l for l in tables[0] if all("test_correct" in t.get(l, {}) for t in tables)]
        if FINETUNED not in labels:
            continue
        merges = [l for l in labels if l not in (PRETRAINED, FINETUNED)]
        if not merges:
            continue
        boot = PairedBootstrap([t[FINETUNED]["test_correct"] for t in tables])
        best = max(merges, key=lambda l: _normalized_test(results, key, l))
        for label in labels:
            a = [t[label]["test_correct"] for t in tables]
            ci_best = boot.interval(a, [t[best]["test_correct"] for t in tables])
            ci_drm = (boot.interval(a, [t[DRM_H]["test_correct"] for t in tables]) if DRM_H in labels else None)
            for t in tables:
                t[label]["ci_vs_best"], t[label]["ci_vs_drm_h"] = ci_best, ci_drm
        for r in results:
            r.setdefault("best", {})[key] = best


def _cell(values: Sequence[float]) -> str:
    values = 100.0 * np.asarray(values, float)
    if np.all(np.isnan(values)):
        return ""

    def num(v: float) -> str:
        return f"{round(float(v), 1) + 0.0:.1f}"  # + 0.0: no "-0.0"

    if len(values) == 1:
        return num(values[0])
    return f"{num(values.mean())} ± {num(values.std(ddof=1))}"


def row_scores(result: Mapping, label: str, key: str = "rows") -> dict[str, float]:
    """Per-task test accuracy plus 'Avg', 'Normalized' (mean of acc / fine-tuned acc), 'Gap closed' and
    'Normalized (val)' (NaN for a row without validation accuracies) of the row in table `key`."""
    rows = result[key]
    test = rows[label]["test"]
    ft = rows[FINETUNED]["test"]
    pre = rows[PRETRAINED]["test"]
    tasks = result["tasks"]
    scores = {t: test[t] for t in tasks}
    scores["Avg"] = float(np.mean([test[t] for t in tasks]))
    scores["Normalized"] = float(np.mean([test[t] / ft[t] for t in tasks]))
    gap = float(np.mean([ft[t] - pre[t] for t in tasks]))
    scores["Gap closed"] = float(np.mean([test[t] - pre[t] for t in tasks])) / gap if abs(gap) > 1e-9 else float("nan")
    val, ft_val = rows[label].get("val"), rows[FINETUNED].get("val")
    scores["Normalized (val)"] = (float(np.mean([val[t] / ft_val[t] for t in tasks])) if val and ft_val
                                  else float("nan"))
    return scores


def _format_chosen(row: Mapping) -> str:
    """The chosen numbers, the parameters whose choice is at an edge of what was tried, and how many
    candidates were validated."""
    chosen = row.get("chosen", {})
    if not chosen:
        return ""
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in sorted(chosen.items()))
    edges = [p for p, g in sorted(row.get("search", {}).items()) if g.get("at_edge")]
    if edges:
        text += " (at the edge of its grid: " + ", ".join(edges) + ")"
    elif row.get("at_edge", False):
        text += " (at the edge of its grid)"
    if row.get("evaluations"):
        text += f"; {row['evaluations']} tried"
    return text


def _delta_cell(results: Sequence[Mapping], key: str, label: str, other: str | None, ci_name: str) -> str:
    """The mean over seeds of normalized(label) - normalized(other), in points, with its 95% interval."""
    rows = results[0][key]
    if other is None or other not in rows or rows[label].get(ci_name) is None:
        return ""
    diff = 100 * (_normalized_test(results, key, label) - _normalized_test(results, key, other))
    lo, hi = (100 * v for v in rows[label][ci_name])
    num = lambda v: f"{round(v, 1) + 0.0:+.1f}"  # noqa: E731  (+ 0.0: no "-0.0")
    return f"{num(diff)} [{num(lo)}, {num(hi)}]"


def main_table(results: Sequence[Mapping], labels: Sequence[str], key: str = "rows") -> str:
    """Markdown table: one row per method, test accuracy (%) per task, average, normalized average, gap
    closed, normalized validation accuracy, and (where the rows have per-text results) the differences in
    normalized test accuracy against the best merge row and against DRM-H with their 95% intervals."""
    tasks = list(results[0]["tasks"])
    columns = tasks + ["Avg", "Normalized", "Gap closed", "Normalized (val)"]
    labels = [l for l in labels if l in results[0][key]]
    best = results[0].get("best", {}).get(key)
    paired = best is not None
    extra = ["vs best (95% CI)", "vs DRM-H (95% CI)"] if paired else []
    lines = ["| Method | " + " | ".join(columns + extra) + " | Chosen on validation |",
             "|---|" + "---:|" * len(columns + extra) + "---|"]
    for label in labels:
        per_seed = [row_scores(r, label, key) for r in results]
        chosen = "; ".join(dict.fromkeys(_format_chosen(r[key][label]) for r in results))
        cells = [_cell([s[c] for s in per_seed]) for c in columns]
        if paired:
            cells += [_delta_cell(results, key, label, best, "ci_vs_best"),
                      _delta_cell(results, key, label, DRM_H, "ci_vs_drm_h")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {chosen} |")
    return "\n".join(lines)


def sweep_points(results: Sequence[Mapping], label: str) -> dict[float, list[Mapping]]:
    """{drop rate: that point of every seed that tried it}, by increasing drop rate (the search extends
    past its starting values where each seed's validation leads, so seeds may try different rates)."""
    points: dict[float, list[Mapping]] = {}
    for r in results:
        for point in r.get("sweep", {}).get(label, []):
            points.setdefault(point["drop_rate"], []).append(point)
    return dict(sorted(points.items()))


def sweep_table(results: Sequence[Mapping]) -> str:
    """One line per method and drop rate; a cell over the seeds that tried that rate (their number where
    not all did)."""
    lines = ["| Method | Drop rate | lambda | Normalized (val) | Normalized (test) |", "|---|---:|---:|---:|---:|"]
    for label in results[0].get("sweep", {}):
        for rate, points in sweep_points(results, label).items():
            lam = "; ".join(dict.fromkeys(f"{p['lambda']:.4g}" for p in points))
            seeds = "" if len(points) == len(results) else f" ({len(points)} of {len(results)} seeds)"
            lines.append(f"| {label} | {rate:g}{seeds} | {lam} | {_cell([p['val_norm'] for p in points])}"
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
    """The whole results file: main table (each method's own rule for every leaf), the table with one rule
    for the non-matrix leaves, drop-rate sweep, number-of-tasks table."""
    merge_labels = [l for l in labels if l not in (PRETRAINED, FINETUNED)]
    best = results[0].get("best", {})
    parts = [header, "", "### Test accuracy (%) per task; hyperparameters chosen on validation; each method's own "
             "rule for every leaf", "", main_table(results, labels), "",
             "Normalized = mean over tasks of (merged accuracy / individually fine-tuned accuracy). Gap closed = "
             "(merged - pretrained) / (fine-tuned - pretrained), on the task averages. Normalized (val): the same "
             "on the validation texts the choice was made on.", ""]
    if "rows" in best:
        parts += [f"vs best / vs DRM-H: the difference in normalized test accuracy (points) from the best merge row "
                  f"({best['rows']}) and from DRM-H, with the 95% interval of a paired bootstrap over test texts"
                  f"{' and seeds' if len(results) > 1 else ''} ({BOOTSTRAP_REPLICATES} draws); an interval "
                  f"that holds 0 is a tie at this sample size.", ""]
    if results[0].get("uniform_rows"):
        parts += ["### The same merges with one rule for the non-matrix leaves", "",
                  "Every method's non-matrix leaves (token, position and type embeddings, biases, LayerNorms: "
                  "the leaves outside the methods' matrix path) replaced by task arithmetic's at the method's "
                  "own chosen scale (lambda or alpha; 1/K for the linear average, WUDI and RegMean; AdaMerging's "
                  "learned coefficient of each leaf), so the rows differ only in how they merge the weight matrices.",
                  "", main_table(results, labels, "uniform_rows"), ""]
        if "uniform_rows" in best:
            parts += [f"Best merge row of this table: {best['uniform_rows']}.", ""]
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
    for n, label in enumerate(results[0]["sweep"]):
        points = sweep_points(results, label)
        for key, style in (("test_norm", "-"), ("val_norm", "--")):
            means = [100 * np.mean([p[key] for p in seeds]) for seeds in points.values()]
            ax.plot(list(points), means, style, marker="o", color=f"C{n}", label=f"{label} ({key.split('_')[0]})")
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
