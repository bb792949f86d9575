"""DRM speed against the reference implementation's way: a PyTorch float32 loop, one dense SVD per matrix.

For every linear-weight shape of T5-small and T5-base, K task deltas are merged with DRM-H and DRM-V by
  * torch: DRM written per matrix in PyTorch float32 (torch.linalg.svd, kthvalue pruning), as the
    reference implementation does it, one matrix after the other;
  * drm_jax: `drm_jax.merge` of the stacked layers (after a warm-up compile).
Both run in this process on the same CPU, interleaved; the table gives the best of `--repeats` runs, the
ratio torch / drm_jax, and the relative Frobenius error between the two merged deltas. Inputs have well
separated singular values above DRM's 1% cut (a geometric spectrum) plus a noise floor below it, so the
two implementations must agree: otherwise pruning near the threshold is decided by rounding.

Also: how the time grows with K and with the number of stacked layers.

Issue 12's comparison (sections `minilm` and `spiky`): DRM-H and DRM-V through the public API,
`drm_jax.merge(base, models, method="drm", direction=...)` warm, against the same per-matrix PyTorch
float32 loop over the same weights, on
  * minilm: the real fine-tuning deltas of the main job (benchmarks/real_deltas.py: every 2-D linear
    weight of the all-MiniLM-L6-v2 encoder, embeddings excluded, K = 6 tasks), and
  * spiky: synthetic spiky spectra over a full-rank bulk on the same shapes (a few singular values ~30x
    above a flat full-rank bulk: condition number ~30, every triplet above the 1% cut);
and the float32 error of each against the float64 NumPy reference DRM of tests/merge_reference.py: the
relative Frobenius error of each matrix's merged delta, median and max over matrices. Goals: drm_jax at
least 3x faster than the loop, with a median error no larger than the loop's. Where `drm_jax.merge`
accepts `precision=`, the default ("auto") and precision="float32" rows are both given.

    python benchmarks/bench_drm.py                 # every section; tables also to benchmarks/RESULTS_drm.md
    python benchmarks/bench_drm.py --sections minilm spiky
    python benchmarks/bench_drm.py --quick         # small shapes only, for a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np
import torch

import drm_jax
from _common import REPO, interleaved_best, table, verdict, write_results
from real_deltas import MINILM, MissingCheckpoints, is_encoder_linear, load
from torch_drm import torch_drm

sys.path.insert(0, str(REPO / "tests"))
import merge_reference  # noqa: E402  (the float64 NumPy reference DRM the core tests check against)

SECTIONS = ("t5", "fullrank", "growth", "minilm", "spiky")

# (name, d_model, d_ff, encoder layers, decoder layers)
T5 = {"t5-small": (512, 2048, 6, 6), "t5-base": (768, 3072, 12, 12)}


def t5_linear_shapes(d_model: int, d_ff: int, enc: int, dec: int) -> dict[tuple[int, int], int]:
    """(out, in) shape -> number of such matrices in the model (T5 v1.0: attention has no bias)."""
    attn = enc * 4 + dec * 8  # q, k, v, o; decoder self + cross
    return {(d_model, d_model): attn, (d_ff, d_model): enc + dec, (d_model, d_ff): enc + dec}


def well_separated_deltas(rng, k, n, m, rank=8, noise=1e-3):
    """K deltas whose side-by-side stack has `rank` singular values 1 ... 0.03 (each 0.6 of the one before)
    and a noise floor far below the 1% cut.

    Well separated, because two float32 implementations only agree where the singular vectors are
    determined to float32 accuracy; even then an entry within rounding of the pruning threshold can be
    kept by one and dropped by the other (one such flip moves the result by ~1e-2), which is rarer the
    fewer entries sit above the rank cut.
    """
    s = np.geomspace(1.0, 0.6 ** (rank - 1), rank)
    u, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    w, _ = np.linalg.qr(rng.standard_normal((k * m, rank)))
    stacked = (u * s) @ w.T
    stacked += noise * rng.standard_normal(stacked.shape) / np.sqrt(max(n, k * m))
    return np.stack(np.split(stacked, k, axis=1)).astype(np.float32)  # (K, n, m)


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def stacked_merge(deltas: np.ndarray, direction: str = "horizontal"):
    """drm_jax.merge over a tree of `layers` same-shaped matrices (zero base): a call returning (L, n, m)."""
    names = [f"encoder.layer.{i}.dense.weight" for i in range(deltas.shape[0])]
    base = {n: np.zeros(deltas.shape[2:], np.float32) for n in names}
    models = [{n: deltas[i, t] for i, n in enumerate(names)} for t in range(deltas.shape[1])]

    def run():
        merged = jax.block_until_ready(drm_jax.merge(base, models, method="drm", direction=direction, drop_rate=0.8))
        return np.stack([np.asarray(merged[n]) for n in names])
    return run


def compare(n, m, k, layers, direction, repeats, seed=0, full_rank=False):
    rng = np.random.default_rng(seed)
    if full_rank:  # Gaussian deltas: every triplet is above the cut, no truncation helps
        deltas = (rng.standard_normal((layers, k, n, m)) / np.sqrt(n)).astype(np.float32)
    elif direction == "horizontal":
        deltas = np.stack([well_separated_deltas(rng, k, n, m) for _ in range(layers)])  # (L, K, n, m)
    else:  # the vertical stack of D_t is the horizontal stack of D_t^T, transposed
        deltas = np.stack([well_separated_deltas(rng, k, m, n).transpose(0, 2, 1) for _ in range(layers)])
    ours = stacked_merge(deltas, direction)
    ours()  # compile
    torch_in = [torch.from_numpy(d) for d in deltas]
    vertical = direction == "vertical"
    theirs = lambda: [torch_drm(d, vertical=vertical) for d in torch_in]
    t = interleaved_best({"ours": ours, "torch": theirs}, repeats)
    got = ours().astype(np.float64)
    want = np.stack([t.numpy() for t in theirs()]).astype(np.float64)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    return t["torch"], t["ours"], err


def minilm_shapes(layers: int) -> dict[str, tuple[int, int]]:
    """HF names and (out, in) shapes of the encoder linear weights of all-MiniLM-L6-v2's first `layers` layers."""
    h, f = MINILM["hidden_size"], MINILM["intermediate_size"]
    shapes = {}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        shapes.update({p + f"attention.self.{n}.weight": (h, h) for n in ("query", "key", "value")})
        shapes.update({p + "attention.output.dense.weight": (h, h), p + "intermediate.dense.weight": (f, h),
                       p + "output.dense.weight": (h, f)})
    return shapes


