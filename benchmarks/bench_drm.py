"""DRM speed against the reference implementation's way: a PyTorch float32 loop, one dense SVD per matrix.

For every linear-weight shape of T5-small and T5-base, K task deltas are merged with DRM-H and DRM-V by
  * torch: DRM written per matrix in PyTorch float32 (torch.linalg.svd, kthvalue pruning), as the
    reference implementation does it, one matrix after the other;
  * drm_jax: the stacked layers through one jitted, vmapped call (after a warm-up compile).
Both run in this process on the same CPU, interleaved; the table gives the best of `--repeats` runs, the
ratio torch / drm_jax, and the relative Frobenius error between the two merged deltas. Inputs have well
separated singular values above DRM's 1% cut (a geometric spectrum) plus a noise floor below it, so the
two implementations must agree: otherwise pruning near the threshold is decided by rounding.

Also: how the time grows with K and with the number of stacked layers.

    python benchmarks/bench_drm.py                 # T5-small and T5-base shapes, K = 6
    python benchmarks/bench_drm.py --quick         # small shapes only, for a smoke run
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from drm_jax.engine.compiled import merge_layers_jit
from drm_jax.methods import drm

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


def torch_drm(deltas: torch.Tensor, drop_rate=0.8, vertical=False, rank_rtol=0.01) -> torch.Tensor:
    """DRM on one matrix, the reference implementation's way (PyTorch, float32, dense SVD)."""
    if vertical:
        return torch_drm(deltas.transpose(1, 2), drop_rate, False, rank_rtol).T
    k, n, m = deltas.shape
    big = torch.cat(list(deltas), dim=1)
    u, s, vh = torch.linalg.svd(big, full_matrices=False)
    r = int((s > rank_rtol * s.max()).sum())
    u, s, vh = u[:, :r], s[:r], vh[:r]
    blocks = torch.stack(torch.split(vh, m, dim=1))  # (K, r, m)
    c = blocks.norm(dim=2, keepdim=True)
    blocks = torch.where(c > 0, blocks / c.clamp_min(1e-30), torch.zeros_like(blocks))
    s_t = s[None, :, None] * c
    mags = blocks.abs().flatten()
    n_all = mags.numel()
    kk = n_all - round(n_all * (1 - drop_rate))
    if kk > 0:
        blocks = blocks * (blocks.abs() >= torch.kthvalue(mags, kk).values)
    x = s_t * blocks
    sign = torch.sign(x.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    x = torch.where(torch.sign(x) == sign, x, torch.zeros_like(x))
    merged = x.sum(0) / (x != 0).sum(0).clamp_min(1)
    return u @ merged


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def compare(n, m, k, layers, direction, repeats, seed=0, full_rank=False):
    rng = np.random.default_rng(seed)
    if full_rank:  # Gaussian deltas: every triplet is above the cut, no truncation helps
        deltas = (rng.standard_normal((layers, k, n, m)) / np.sqrt(n)).astype(np.float32)
    elif direction == "horizontal":
        deltas = np.stack([well_separated_deltas(rng, k, n, m) for _ in range(layers)])  # (L, K, n, m)
    else:  # the vertical stack of D_t is the horizontal stack of D_t^T, transposed
        deltas = np.stack([well_separated_deltas(rng, k, m, n).transpose(0, 2, 1) for _ in range(layers)])
    base = np.zeros((layers, n, m), np.float32)
    transform = drm(direction=direction).linear
    args = (jnp.asarray(base), jnp.asarray(deltas), jnp.ones(k), jnp.stack([jax.random.PRNGKey(i) for i in range(layers)]),
            None)
    ours = lambda: jax.block_until_ready(merge_layers_jit(transform, *args))
    ours()  # compile
    torch_in = [torch.from_numpy(d) for d in deltas]
    vertical = direction == "vertical"
    theirs = lambda: [torch_drm(d, vertical=vertical) for d in torch_in]
    t_ours = best_of(ours, repeats)
    t_torch = best_of(theirs, repeats)
    got = np.asarray(ours()[0], np.float64)
    want = np.stack([t.numpy() for t in theirs()]).astype(np.float64)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    return t_torch, t_ours, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--layers", type=int, default=2, help="stacked layers per shape")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="T5-small attention shape only")
    args = parser.parse_args()
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), K = {args.k}, {args.layers} layers per shape\n")
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

    print("\nGrowth with K and with stacked layers, (512, 512), DRM-H, drm_jax only:\n")
    print("| K | layers | drm_jax (s) | per layer (s) |")
    print("|---:|---:|---:|---:|")
    for k, layers in [(2, 4), (4, 4), (6, 4), (8, 4), (6, 1), (6, 2), (6, 8)]:
        rng = np.random.default_rng(1)
        deltas = jnp.asarray(np.stack([well_separated_deltas(rng, k, 512, 512) for _ in range(layers)]))
        call = (drm().linear, jnp.zeros((layers, 512, 512)), deltas, jnp.ones(k),
                jnp.stack([jax.random.PRNGKey(i) for i in range(layers)]), None)
        jax.block_until_ready(merge_layers_jit(*call))
        t = best_of(lambda: jax.block_until_ready(merge_layers_jit(*call)), args.repeats)
        print(f"| {k} | {layers} | {t:.3f} | {t / layers:.3f} |", flush=True)


if __name__ == "__main__":
    main()
