"""WUDI merging: drm_jax.math.wudi (compiled, vmapped over same-shaped layers) against FusionBench 0.2.33's
`wudi_merging` loop (PyTorch, one matrix after another), on the same CPU and the same task vectors.

Both run Adam at learning rate 1e-5 (FusionBench's fixed value) for `--steps` steps from sum_t tau_t on
every 2-D weight of one transformer layer, K random task vectors per weight (entries N(0, 1e-3^2)):
  * minilm (default): all-MiniLM-L6-v2's layer, q, k, v, o (384 x 384), intermediate (1536 x 384),
    output (384 x 1536), in torch's (out, in) layout;
  * llama (--llama): one Llama-3.1-8B layer, q, o (4096 x 4096), k, v (1024 x 4096), gate, up
    (14336 x 4096), down (4096 x 14336). Large: minutes and tens of GB; run it on a quiet machine.
drm_jax is timed warm (its first call, which compiles one program per shape, is reported apart); the two
are interleaved and the best of `--repeats` kept (benchmarks/_common.py). The difference column is
max |ours - FusionBench| over all weights, relative to max |FusionBench|, and in units of lr * steps (the
furthest Adam can move an entry).

    python benchmarks/bench_learned.py                  # MiniLM layer, K = 4, 50 steps
    python benchmarks/bench_learned.py --steps 400      # FusionBench's configured step count
    python benchmarks/bench_learned.py --llama          # one Llama-3.1-8B-shaped layer
    python benchmarks/bench_learned.py --write          # also to benchmarks/RESULTS_learned.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time

import jax
import numpy as np

from _common import REPO, interleaved_best, table, write_results
from drm_jax.math.wudi import wudi

sys.path.insert(0, str(REPO / "tests"))
from fusion_bench_files import FusionBenchUnavailable, load as load_fusion_bench  # noqa: E402

LEARNING_RATE = 1e-5  # FusionBench's loop has it fixed
MINILM = {"attention.self.query": (384, 384), "attention.self.key": (384, 384), "attention.self.value": (384, 384),
          "attention.output.dense": (384, 384), "intermediate.dense": (1536, 384), "output.dense": (384, 1536)}
LLAMA_8B = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
            "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
            "mlp.down_proj": (4096, 14336)}


def random_task_vectors(shapes: dict[str, tuple[int, int]], k: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (1e-3 * rng.standard_normal((k, *shape), dtype=np.float32)) for name, shape in shapes.items()}


def ours_by_shape(task_vectors: dict[str, np.ndarray], steps: int):
    """A callable merging every weight, one compiled vmapped program per distinct shape, and the compile time."""
    merge = jax.jit(jax.vmap(wudi, in_axes=(0, None, None)))
    groups: dict[tuple, list[str]] = {}
    for name, tv in task_vectors.items():
        groups.setdefault(tv.shape, []).append(name)
    stacks = {shape: jax.device_put(np.stack([task_vectors[n] for n in names])) for shape, names in groups.items()}

    def run() -> dict[str, np.ndarray]:
        merged = {shape: merge(stack, steps, LEARNING_RATE) for shape, stack in stacks.items()}
        out = {}
        for shape, names in groups.items():
            layers = np.asarray(merged[shape])  # waits for the result
            out.update({n: layers[i] for i, n in enumerate(names)})
        return out

    start = time.perf_counter()
    run()
    return run, time.perf_counter() - start


def fusion_bench_runner(fb, task_vectors: dict[str, np.ndarray], steps: int):
    torch = fb.torch
    per_model = [{n: torch.from_numpy(np.ascontiguousarray(tv[t])) for n, tv in task_vectors.items()}
                 for t in range(next(iter(task_vectors.values())).shape[0])]

    def run() -> dict[str, np.ndarray]:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its tqdm lines
            merged = fb.wudi_merging(per_model, accelerator="cpu", iter_num=steps)
        return {n: v.detach().numpy() for n, v in merged.items()}

    return run


def compare(label: str, shapes: dict, k: int, steps: int, repeats: int, fb) -> list[object]:
    task_vectors = random_task_vectors(shapes, k)
    ours, compile_s = ours_by_shape(task_vectors, steps)
    theirs = fusion_bench_runner(fb, task_vectors, steps)
    results = {}

    def timed(name, fn):
        return lambda: results.__setitem__(name, fn())

    best = interleaved_best({"fusion_bench": timed("fusion_bench", theirs), "drm_jax": timed("drm_jax", ours)},
                            repeats)
    diff = max(float(np.abs(results["drm_jax"][n] - results["fusion_bench"][n]).max()) for n in shapes)
    scale = max(float(np.abs(results["fusion_bench"][n]).max()) for n in shapes)
    return [label, k, steps, f"{best['fusion_bench']:.2f}", f"{best['drm_jax']:.3f}", f"{compile_s:.2f}",
            f"{best['fusion_bench'] / best['drm_jax']:.1f}x", f"{diff / scale:.1e}",
            f"{diff / (LEARNING_RATE * steps):.1e}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=4, help="task vectors per weight (default 4)")
    parser.add_argument("--steps", type=int, default=50, help="Adam steps (default 50; FusionBench's config: 400)")
    parser.add_argument("--llama", action="store_true", help="one Llama-3.1-8B-shaped layer instead of MiniLM's")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="also write benchmarks/RESULTS_learned.md")
    args = parser.parse_args()
    try:
        fb = load_fusion_bench()
    except FusionBenchUnavailable as err:
        sys.exit(f"bench_learned: FusionBench's wudi_merging cannot be loaded ({err})")
    fb.torch.set_grad_enabled(True)
    label, shapes = ("Llama-3.1-8B layer (7 weights)", LLAMA_8B) if args.llama else ("MiniLM layer (6 weights)", MINILM)
    row = compare(label, shapes, args.k, args.steps, args.repeats, fb)
    header = ["weights", "K", "steps", "FusionBench loop (s)", "drm_jax warm (s)",
              "drm_jax first call, compiling (s)", "speed-up", "max diff / max |tau|", "max diff / (lr steps)"]
    lines = table(header, [row], "lrrrrrrrr")
    print("\n".join(lines))
    if args.write:
        body = ["WUDI merging, drm_jax against FusionBench 0.2.33's `wudi_merging` loop on the same CPU "
                "(benchmarks/bench_learned.py).", "", *lines]
        print(f"\nwrote {write_results('learned', 'WUDI merging: drm_jax against FusionBench', body)}")


if __name__ == "__main__":
    main()