def spiky_deltas(rng, k, n, m, direction, spikes=4, ratio=30.0, scale=1e-3):
    """(K, n, m) deltas whose joint stack (side by side for DRM-H, on top of each other for DRM-V) is full
    rank with `spikes` singular values ~`ratio` times a flat bulk (condition number ~`ratio`)."""
    rows, cols = (n, k * m) if direction == "horizontal" else (k * n, m)
    r = min(rows, cols)
    s = 1.0 + 0.05 * rng.standard_normal(r)
    s[:spikes] = ratio * (1.0 + 0.05 * rng.standard_normal(spikes))
    u, _ = np.linalg.qr(rng.standard_normal((rows, r)))
    w, _ = np.linalg.qr(rng.standard_normal((cols, r)))
    stacked = scale * (u * s) @ w.T
    parts = np.split(stacked, k, axis=1 if direction == "horizontal" else 0)
    return np.stack(parts).astype(np.float32)


def reference(deltas: np.ndarray, direction: str) -> np.ndarray:
    fn = merge_reference.drm_h if direction == "horizontal" else merge_reference.drm_v
    return fn(deltas, drop_rate=0.8)


def rel_errors(got: dict, want: dict) -> np.ndarray:
    return np.array([np.linalg.norm(got[n] - want[n]) / np.linalg.norm(want[n]) for n in want])


_PRECISIONS: list = []


def precision_variants(base, models) -> list[str | None]:
    """[None] (the default), plus "float32" where drm_jax.merge accepts a `precision` parameter."""
    if _PRECISIONS:
        return _PRECISIONS
    _PRECISIONS.extend(_try_precision(base, models))
    return _PRECISIONS


def _try_precision(base, models) -> list[str | None]:
    small = {n: v for n, v in list(base.items())[:1]}
    try:
        drm_jax.merge(small, [{n: m[n] for n in small} for m in models], method="drm", precision="float32")
    except (TypeError, ValueError, drm_jax.DrmJaxError) as err:
        print(f"note: drm_jax.merge(precision=...) not accepted ({type(err).__name__}: {err}); default only",
              file=sys.stderr)
        return [None]
    return [None, "float32"]


