"""Batched truncated SVD of same-shaped matrices, and its split into LoRA factors (docs/methods.md#extract-lora).

`truncated_svd` returns the leading k triplets of each matrix of a stack (K, n, m), vmapped over K, by
one of two routes:

* ``dense``: the thin SVD of each matrix (LAPACK on CPU, one matrix per call, `drm_jax.math.lapack`),
  cut to k. Exact to float32 rounding; cost about n m min(n, m) per matrix.
* ``randomized``: a range finder with power iterations (Halko, Martinsson and Tropp, "Finding structure
  with randomness", arXiv 0909.4061, algorithms 4.4 and 5.1): Y = M Omega for a Gaussian Omega (m, k+p),
  `power_iterations` rounds of Q = qr(Y), Y = M qr(M^T Q), then Q = qr(Y) and the SVD of the small
  Q^T M (k+p, m). Cost about (2 q + 2) n m (k + p) per matrix: matmuls, which is where a CPU is fast.
  Its error against a float64 SVD is stated in docs/methods.md#extract-lora.
* ``auto``: ``randomized`` when k + p is at most a quarter of min(n, m), else ``dense``.

Everything is float32 with matmuls at the highest precision (no bf16/tf32 passes on GPU or TPU).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from drm_jax.math import lapack

SvdRoute = Literal["auto", "dense", "randomized"]
SVD_ROUTES = ("auto", "dense", "randomized")
# Extra sketch columns past the rank asked for (Halko et al. recommend 5-10; more sharpens the last
# kept triplets, whose gap to the discarded ones is what a sketch resolves least well).
MIN_OVERSAMPLE = 16
POWER_ITERATIONS = 2
# The randomized route is taken when its sketch is at most this fraction of the short side.
RANDOMIZED_MAX_FRACTION = 0.25


def _mm(a, b):
    return jnp.matmul(a, b, precision="highest")


def sketch_size(shape: tuple[int, int], rank: int) -> int:
    """Columns of the randomized route's sketch for a matrix of `shape` cut to `rank`: rank plus the
    oversampling max(16, rank / 4), at most min(shape)."""
    return min(min(shape), rank + max(MIN_OVERSAMPLE, rank // 4))


def choose_svd_route(shape: tuple[int, int], rank: int, route: SvdRoute = "auto") -> str:
    """"dense" or "randomized" for matrices of static `shape` cut to `rank` (see the module docstring)."""
    if route not in SVD_ROUTES:
        raise ValueError(f"unknown truncated SVD route {route!r}; expected one of {SVD_ROUTES}")
    if route != "auto":
        return route
    return "randomized" if sketch_size(shape, rank) <= RANDOMIZED_MAX_FRACTION * min(shape) else "dense"


def _dense(matrix: Float[Array, "n m"], rank: int, key) -> tuple[Array, Array, Array]:
    del key
    u, s, vh = lapack.svd(matrix)
    return u[:, :rank], s[:rank], vh[:rank]


def _randomized(matrix: Float[Array, "n m"], rank: int, key) -> tuple[Array, Array, Array]:
    n, m = matrix.shape
    width = sketch_size((n, m), rank)
    y = _mm(matrix, jax.random.normal(key, (m, width), matrix.dtype))  # (n, width)
    for _ in range(POWER_ITERATIONS):  # re-orthonormalised each half step, so small triplets survive
        q, _ = lapack.qr(y)
        z, _ = lapack.qr(_mm(matrix.T, q))  # (m, width)
        y = _mm(matrix, z)
    q, _ = lapack.qr(y)  # (n, width): an orthonormal basis of M's leading range
    w, s, vh = lapack.svd(_mm(q.T, matrix))  # (width, width), (width,), (width, m)
    return _mm(q, w[:, :rank]), s[:rank], vh[:rank]


_ROUTES = {"dense": _dense, "randomized": _randomized}


def truncated_svd(matrices: Float[Array, "K n m"], rank: int, route: SvdRoute = "auto",
                  seed: int = 0) -> tuple[Array, Array, Array]:
    """The leading k = min(rank, n, m) singular triplets of each of K matrices (float32).

    Args:
      matrices: the stack (K, n, m).
      rank: static; the number of triplets wanted (at least 1).
      route: "auto", "dense" or "randomized" (see the module docstring).
      seed: of the randomized route's Gaussian sketch (the same for every matrix of the stack).

    Returns:
      U (K, n, k), S (K, k) descending, Vh (K, k, m).
    """
    if matrices.ndim != 3:
        raise ValueError(f"truncated_svd needs a stack (K, n, m), got shape {matrices.shape}")
    if int(rank) < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    shape = tuple(matrices.shape[1:])
    k = min(int(rank), *shape)
    fn = _ROUTES[choose_svd_route(shape, k, route)]
    key = jax.random.PRNGKey(seed)
    return jax.vmap(lambda x: fn(x.astype(jnp.float32), k, key))(matrices)


def split_spectrum(u: Float[Array, "... n k"], s: Float[Array, "... k"],
                   vh: Float[Array, "... k m"]) -> tuple[Array, Array]:
    """LoRA factors with B A = U diag(S) Vh, the singular values split evenly as mergekit-extract-lora's
    default does: B = U diag(sqrt S) (..., n, k), A = diag(sqrt S) Vh (..., k, m)."""
    root = jnp.sqrt(jnp.maximum(s, 0.0))
    return u * root[..., None, :], root[..., :, None] * vh


__all__ = ["SVD_ROUTES", "SvdRoute", "choose_svd_route", "sketch_size", "split_spectrum", "truncated_svd"]
