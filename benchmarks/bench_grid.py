"""A hyperparameter grid after `drm_jax.prepare` against one warm `drm_jax.merge`.

On the MiniLM-shaped tree (benchmarks/real_deltas.py: the main job's fine-tuned all-MiniLM-L6-v2
checkpoints when cached, else random weights of the same shapes), K = 6, DRM-H:

  * one merge: `drm_jax.merge(base, models, method="drm", direction="horizontal", drop_rate=0.8)`, warm
    (decomposition + merge);
  * the grid: `prepared = drm_jax.prepare(base, models, method="drm", direction="horizontal")` then
    `prepared.merge(drop_rate=p, lambda_=lam)` for p in (0.5, 0.7, 0.8, 0.9, 0.95) and lam in
    (0.5, 1.0, 1.5): prepare time + 15 merges, every result blocked until ready.

Both timed interleaved in this process, best of `--repeats`. XLA compilations are counted with a
jax.monitoring duration listener on the backend-compile event ("/jax/core/compile/backend_compile_duration"):
for the first (cold) merge, then over the timed warm merges and grids (the first grid run, right after
the cold merge, is one of them). Goals (issue 12):
the grid costs at most 2x one warm merge and compiles nothing new.

    python benchmarks/bench_grid.py
    python benchmarks/bench_grid.py --source random --repeats 1
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

import drm_jax
from _common import drm_jax_source, interleaved_best, table, verdict, write_results
from real_deltas import minilm_tree

try:
    from jax._src.dispatch import BACKEND_COMPILE_EVENT
except ImportError:  # the name as of jax 0.10
    BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

DROP_RATES = (0.5, 0.7, 0.8, 0.9, 0.95)
LAMBDAS = (0.5, 1.0, 1.5)


class CompileCounter:
    """Counts XLA backend compilations (and their seconds) while active."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0

    def __call__(self, event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1
            self.seconds += duration

    def __enter__(self):
        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--source", choices=("auto", "real", "random"), default="auto")
    args = parser.parse_args()
    if not hasattr(drm_jax, "prepare"):
        print(f"error: drm_jax.prepare is not in this drm_jax ({drm_jax_source()}); the grid benchmark needs it",
              file=sys.stderr)
        return 2

    base, models, what = minilm_tree(args.k, args.source)
    print(f"{what}; K = {len(models)}", flush=True)

    def one_merge():
        return jax.block_until_ready(
            drm_jax.merge(base, models, method="drm", direction="horizontal", drop_rate=0.8))

    prepare_times = []

    def grid():
        start = time.perf_counter()
        prepared = drm_jax.prepare(base, models, method="drm", direction="horizontal")
        try:  # where Prepared is a pytree of arrays, wait for them (else prepare returned when done)
            jax.block_until_ready(prepared)
        except Exception:  # noqa: BLE001
            pass
        prepare_times.append(time.perf_counter() - start)
        for p in DROP_RATES:
            for lam in LAMBDAS:
                jax.block_until_ready(prepared.merge(drop_rate=p, lambda_=lam))

    counter = CompileCounter()
    with counter:
        start = time.perf_counter()
        one_merge()
        cold = time.perf_counter() - start
    compiles_cold, compile_s_cold = counter.count, counter.seconds
    print(f"cold merge {cold:.1f} s ({compiles_cold} compilations, {compile_s_cold:.1f} s)", flush=True)

    compiles = {"merge": 0, "grid": 0}

    def counted(name, fn):
        def run():
            with counter:
                fn()
            compiles[name] += counter.count
        return run

    # timed after the cold merge only: the grid's first run is timed too, so a compilation it needs shows
    t = interleaved_best({"merge": counted("merge", one_merge), "grid": counted("grid", grid)}, args.repeats)
    compiles_warm, compiles_grid = compiles["merge"], compiles["grid"]
    ratio = t["grid"] / t["merge"]
    n = len(DROP_RATES) * len(LAMBDAS)
    prep = min(prepare_times)
    rows = [
        ["one warm drm_jax.merge (decomposition + merge)", f"{t['merge']:.2f}", "1.00x", f"{compiles_warm}"],
        [f"prepare + {n} prepared.merge (grid)", f"{t['grid']:.2f}", f"{ratio:.2f}x", f"{compiles_grid}"],
        ["  of which prepare", f"{prep:.2f}", f"{prep / t['merge']:.2f}x", ""],
        [f"  of which one prepared.merge (mean of {n})", f"{(t['grid'] - prep) / n:.3f}",
         f"{(t['grid'] - prep) / n / t['merge']:.3f}x", ""],
        ["first (cold) drm_jax.merge in this process", f"{cold:.2f}", f"{cold / t['merge']:.2f}x",
         f"{compiles_cold} ({compile_s_cold:.1f} s compiling)"],
    ]
    time_ok, compile_ok = ratio <= 2.0, compiles_grid == 0
    body = [
        f"Inputs: {what}; K = {len(models)}, float32, DRM-H. Grid: drop rates {list(DROP_RATES)} x lambdas "
        f"{list(LAMBDAS)}. Best of {args.repeats}, one merge and the grid interleaved in one process after one cold "
        f"merge; compilations are summed over the {args.repeats} timed runs of each. The grid "
        f"time includes `drm_jax.prepare`. Compilations: XLA backend compiles counted with a jax.monitoring "
        f"listener on `{BACKEND_COMPILE_EVENT}`. Work that `prepare` defers to the first merge counts under 'one "
        f"prepared.merge'.",
        "",
        *table(["what", "time (s)", "x one warm merge", "compilations"], rows, "lrrl"),
        "",
        "Goals (issue 12):",
        f"- grid at most 2x one warm merge: {ratio:.2f}x, {verdict(time_ok)}.",
        f"- the grid compiles nothing new after one merge: {compiles_grid} compilations, "
        f"{verdict(compile_ok)}.",
    ]
    path = write_results("grid", "Grid of drop rates x lambdas after prepare, against one warm merge", body)
    print("\n".join(body))
    print(f"\nwrote {path}")
    return 0 if time_ok and compile_ok else 1


if __name__ == "__main__":
    sys.exit(main())