def api_compare(label, base, models, deltas, direction, repeats, precision, want):
    """One row: warm drm_jax.merge vs the torch loop on the same weights, both against `want` (float64 NumPy)."""
    kwargs = {} if precision is None else {"precision": precision}
    ours = lambda: jax.block_until_ready(
        drm_jax.merge(base, models, method="drm", direction=direction, drop_rate=0.8, **kwargs))
    torch_in = {n: torch.from_numpy(d) for n, d in deltas.items()}
    vertical = direction == "vertical"
    theirs = lambda: {n: torch_drm(d, vertical=vertical) for n, d in torch_in.items()}
    merged = ours()  # compile
    got = {n: np.asarray(merged[n], np.float64) - base[n].astype(np.float64) for n in deltas}
    t = interleaved_best({"torch": theirs, "ours": ours}, repeats)
    e_ours = rel_errors(got, want)
    e_torch = rel_errors({n: v.numpy().astype(np.float64) for n, v in theirs().items()}, want)
    speedup = t["torch"] / t["ours"]
    ok = speedup >= 3.0 and np.median(e_ours) <= np.median(e_torch)
    row = [label, f"{len(deltas)}", direction, precision or "default", f"{t['torch']:.2f}", f"{t['ours']:.2f}",
           f"{speedup:.2f}x", f"{np.median(e_torch):.2e} / {e_torch.max():.2e}",
           f"{np.median(e_ours):.2e} / {e_ours.max():.2e}", verdict(ok)]
    print("| " + " | ".join(row) + " |", flush=True)
    return row, ok


def issue_sections(args, sections) -> list[str]:
    """Issue 12's DRM comparison on real MiniLM deltas and on spiky full-rank spectra."""
    trees = []
    if "minilm" in sections:
        try:
            base_all, models_all, tasks = load(args.k)
            names = [n for n, v in base_all.items() if is_encoder_linear(n, v.shape)]
            base = {n: base_all[n] for n in names}
            models = [{n: m[n] for n in names} for m in models_all]
            deltas = {n: np.stack([m[n] - base[n] for m in models]) for n in names}
            trees.append(("MiniLM real deltas", base, models, {"horizontal": deltas, "vertical": deltas},
                          f"real: {len(models)} fine-tuned all-MiniLM-L6-v2 encoders ({', '.join(tasks)})"))
        except MissingCheckpoints as err:
            print(f"note: minilm section skipped: {err}", file=sys.stderr)
    if "spiky" in sections:
        rng = np.random.default_rng(0)
        shapes = minilm_shapes(args.spiky_layers)
        base = {n: (0.02 * rng.standard_normal(shape)).astype(np.float32) for n, shape in shapes.items()}
        per_dir = {}
        for direction in ("horizontal", "vertical"):
            per_dir[direction] = {n: spiky_deltas(rng, args.k, *shape, direction) for n, shape in shapes.items()}
        trees.append(("spiky spectra", base, None, per_dir,
                      f"spiky: MiniLM encoder shapes of {args.spiky_layers} layers, 4 singular values ~30x a "
                      f"flat full-rank bulk"))
    if not trees:
        return []
    print("\nDRM through drm_jax.merge (warm) against the PyTorch float32 per-matrix dense-SVD loop; errors are"
          " relative Frobenius errors of each merged delta against the float64 NumPy reference, median / max"
          " over matrices:\n")
    header = ["inputs", "matrices", "direction", "precision", "torch loop (s)", "drm_jax (s)", "speed-up",
              "torch err (median / max)", "drm_jax err (median / max)", "goal"]
    print("\n".join(table(header, [], "lrllrrrrrl")), flush=True)
    rows, ok_all, notes = [], True, []
    for label, base, models, per_dir, note in trees:
        notes.append(f"- {note}")
        for direction in ("horizontal", "vertical"):
            deltas = per_dir[direction]
            if models is None:  # synthetic: models = base + delta, deltas recomputed in float32 as drm_jax sees them
                models_d = [{n: base[n] + deltas[n][t] for n in base} for t in range(args.k)]
                deltas = {n: np.stack([m[n] - base[n] for m in models_d]) for n in base}
            else:
                models_d = models
            want = {n: reference(d, direction) for n, d in deltas.items()}  # float64, once per direction
            for precision in precision_variants(base, models_d):
                row, ok = api_compare(label, base, models_d, deltas, direction, args.repeats, precision, want)
                rows.append(row)
                ok_all &= ok
    return ["## DRM-H and DRM-V against the PyTorch loop (issue 12)", "",
            f"K = {args.k}, drop rate 0.8, rank cut 1%. Warm times, best of {args.repeats}, torch and drm_jax "
            f"interleaved. Errors: relative Frobenius error of each matrix's merged delta against the float64 "
            f"NumPy reference DRM (tests/merge_reference.py), median / max over matrices. Goal per row: "
            f"speed-up at least 3x and drm_jax's median error no larger than the torch loop's.", "",
            *notes, "", *table(header, rows, "lrllrrrrrl"), "",
            f"Goal (issue 12): {verdict(ok_all)} on every row." if rows else ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--layers", type=int, default=2, help="stacked layers per shape (T5 sections)")
    parser.add_argument("--spiky-layers", type=int, default=2, help="MiniLM layers of spiky synthetic weights")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="T5-small attention shape only")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args()
    sections = set(args.sections)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), K = {args.k}, {args.layers} layers per shape\n")
    t5_sections(args, sections)
    body = issue_sections(args, sections)
    if body:
        path = write_results("drm", "DRM speed and float32 error against the PyTorch loop", body)
        print(f"\nwrote {path}")


