"""LoRA adapters merged in factored form against the materialised merge (issue 14).

Five rank-16 LoRA adapters over Llama-3.1-8B-shaped layers (4096 x 4096, the attention projections, and
4096 x 14336, the MLP's down projection), merged with DRM-H:

* factored: `drm_jax.merge_adapters(base, adapters, method="drm")`: the joint space of the factored stack
  (QR of the stacked factors), never an n x m delta; the result is a rank-80 LoRA adapter;
* materialised: the models base + s B A formed, then `drm_jax.merge(base, models, method="drm")`
  (the dense decomposition of the n x K m stack), and the merged deltas taken off the base.

Each runs in its own process (peak memory is the process's peak resident set, `ru_maxrss`, which
includes the inputs: the base weights and the factors, the same in both). Times are wall times of the
merge after one warm-up merge of the same shapes (compilation excluded; `--no-warm` times the first merge
instead), best of `--repeats`. The factored adapter is checked against the materialised merge: relative
Frobenius error of B A against the merged delta, per layer.

    python benchmarks/bench_adapters.py                  # 1 layer of each shape
    python benchmarks/bench_adapters.py --layers 4       # 4 of each
    python benchmarks/bench_adapters.py --dims 1024x1024,1024x3584 --no-warm   # a quick correctness run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, table, write_results  # noqa: E402

DEFAULT_DIMS = "4096x4096,4096x14336"


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024)


def make_inputs(dims, layers: int, k: int, rank: int, seed: int):
    """The base weights (float32) and K adapters {name: (B, A, scale)} with PEFT's shapes and scale 2."""
    rng = np.random.default_rng(seed)
    base, adapters = {}, [{} for _ in range(k)]
    for i in range(layers):
        for n, m in dims:
            name = f"model.layers.{i}.w_{n}x{m}.weight"
            base[name] = (rng.standard_normal((n, m), dtype=np.float32) * 0.02)
            for t in range(k):
                b = rng.standard_normal((n, rank), dtype=np.float32) * 0.01
                a = rng.standard_normal((rank, m), dtype=np.float32) / np.sqrt(m)
                adapters[t][name] = (b, a, 2.0)
    return base, adapters


def child(args) -> None:
    import jax

    import drm_jax

    dims = parse_dims(args.dims)
    base, adapters = make_inputs(dims, args.layers, args.k, args.rank, args.seed)
    rss_inputs = rss_bytes()

    if args.child == "factored":
        def run():
            out = drm_jax.merge_adapters(base, adapters, method="drm", drop_rate=args.drop_rate)
            jax.block_until_ready([(w.b, w.a) for w in out.adapter.values()])
            return out
    else:
        def run():
            models = [{n: base[n] + s * (b @ a) for n, (b, a, s) in adapter.items()} for adapter in adapters]
            merged = drm_jax.merge(base, models, method="drm", drop_rate=args.drop_rate)
            jax.block_until_ready(merged)
            return merged

    if args.warm:
        run()
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    peak = peak_rss_bytes()
    result = {"time": best, "peak": peak, "inputs": rss_inputs}
    if args.child == "factored":
        np.savez(args.exchange, **{f"{n}|b": np.asarray(w.b) for n, w in out.adapter.items()},
                 **{f"{n}|a": np.asarray(w.a) for n, w in out.adapter.items()})
        result["rank"] = max(int(w.b.shape[1]) for w in out.adapter.values())
        result["paths"] = sorted(set(out.paths.values()))
    else:
        factors = np.load(args.exchange)
        errors = {}
        for n in base:
            delta = np.asarray(out[n], np.float64) - base[n]
            got = factors[f"{n}|b"].astype(np.float64) @ factors[f"{n}|a"].astype(np.float64)
            errors[n] = float(np.linalg.norm(got - delta) / np.linalg.norm(delta))
        result["errors"] = errors
    print("RESULT " + json.dumps(result), flush=True)


def parse_dims(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in part.lower().split("x")) for part in text.split(",")]


def run_child(kind: str, args, exchange: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--exchange", str(exchange),
           "--dims", args.dims, "--layers", str(args.layers), "--k", str(args.k), "--rank", str(args.rank),
           "--repeats", str(args.repeats), "--drop-rate", str(args.drop_rate), "--seed", str(args.seed)]
    cmd.append("--warm" if args.warm else "--no-warm")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{kind} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def gb(x: float) -> str:
    return f"{x / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default=DEFAULT_DIMS, help=f"layer shapes (out x in), default {DEFAULT_DIMS}")
    parser.add_argument("--layers", type=int, default=1, help="layers of each shape (default 1)")
    parser.add_argument("--k", type=int, default=5, help="adapters (default 5)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--drop-rate", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                        help="time after one warm-up merge (default); --no-warm times the first merge")
    parser.add_argument("--child", choices=("factored", "materialised"), help=argparse.SUPPRESS)
    parser.add_argument("--exchange", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only, do not write RESULTS_adapters.md")
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        exchange = Path(tmp) / "factors.npz"
        factored = run_child("factored", args, exchange)
        dense = run_child("materialised", args, exchange)

    dims = parse_dims(args.dims)
    n_layers = args.layers * len(dims)
    delta_bytes = sum(n * m * 4 for n, m in dims) * args.layers
    rows = [["factored (merge_adapters)", f"{factored['time']:.2f}", gb(factored["peak"]),
             gb(factored["peak"] - factored["inputs"])],
            ["materialised (base + s B A, drm_jax.merge)", f"{dense['time']:.2f}", gb(dense["peak"]),
             gb(dense["peak"] - dense["inputs"])]]
    errors = list(dense["errors"].values())
    body = [
        f"{args.k} LoRA adapters of rank {args.rank} (scale 2) over {n_layers} layers "
        f"({args.layers} of each of {', '.join(f'{n} x {m}' for n, m in dims)}; the deltas of one model "
        f"{delta_bytes / 2**20:.0f} MiB in float32), DRM-H with drop rate {args.drop_rate}. Each path in its own "
        f"process; time: {'warm (after one warm-up merge), ' if args.warm else 'first merge, compilation included, '}"
        f"best of {args.repeats}; peak: the process's peak resident set (inputs included); working: peak minus "
        f"the resident set once the inputs (base weights and factors) exist.",
        "",
        *table(["path", "time (s)", "peak RSS (GiB)", "working memory (GiB)"], rows),
        "",
        f"Materialised / factored: time {dense['time'] / factored['time']:.1f}x, peak memory "
        f"{dense['peak'] / factored['peak']:.1f}x, working memory "
        f"{(dense['peak'] - dense['inputs']) / max(factored['peak'] - factored['inputs'], 1):.1f}x.",
        "",
        f"The factored result is a rank-{factored['rank']} adapter (paths: {', '.join(factored['paths'])}); its "
        f"B A against the materialised merged delta: relative error max {max(errors):.1e} over the layers.",
    ]
    print("\n".join(body))
    if not args.no_write:
        print(write_results("adapters", "LoRA adapters merged in factored form against the materialised merge", body))


if __name__ == "__main__":
    main()
