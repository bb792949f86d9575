"""The sharded merge path against the single-device path, in the same process.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_shard.py

On a CPU the eight forced host devices share the same cores, so the point here is correctness (the
sharded result equals the single-device one) and that the compiled program has no collective; the
speed column is reported as measured, not as a claim. On a machine with 8 real devices (GPU/TPU) the
same script shows the scaling.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from jax.sharding import Mesh

import drm_jax
from drm_jax.engine import shard
from drm_jax.engine.prepare import rules_for, x64_scope
from drm_jax.methods.registry import get_method, static_values, traced_values


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    devices = jax.devices()
    print(f"jax {jax.__version__}: {len(devices)} {devices[0].platform} devices\n")
    mesh = Mesh(np.array(devices), ("layers",))
    rng = np.random.default_rng(0)
    shape = (args.dim, args.dim)
    base = {f"layers.{i}.w": rng.standard_normal(shape).astype(np.float32) for i in range(args.layers)}
    models = [{n: v + 0.1 * rng.standard_normal(shape).astype(np.float32) for n, v in base.items()}
              for _ in range(args.k)]
    print("| method | layers | devices | single device (s) | sharded (s) | ratio | max rel. error | collectives in HLO |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for method in ("drm", "ties"):
        single = lambda: list(drm_jax.merge(base, models, method=method).values())
        sharded = lambda: list(drm_jax.merge(base, models, method=method, mesh=mesh).values())
        a, b = single(), sharded()
        err = max(float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / np.linalg.norm(np.asarray(x)))
                  for x, y in zip(a, b))
        t1, t8 = best_of(single, args.repeats), best_of(sharded, args.repeats)
        spec = get_method(method)
        static = static_values(spec, {})
        numbers = spec.layer_hparams(traced_values(spec, {}), "linear", shape, args.k, static)
        with x64_scope(rules_for(spec, static).linear):  # DRM decomposes in float64 on CPU
            texts = shard.compiled_texts(mesh, rules_for(spec, static).linear, numbers,
                                         shard.padded_length(args.layers, mesh), shape, args.k)
        hlo = "\n".join(texts)  # the programs drm_jax.merge(mesh=...) runs: prepare, then merge
        found = [c for c in ("all-gather", "all-reduce", "all-to-all", "collective-permute") if c in hlo]
        print(f"| {method} | {args.layers} | {len(devices)} | {t1:.2f} | {t8:.2f} | {t1 / t8:.2f}x | {err:.1e} | "
              f"{', '.join(found) or 'none'} |", flush=True)


if __name__ == "__main__":
    main()
