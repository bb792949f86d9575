"""Elementwise merges on the MiniLM-shaped tree against mergekit's in-memory `merge_state_dicts`.

The tree: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, intermediate 1536, vocabulary 30522, 22.6M
parameters), the main job's fine-tuned checkpoints when cached (benchmarks/real_deltas.py), else random
weights of the same shapes; K = 6 models, float32. For each method, in this process, interleaved, best of
`--repeats` after one warm-up call of each:

  * ours: `drm_jax.merge(base, models, method=m, ...)` (result blocked until ready);
  * mergekit 0.1.5: `mergekit.merge_methods.api.merge_state_dicts` on torch tensors sharing the same memory,
    with the same parameters: linear (equal weights, the K models), task_arithmetic (weight 1, lambda 1),
    ties (density 0.2), dare_ties and dare_linear (density 0.1, rescaled; mergekit's default normalize:
    false for both, which drm_jax is given too).

Ratio = ours / mergekit (below 1: we are faster). Goals (issue 12): linear and task_arithmetic within 1.5x
of mergekit, ties faster than mergekit. Effective bandwidth = (K+1) * model bytes / time (every input byte
read once), beside a plain numpy copy of the same bytes (np.copyto into preallocated arrays). Agreement:
max over leaves of max|ours - mergekit| / max|mergekit - base| (relative to the merged delta), and the
fraction of entries differing by more than 1e-4 of that, for the deterministic methods (TIES: entries of
equal magnitude at the trim threshold may be kept by one and dropped by the other); DARE draws differ between the two libraries, so only its kept fraction is compared.

    python benchmarks/bench_merge.py                    # K = 6, real checkpoints when cached
    python benchmarks/bench_merge.py --source random --repeats 2 --methods linear ties
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
import torch

import drm_jax
from _common import interleaved_best, table, verdict, write_results
from real_deltas import minilm_tree
from mergekit.merge_methods.api import merge_state_dicts

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")
DETERMINISTIC = ("linear", "task_arithmetic", "ties")
GOALS = {"linear": 1.5, "task_arithmetic": 1.5, "ties": 1.0}  # ours / mergekit at most (ties: strictly below)


def ours_call(method: str, base, models):
    kwargs = {
        "linear": {},
        "task_arithmetic": {},
        "ties": dict(density=0.2, trim_scope="tensor"),
        "dare_ties": dict(density=0.1, normalize=False, seed=0),
        "dare_linear": dict(density=0.1, seed=0),
    }[method]

    def run():
        return jax.block_until_ready(drm_jax.merge(base, models, method=method, **kwargs))
    return run


def mergekit_call(method: str, base_t, models_t):
    if method == "linear":  # the average of the K models, as mergekit's linear with equal weights
        inputs, params, base_index = models_t, {"weight": 1.0}, None
    else:
        density = {"ties": 0.2, "dare_ties": 0.1, "dare_linear": 0.1}.get(method)
        params = {"weight": 1.0, **({"density": density} if density is not None else {})}
        inputs, base_index = [base_t, *models_t], 0

    def run():
        with torch.no_grad():
            return merge_state_dicts(inputs, method, parameters=params, base=base_index)
    return run


def copy_call(base, models):
    sources = [a for tree in (base, *models) for a in tree.values()]
    targets = [np.empty_like(a) for a in sources]

    def run():
        for dst, src in zip(targets, sources):
            np.copyto(dst, src)
    return run


def agreement(ours, theirs, base) -> str:
    """Worst relative difference over leaves, and the fraction of entries differing by over 1e-4 of it."""
    worst, differing, total = 0.0, 0, 0
    for name, want in theirs.items():
        want = want.numpy().astype(np.float64)
        got = np.asarray(ours[name], np.float64)
        # relative to the leaf's merged delta, floored at float32 resolution of the weights (a leaf the
        # fine-tuning left unchanged, e.g. the frozen pooler, has a delta of rounding noise only)
        scale = max(np.max(np.abs(want - base[name])), 1e-6 * np.max(np.abs(want)), 1e-30)
        diff = np.abs(got - want) / scale
        worst = max(worst, float(diff.max()))
        differing += int(np.count_nonzero(diff > 1e-4))
        total += diff.size
    return f"{worst:.1e} ({differing / total:.1e} of entries differ by > 1e-4)"


def kept_fraction(merged, base) -> float:
    changed = sum(int(np.count_nonzero(np.asarray(merged[n]) != base[n])) for n in base)
    return changed / sum(v.size for v in base.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--source", choices=("auto", "real", "random"), default="auto")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args()

    base, models, what = minilm_tree(args.k, args.source)
    k = len(models)
    model_bytes = sum(v.nbytes for v in base.values())
    in_bytes = (k + 1) * model_bytes
    base_t = {n: torch.from_numpy(v) for n, v in base.items()}
    models_t = [{n: torch.from_numpy(v) for n, v in m.items()} for m in models]
    # each library takes its own array type, converted once outside the timings (torch.from_numpy shares
    # numpy's memory; jax.device_put copies on CPU unless the buffer is 64-byte aligned)
    base_j = {n: jax.device_put(v) for n, v in base.items()}
    models_j = [{n: jax.device_put(v) for n, v in m.items()} for m in models]
    print(f"{what}; K = {k}, {sum(v.size for v in base.values()) / 1e6:.1f}M parameters, "
          f"{model_bytes / 1e6:.1f} MB per model, {in_bytes / 1e6:.0f} MB of inputs", flush=True)

    copy = copy_call(base, models)
    copy()
    t_copy = interleaved_best({"copy": copy}, args.repeats)["copy"]
    rows, goal_lines, all_ok = [], [], True
    for method in args.methods:
        ours, theirs = ours_call(method, base_j, models_j), mergekit_call(method, base_t, models_t)
        ours_numpy = ours_call(method, base, models)
        ours_numpy()
        got, want = ours(), theirs()  # warm-up (compiles ours); results for the agreement column
        if method in DETERMINISTIC:
            check = agreement(got, want, base)
        else:
            check = (f"random; kept {kept_fraction(got, base):.3f} (ours) vs "
                     f"{kept_fraction({n: v.numpy() for n, v in want.items()}, base):.3f}")
        del got, want
        t = interleaved_best({"ours": ours, "ours_numpy": ours_numpy, "mergekit": theirs, "copy": copy},
                             args.repeats)
        t_copy = min(t_copy, t["copy"])
        ratio = t["ours"] / t["mergekit"]
        rows.append([method, f"{t['ours']:.3f}", f"{t['ours_numpy']:.3f}", f"{t['mergekit']:.3f}", f"{ratio:.2f}x",
                     f"{in_bytes / t['ours'] / 1e9:.2f}", f"{in_bytes / t['mergekit'] / 1e9:.2f}", check])
        print(f"{method:16s} ours {t['ours']:.3f} s  mergekit {t['mergekit']:.3f} s  ratio {ratio:.2f}x  "
              f"agreement {check}", flush=True)
        if method in GOALS:
            ok = ratio < 1.0 if method == "ties" else ratio <= GOALS[method]
            all_ok &= ok
            want_text = "faster than mergekit" if method == "ties" else f"within {GOALS[method]}x of mergekit"
            goal_lines.append(f"- {method}: {want_text}: {ratio:.2f}x, {verdict(ok)}.")
    rows.append(["numpy copy of the same bytes", f"{t_copy:.3f}", "", "", "", f"{in_bytes / t_copy / 1e9:.2f}", "",
                 ""])

    body = [
        f"Inputs: {what}; K = {k}, float32, {model_bytes / 1e6:.1f} MB per model, (K+1) x = "
        f"{in_bytes / 1e6:.0f} MB read per merge. Warm times (after one warm-up call), best of {args.repeats}, "
        f"ours and mergekit interleaved in one process. Ratio = drm_jax / mergekit (below 1: faster). "
        f"Bandwidth = (K+1) x model bytes / time. Agreement = max over leaves of max|ours - mergekit| / "
        f"max|mergekit - base| (and the fraction of entries differing by more than 1e-4 of it).",
        "",
        *table(["method", "drm_jax, JAX arrays (s)", "drm_jax, numpy arrays (s)", "mergekit (s)", "ratio",
                "drm_jax GB/s", "mergekit GB/s", "agreement"], rows, "lrrrrrrl"),
        "",
        "Ratio and bandwidth use drm_jax with JAX arrays (each library on its own array type, converted "
        "once outside the timings); the numpy column is drm_jax on the numpy arrays themselves (linear combinations are computed on the host, engine/host.py).",
        "",
        "Goals (issue 12):",
        *goal_lines,
    ]
    path = write_results("merge", "Elementwise merges: drm_jax.merge against mergekit's merge_state_dicts", body)
    print("\n".join(body))
    print(f"\nwrote {path}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
