"""What a new user waits for and pays in memory (issue 27, point 6), against mergekit 0.1.5.

Three parts, each skippable (`--parts`):

  * cold: `drm-jax merge` with TIES of a tiny 4-layer Llama (random weights from a transformers
    LlamaConfig, safetensors) and of bench_streaming.py's Llama-shaped files, each run a fresh process:
    first with an EMPTY compilation cache (DRM_JAX_CACHE_DIR pointed at a new folder), then again with the
    cache that run left (warm), against `mergekit-yaml` on the same config run twice. Our runs go through a
    small wrapper that also reports the import time, the XLA compilations (count and seconds, from a
    jax.monitoring listener) and persistent-cache hits of the run. Goal: cold no slower than mergekit-yaml.
  * memory: with `--max-memory 1GB`, the peak RSS (`/usr/bin/time -v`) of streaming merges of
    bench_streaming.py's files (a base and five fine-tuned models of 322 MB at full size) for each method
    family, against the budget plus the process's own footprint before the first tensor is read (RSS after
    importing drm_jax's command line and jax, starting the CPU backend and opening every file's header,
    measured in a fresh process). Goal: peak <= budget + footprint for every method.
  * inmem: `drm_jax.merge(method="linear")` on numpy inputs (and on JAX arrays) against mergekit's
    in-memory `merge_state_dicts` on torch tensors sharing the same memory, MiniLM-shaped tree, K = 6
    (bench_merge.py's calls; real checkpoints when cached); and bench_grid.py's DRM-H 5 x 3 grid after
    `drm_jax.prepare` against one warm merge. Goals: linear on numpy within 1.5x of mergekit, grid at most
    2x one warm merge.

    python benchmarks/bench_first_hour.py --write                     # full run (about 2 GB in --workdir)
    python benchmarks/bench_first_hour.py --small                     # small sizes: a run of a few minutes
    python benchmarks/bench_first_hour.py --parts cold --skip-streaming-shapes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

from _common import interleaved_best, table, verdict, write_results

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20

# the tiny model of the cold start: 4 layers, as a user's first try
TINY = dict(hidden=64, intermediate=176, heads=4, layers=4, vocab=1000, models=3)
# bench_streaming.py's Llama-shaped files (322 MB each in float32), and a small stand-in for --small
STREAMING = dict(hidden=1024, intermediate=2816, heads=16, layers=5, vocab=8000, models=5)
SMALL_STREAMING = dict(hidden=256, intermediate=704, heads=8, layers=3, vocab=2000, models=5)

# method -> (uses the base, number of models (None: all), global parameters, per-model parameters)
MEMORY_METHODS = {
    "linear": (False, None, "{normalize: true}", "weight: {w}"),
    "task_arithmetic": (True, None, "{lambda: 1.0}", "weight: {w}"),
    "ties": (True, None, "{normalize: true}", "weight: {w}, density: 0.3"),
    "dare_ties": (True, None, "{normalize: true, seed: 0}", "weight: {w}, density: 0.3"),
    "della": (True, None, "{lambda: 1.0, seed: 0}", "weight: {w}, density: 0.5, epsilon: 0.1"),
    "breadcrumbs": (True, None, "{lambda: 1.0}", "weight: {w}, density: 0.8, gamma: 0.02"),
    "drm": (True, None, "{drop_rate: 0.8}", "weight: {w}"),
    "model_stock": (True, None, "{filter_wise: false}", ""),
    "wudi": (True, None, "{iter_num: 5, learning_rate: 1.0e-5}", ""),
    "slerp": (True, 1, "{t: 0.4}", ""),
    "karcher": (False, None, "{max_iter: 10, tol: 1.0e-5}", ""),
}

WRAPPER = textwrap.dedent("""
    import json, sys, time
    start = time.perf_counter()
    import jax
    from drm_jax.cli.main import main
    imported = time.perf_counter()
    stats = {"compiles": 0, "compile_s": 0.0, "cache_hits": 0}
    def on_duration(event, duration, **kw):
        if event.endswith("backend_compile_duration"):
            stats["compiles"] += 1
            stats["compile_s"] += duration
    def on_event(event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            stats["cache_hits"] += 1
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    rc = main(sys.argv[2:])
    stats.update(import_s=imported - start, run_s=time.perf_counter() - imported, rc=rc)
    open(sys.argv[1], "w").write(json.dumps(stats))
    sys.exit(rc)
""")

FOOTPRINT = textwrap.dedent("""
    import json, sys
    import jax
    from drm_jax.cli.main import main
    from safetensors import safe_open
    jax.devices()
    names = 0
    for path in sys.argv[1:]:
        with safe_open(path, "np") as f:
            names += len(list(f.keys()))
    rss = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in open("/proc/self/status"))
           if k in ("VmRSS", "VmHWM")}
    print(json.dumps(rss))
