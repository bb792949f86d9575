"""Joint decomposition of K task deltas: the shared space DRM and KnOTS merge in.

DRM-H (arXiv 2505.23117) concatenates the deltas side by side, M = [D_1 | ... | D_K] of shape (n, K*m),
and takes a thin SVD M = U S Vh. Task t's block of Vh is V_t (q, m), and its coordinates in the shared
output-space basis U are P_t = U^T D_t = diag(S) V_t. DRM-V is DRM-H on the transposed deltas (docs/methods.md#drm-v:
the two directions are each other's transpose), so only the horizontal form is written here.

Everything downstream needs only U, S and the coordinates P_t, which lets the decomposition pick the
cheapest exact-enough route for the shape of M (all float32, matmuls at HIGHEST precision so that TPUs and
GPUs do not silently drop to bf16/tf32 passes):

* ``dense``: LAPACK/cuSOLVER thin SVD of M. Cost ~ O(n (K m) min(n, K m)) with a large constant.
* ``gram``: eigendecomposition of the small Gram matrix (M M^T when n <= K m, else M^T M), then one
  matmul for the other side. Squaring the condition number means singular values below ~sqrt(eps) *
  max(S) (about 3e-4 of the largest in float32) are not resolved, which is far below DRM's 1% rank cut.
  On CPU it is 2.5-7x faster than the dense SVD for the shapes of T5 and Llama layers.
* ``qr``: QR of the long side, then a dense SVD of the small triangular factor: as accurate as ``dense``
  and cheaper when M is very far from square.
* ``auto``: ``gram`` when the long side is at least 1.2x the short side and the rank cut is >= 1e-3,
  else ``dense``.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from drm_jax.math import lapack
from drm_jax.math.arrays import mm

Route = Literal["auto", "dense", "gram", "qr"]
ROUTES = ("auto", "dense", "gram", "qr")

# Long side / short side from which the Gram route beats the dense SVD on CPU (measured in
# benchmarks/bench_decompose.py); below it the two cost about the same and dense is more accurate.
GRAM_MIN_ASPECT = 1.2
# Smallest relative rank cut the Gram route resolves in float32 (sqrt(eps) ~ 3.5e-4, with margin).
GRAM_MIN_RTOL = 1e-3


class JointSpace(NamedTuple):
    """A thin SVD of the side-by-side stack of K deltas, in coordinates.

    basis: U, shape (n, q), orthonormal columns (q = min(n, K m)).
    singular_values: S, shape (q,), not necessarily sorted.
    coordinates: P_t = U^T D_t = diag(S) V_t, shape (K, q, m).
    valid: the rank cut S_j > rank_rtol * max(S) as a mask, shape (q,), so shapes stay static.
    """

    basis: Float[Array, "n q"]
    singular_values: Float[Array, " q"]
    coordinates: Float[Array, "K q m"]
    valid: Bool[Array, " q"]


def _full(m: Float[Array, "n c"], route: str) -> tuple[Array, Array, Array]:
    u, p = factorize(m, route).take(min(m.shape))
    # row norms of P = U^T M are the singular values (more accurate than sqrt of Gram eigenvalues)
    return u, jnp.linalg.norm(p, axis=1), p


def svd_dense(m: Float[Array, "n c"]) -> tuple[Array, Array, Array]:
    """(U, S, P = diag(S) Vh) by a dense thin SVD."""
    return _full(m, "dense")


def svd_gram(m: Float[Array, "n c"]) -> tuple[Array, Array, Array]:
    """(U, S, P = diag(S) Vh) from the eigendecomposition of the smaller Gram matrix."""
    return _full(m, "gram")


def svd_qr(m: Float[Array, "n c"]) -> tuple[Array, Array, Array]:
    """(U, S, P = diag(S) Vh) via QR of the long side and a dense SVD of the small factor."""
    return _full(m, "qr")


class Factors(NamedTuple):
    """A decomposition of M (n, c) from which the leading b singular triplets are taken on demand.

    singular_values: estimates of all q = min(n, c) singular values, descending (from the SVD itself,
      or the square roots of the Gram matrix's eigenvalues); used to size b.
    take: b -> (U_b (n, b), P_b = U_b^T M (b, c)) for the b leading triplets, b static. Taking fewer
      than q rows skips the part of the projection, and every later stage's work, on the rows past b.
    """

    singular_values: Float[Array, " q"]
    take: Callable[[int], tuple[Array, Array]]


def factorize(m: Float[Array, "n c"], route: str) -> Factors:
    """Factors of M by one route ("dense", "gram" or "qr"; see the module docstring)."""
    n, c = m.shape
    if route == "dense":
        u, s, vh = lapack.batched_svd(m)
        return Factors(s, lambda b: (u[:, :b], s[:b, None] * vh[:b]))
    if route == "gram":
        if n <= c:
            w, u = jnp.linalg.eigh(mm(m, m.T))
            u, w = u[:, ::-1], w[::-1]
            return Factors(jnp.sqrt(jnp.maximum(w, 0.0)), lambda b: (u[:, :b], mm(u[:, :b].T, m)))
        w, v = jnp.linalg.eigh(mm(m.T, m))
        v, w = v[:, ::-1], w[::-1]

        def take_right(b):
            us = mm(m, v[:, :b])
            s = jnp.linalg.norm(us, axis=0)
            return us / jnp.where(s > 0, s, 1.0), s[:, None] * v[:, :b].T

        return Factors(jnp.sqrt(jnp.maximum(w, 0.0)), take_right)
    if route == "qr":
        if n <= c:
            q, r = jnp.linalg.qr(m.T)  # M = R^T Q^T, R^T is (n, n)
            u, s, wh = lapack.batched_svd(r.T)
            return Factors(s, lambda b: (u[:, :b], s[:b, None] * mm(wh[:b], q.T)))
        q, r = jnp.linalg.qr(m)  # M = Q R, R is (c, c)
        ur, s, vh = lapack.batched_svd(r)
        return Factors(s, lambda b: (mm(q, ur[:, :b]), s[:b, None] * vh[:b]))
    raise ValueError(f"unknown SVD route {route!r}; expected one of {ROUTES}")


def rank_buckets(q: int) -> tuple[int, ...]:
    """Static row counts a joint space is truncated to: 8, 32, 128, ... below q, then q."""
    sizes, b = [], 8
    while b < q:
        sizes.append(b)
        b *= 4
    return tuple(sizes) + (q,)


def choose_route(shape: tuple[int, int], rank_rtol: float, route: Route = "auto") -> str:
    """The decomposition route for a stacked matrix of this static shape (see module docstring)."""
    if route not in ROUTES:
        raise ValueError(f"unknown SVD route {route!r}; expected one of {ROUTES}")
    if route != "auto":
        return route
    short, long = sorted(shape)
    if long >= GRAM_MIN_ASPECT * short and rank_rtol >= GRAM_MIN_RTOL:
        return "gram"
    return "dense"


_ROUTE_FNS = {"dense": svd_dense, "gram": svd_gram, "qr": svd_qr}


def stack_horizontal(deltas: Float[Array, "K n m"]) -> Float[Array, "n Km"]:
    """M = [D_1 | D_2 | ... | D_K], shape (n, K*m)."""
    k, n, m = deltas.shape
    return jnp.transpose(deltas, (1, 0, 2)).reshape(n, k * m)


def joint_space(
    deltas: Float[Array, "K n m"], rank_rtol: float = 0.01, route: Route = "auto"
) -> JointSpace:
    """Shared output-space basis of K deltas (docs/methods.md#drm-h, steps 1-3).

    Args:
      deltas: task deltas D_t, shape (K, n, m), in the (out, in) orientation.
      rank_rtol: keep singular triplets with S_j > rank_rtol * max(S) (default 0.01, the 1% cut of docs/methods.md#drm-h).
      route: decomposition route, see the module docstring.

    Returns:
      JointSpace with basis (n, q), singular values (q,), coordinates (K, q, m), valid mask (q,).
    """
    k, n, m = deltas.shape
    stacked = stack_horizontal(deltas)
    u, s, p = _ROUTE_FNS[choose_route(stacked.shape, rank_rtol, route)](stacked)
    q = s.shape[0]
    valid = s > rank_rtol * jnp.max(s)
    coordinates = jnp.transpose(p.reshape(q, k, m), (1, 0, 2))
    return JointSpace(u, s, coordinates, valid)


def recompose(basis: Float[Array, "n q"], merged: Float[Array, "q m"]) -> Float[Array, "n m"]:
    """delta = U @ X_merged (docs/methods.md#drm-h step 9)."""
    return mm(basis, merged)


__all__ = [
    "Factors",
    "GRAM_MIN_ASPECT",
    "GRAM_MIN_RTOL",
    "JointSpace",
    "ROUTES",
    "Route",
    "choose_route",
    "factorize",
    "rank_buckets",
    "joint_space",
    "recompose",
    "stack_horizontal",
    "svd_dense",
    "svd_gram",
    "svd_qr",
]