def t5_sections(args, sections) -> None:
    if "t5" in sections:
        print("| model | shape (out, in) | direction | torch loop (s) | drm_jax (s) | speed-up | rel. error |")
        print("|---|---|---|---:|---:|---:|---:|")
        models = {"t5-small": T5["t5-small"]} if args.quick else T5
        for name, dims in models.items():
            shapes = t5_linear_shapes(*dims)
            if args.quick:
                shapes = {(dims[0], dims[0]): shapes[(dims[0], dims[0])]}
            total = {"horizontal": [0.0, 0.0], "vertical": [0.0, 0.0]}
            for (n, m), count in shapes.items():
                for direction in ("horizontal", "vertical"):
                    t_torch, t_ours, err = compare(n, m, args.k, args.layers, direction, args.repeats)
                    total[direction][0] += t_torch / args.layers * count
                    total[direction][1] += t_ours / args.layers * count
                    print(f"| {name} | ({n}, {m}) | {direction} | {t_torch:.3f} | {t_ours:.3f} | "
                          f"{t_torch / t_ours:.1f}x | {err:.1e} |", flush=True)
            for direction, (tt, to) in total.items():
                print(f"| {name} | whole model ({sum(shapes.values())} matrices, per-layer times x counts) | "
                      f"{direction} | {tt:.1f} | {to:.1f} | {tt / to:.1f}x | |", flush=True)

    if "fullrank" in sections:
        print("\nFull-rank Gaussian deltas (no triplet falls under the 1% cut, so the whole joint space is"
              " worked on;\nthe error column counts pruning decisions flipped by float32 rounding, see"
              " `well_separated_deltas`):\n")
        print("| shape (out, in) | direction | torch loop (s) | drm_jax (s) | speed-up | rel. error |")
        print("|---|---|---:|---:|---:|---:|")
        for n, m in [(512, 512), (2048, 512)] if not args.quick else [(512, 512)]:
            for direction in ("horizontal", "vertical"):
                t_torch, t_ours, err = compare(n, m, args.k, args.layers, direction, args.repeats, full_rank=True)
                print(f"| ({n}, {m}) | {direction} | {t_torch:.3f} | {t_ours:.3f} | {t_torch / t_ours:.1f}x | {err:.1e} |",
                      flush=True)

    if "growth" in sections:
        print("\nGrowth with K and with stacked layers, (512, 512), DRM-H, drm_jax only:\n")
        print("| K | layers | drm_jax (s) | per layer (s) |")
        print("|---:|---:|---:|---:|")
        for k, layers in [(2, 4), (4, 4), (6, 4), (8, 4), (6, 1), (6, 2), (6, 8)]:
            rng = np.random.default_rng(1)
            ours = stacked_merge(np.stack([well_separated_deltas(rng, k, 512, 512) for _ in range(layers)]))
            ours()  # compile
            t = best_of(ours, args.repeats)
            print(f"| {k} | {layers} | {t:.3f} | {t / layers:.3f} |", flush=True)


if __name__ == "__main__":
    main()