""")


def streaming_module():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_streaming

    return bench_streaming


def shape_dir(workdir: Path, shape: dict) -> Path:
    """One folder of checkpoints per shape, shared by the parts (with --keep, by later runs too)."""
    return workdir / "llama_{hidden}_{intermediate}_{layers}_{vocab}_{models}".format(**shape)


def checkpoints(workdir: Path, shape: dict) -> list[Path]:
    """A base and shape["models"] fine-tuned Llama checkpoints (bench_streaming's generator)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return streaming_module().write_checkpoints(workdir, SimpleNamespace(**shape))


def ours_command(config: Path, out: Path, stats: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-c", WRAPPER, str(stats), "merge", str(config), str(out), "--force", "--quiet", *extra]


def mergekit_command(config: Path, out: Path) -> list[str]:
    return [shutil.which("mergekit-yaml") or "mergekit-yaml", str(config), str(out), "--quiet", "--no-cuda",
            "--no-copy-tokenizer", "--no-write-model-card"]


def run_ours(config: Path, out: Path, env: dict, cwd: Path, extra: list[str] = ()) -> tuple[float, float, dict]:
    """(peak RSS, wall seconds, the wrapper's stats) of one `drm-jax merge` in a fresh process."""
    measure = streaming_module().measure
    stats = cwd / f"stats_{out.name}.json"
    peak, wall = measure(ours_command(config, out, stats, list(extra)), env, cwd)
    result = json.loads(stats.read_text())
    stats.unlink()
    return peak, wall, result


def compiled(stats: dict) -> int:
    """Programs XLA compiled in the run: JAX reports a program read from the persistent cache as a backend
    compile too (of a fraction of the time), and as a cache hit."""
    return stats["compiles"] - stats["cache_hits"]


def part_cold(args, env: dict) -> tuple[list[str], bool]:
    bench_streaming = streaming_module()
    shapes = [("tiny 4-layer Llama", TINY)]
    if not args.skip_streaming_shapes:
        shapes.append(("bench_streaming's Llama-shaped files" if not args.small else "small Llama-shaped files",
                       SMALL_STREAMING if args.small else STREAMING))
    rows, goal_lines, ok_all = [], [], True
    for label, shape in shapes:
        workdir = shape_dir(args.workdir, shape)
        dirs = checkpoints(workdir, shape)
        size = (dirs[0] / "model.safetensors").stat().st_size
        config = workdir / "cold_ties.yaml"
        config.write_text(bench_streaming.merge_config("ties", dirs))
        cache = Path(tempfile.mkdtemp(prefix="drm_jax_cold_cache_", dir=args.workdir))
        run_env = {**env, "DRM_JAX_CACHE_DIR": str(cache)}
        measure = bench_streaming.measure
        times = {}
        # mergekit first: it pays the page cache's first read of the files, if anyone does
        _, times["mergekit cold"] = measure(mergekit_command(config, workdir / "cold_mk_out"), env, workdir)
        _, times["ours cold"], cold = run_ours(config, workdir / "cold_out", run_env, workdir)
        _, times["ours warm"], warm = run_ours(config, workdir / "cold_out", run_env, workdir)
        _, times["mergekit warm"] = measure(mergekit_command(config, workdir / "cold_mk_out"), env, workdir)
        shutil.rmtree(cache, ignore_errors=True)
        for d in ("cold_out", "cold_mk_out"):
            shutil.rmtree(workdir / d, ignore_errors=True)
        what = f"{label} ({shape['models']} models + base, {size / 1e6:.1f} MB each)"
        for run, stats in (("cold", cold), ("warm", warm)):
            rows.append([what, f"drm-jax merge, {run} compile cache", f"{times['ours ' + run]:.1f}",
                         f"{stats['import_s']:.1f}", f"{compiled(stats)} ({stats['compile_s']:.1f} s)",
                         str(stats["cache_hits"]), f"{times['ours ' + run] / times['mergekit ' + run]:.2f}x"])
        for run in ("cold", "warm"):
            rows.append([what, f"mergekit-yaml, run {1 if run == 'cold' else 2}", f"{times['mergekit ' + run]:.1f}",
                         "", "", "", "1.00x"])
        ratio = times["ours cold"] / times["mergekit cold"]
        ok = ratio <= 1.0
        ok_all &= ok
        goal_lines.append(f"- {label}: cold drm-jax merge no slower than mergekit-yaml: {ratio:.2f}x, {verdict(ok)}.")
        print(f"cold {label}: ours cold {times['ours cold']:.1f} s ({compiled(cold)} compiles, "
              f"{cold['compile_s']:.1f} s; imports {cold['import_s']:.1f} s), warm {times['ours warm']:.1f} s; "
              f"mergekit {times['mergekit cold']:.1f} / {times['mergekit warm']:.1f} s", flush=True)
    body = [
        "## Cold start: drm-jax merge (TIES) against mergekit-yaml", "",
        "Each run a fresh process, wall time from start to exit. `cold`: DRM_JAX_CACHE_DIR points at a new, empty "
        "folder; `warm`: the same folder again, holding what the cold run compiled. Imports: `import jax` and "
        "drm_jax's command line. Compilations: programs XLA compiled in the run, and the seconds spent "
        "compiling or reading programs from the cache; cache hits: programs read from the cache. Ratio: drm-jax / mergekit-yaml for the same run (first or second).", "",
        *table(["models", "run", "wall (s)", "imports (s)", "compilations", "cache hits", "ratio"], rows, "llrrrrr"),
        "", "Goals (issue 27):", *goal_lines,
    ]
    return body, ok_all


def method_config(method: str, dirs: list[Path]) -> str:
    uses_base, count, params, per_model = MEMORY_METHODS[method]
    models = dirs[1:1 + count] if count else dirs[1:]
    if method == "slerp":
        models = [dirs[0], *models]
    w = 1.0 / len(models)
    lines = [f"merge_method: {method}"] + ([f"base_model: {dirs[0]}"] if uses_base else []) + ["models:"]
    for d in models:
        lines.append(f"  - model: {d}" + (f"\n    parameters: {{{per_model.format(w=f'{w:.6f}')}}}" if per_model else ""))
    return "\n".join([*lines, f"parameters: {params}", "dtype: float32", ""])


def part_memory(args, env: dict) -> tuple[list[str], bool]:
    from drm_jax.config.merge import parse_size

    shape = SMALL_STREAMING if args.small else STREAMING
    workdir = shape_dir(args.workdir, shape)
    dirs = checkpoints(workdir, shape)
    size = (dirs[0] / "model.safetensors").stat().st_size
    files = [str(d / "model.safetensors") for d in dirs]
    footprint = json.loads(subprocess.run([sys.executable, "-c", FOOTPRINT, *files], env=env, cwd=workdir,
                                          capture_output=True, text=True, check=True).stdout)["VmRSS"]
    budget = parse_size(args.max_memory)
    bound = budget + footprint
    print(f"memory: footprint before the first tensor {footprint / MIB:.0f} MiB; budget {budget / MIB:.0f} MiB; "
          f"bound {bound / MIB:.0f} MiB", flush=True)
    cache = workdir / "xla_cache"  # warm after the first run of each method: memory, not compile time
    run_env = {**env, "DRM_JAX_CACHE_DIR": str(cache)}
    rows, bad = [], []
    for method in args.methods:
        config = workdir / f"{method}.yaml"
        config.write_text(method_config(method, dirs))
        try:
            peak, wall, stats = run_ours(config, workdir / "out", run_env, workdir, ["--max-memory", args.max_memory])
        except RuntimeError as err:
            rows.append([method, "failed", "", "", str(err).strip().splitlines()[-1][:160]])
            bad.append(method)
            continue
        finally:
            shutil.rmtree(workdir / "out", ignore_errors=True)
        ok = peak <= bound
        if not ok:
            bad.append(method)
        rows.append([method, f"{peak / MIB:.0f}", f"{(peak - footprint) / MIB:.0f}", f"{wall:.1f}",
                     verdict(ok)])
        print(f"memory {method:16s} peak {peak / MIB:6.0f} MiB  above footprint {(peak - footprint) / MIB:6.0f} MiB  "
              f"{wall:6.1f} s  {verdict(ok)}", flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    body = [
        f"## Memory budget: `drm-jax merge --max-memory {args.max_memory}`", "",
        f"A base and {shape['models']} fine-tuned Llama-shaped float32 checkpoints (bench_streaming.py's generator: "
        f"hidden {shape['hidden']}, MLP {shape['intermediate']}, {shape['layers']} layers, vocabulary {shape['vocab']}) of "
        f"{size / 1e6:.0f} MB each; slerp merges the base with the first model, linear and karcher the fine-tuned "
        f"models, the others the fine-tuned models over the base. Each run a fresh process; peak RSS from "
        f"`/usr/bin/time -v`. The process's own footprint before the first tensor is read (a fresh process: "
        f"`import jax`, drm_jax's command line, the CPU backend started, every file's header opened): "
        f"{footprint / MIB:.0f} MiB. Bound = budget ({budget / MIB:.0f} MiB) + footprint = {bound / MIB:.0f} MiB.", "",
        *table(["method", "peak RSS (MiB)", "above footprint (MiB)", "wall (s)", "peak <= bound"], rows, "lrrrl"),
        "", "Goal (issue 27): peak RSS within the budget plus the footprint for every method: "
            + (verdict(True) + "." if not bad else f"{verdict(False)} ({', '.join(bad)})."),
    ]
    return body, not bad


def part_inmem(args) -> tuple[list[str], bool]:
    import jax
    import torch

    import drm_jax
    from bench_merge import mergekit_call, ours_call
    from real_deltas import minilm_tree

    base, models, what = minilm_tree(args.k, args.source)
    base_t = {n: torch.from_numpy(v) for n, v in base.items()}
    models_t = [{n: torch.from_numpy(v) for n, v in m.items()} for m in models]
    base_j = {n: jax.device_put(v) for n, v in base.items()}
    models_j = [{n: jax.device_put(v) for n, v in m.items()} for m in models]
    fns = {"numpy": ours_call("linear", base, models), "jax": ours_call("linear", base_j, models_j),
           "mergekit": mergekit_call("linear", base_t, models_t)}
    for fn in fns.values():
        fn()
    t = interleaved_best(fns, args.repeats)
    r_np, r_j = t["numpy"] / t["mergekit"], t["jax"] / t["mergekit"]
    print(f"inmem linear: numpy {t['numpy']:.3f} s, jax {t['jax']:.3f} s, mergekit {t['mergekit']:.3f} s "
          f"({r_np:.2f}x, {r_j:.2f}x)", flush=True)

    def one_merge():
        return jax.block_until_ready(drm_jax.merge(base, models, method="drm", direction="horizontal", drop_rate=0.8))

    def grid():
        prepared = drm_jax.prepare(base, models, method="drm", direction="horizontal")
        for p in (0.5, 0.7, 0.8, 0.9, 0.95):
            for lam in (0.5, 1.0, 1.5):
                jax.block_until_ready(prepared.merge(drop_rate=p, lambda_=lam))

    ok_np, ok_grid, grid_rows = r_np <= 1.5, True, []
    if not args.skip_grid:
        one_merge()
        grid()
        g = interleaved_best({"merge": one_merge, "grid": grid}, args.repeats)
        r_grid = g["grid"] / g["merge"]
        ok_grid = r_grid <= 2.0
        print(f"inmem grid: one merge {g['merge']:.2f} s, grid {g['grid']:.2f} s ({r_grid:.2f}x)", flush=True)
        grid_rows = [["DRM-H, one warm drm_jax.merge", f"{g['merge']:.2f}", "1.00x"],
                     ["DRM-H, prepare + 15 prepared.merge", f"{g['grid']:.2f}", f"{r_grid:.2f}x one merge"]]
    k = len(models)
    body = [
        "## In memory: drm_jax.merge against mergekit's merge_state_dicts", "",
        f"Inputs: {what}; K = {k}, float32. Warm times (after one warm-up call), best of {args.repeats}, interleaved "
        "in one process. Linear: the average of the K models (bench_merge.py's calls); mergekit gets torch tensors "
        "sharing the numpy arrays' memory. Grid: bench_grid.py's DRM-H grid (`drm_jax.prepare` + 5 drop rates x 3 "
        "lambdas) against one warm `drm_jax.merge`.", "",
        *table(["what", "time (s)", "ratio"], [
            ["linear, drm_jax.merge on numpy arrays", f"{t['numpy']:.3f}", f"{r_np:.2f}x mergekit"],
            ["linear, drm_jax.merge on JAX arrays", f"{t['jax']:.3f}", f"{r_j:.2f}x mergekit"],
            ["linear, mergekit merge_state_dicts (torch tensors)", f"{t['mergekit']:.3f}", "1.00x"],
            *grid_rows,
        ], "lrr"),
        "", "Goals (issue 27):",
        f"- linear on numpy inputs within 1.5x of mergekit: {r_np:.2f}x, {verdict(ok_np)}.",
        *([f"- the 5 x 3 grid after prepare at most 2x one warm merge: {r_grid:.2f}x, {verdict(ok_grid)}."]
          if grid_rows else []),
    ]
    return body, ok_np and ok_grid


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} at the end of the run, on {os.cpu_count()} cores"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("cold", "memory", "inmem"), default=["cold", "memory", "inmem"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/drm_jax_bench_first_hour"))
    parser.add_argument("--small", action="store_true", help="small Llama-shaped files (a quick run)")
    parser.add_argument("--skip-streaming-shapes", action="store_true", help="cold start on the tiny model only")
    parser.add_argument("--methods", nargs="+", choices=sorted(MEMORY_METHODS), default=list(MEMORY_METHODS))
    parser.add_argument("--max-memory", default="1GB")
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--source", choices=("auto", "real", "random"), default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-grid", action="store_true", help="in memory: linear only, no DRM grid")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    parser.add_argument("--write", action="store_true", help="write benchmarks/RESULTS_first_hour.md")
    args = parser.parse_args()

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    args.workdir.mkdir(parents=True, exist_ok=True)
    body, ok = [], True
    try:
        for part in args.parts:
            section, part_ok = {"cold": lambda: part_cold(args, env), "memory": lambda: part_memory(args, env),
                                "inmem": lambda: part_inmem(args)}[part]()
            body += [*section, ""]
            ok &= part_ok
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    body.append(f"Machine load: {load_note()}.")
    print("\n".join(body))
    if args.write:
        path = write_results("first_hour", "The first hour: cold start, memory budget and in-memory merges "
                             "against mergekit", body)
        print(f"\nwrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
