"""A thin SVD and a polar factor whose derivatives stay finite at repeated singular values.

JAX differentiates `jnp.linalg.svd` through terms 1 / (s_j^2 - s_i^2), which are infinite where two
singular values coincide (orthonormal task vectors, isotropic spectra, the zero singular values of every
low-rank delta): `jax.grad` of TSV-M, Iso-C and Iso-CTS is then NaN although the merges themselves are
smooth there. The functions below have their own JVPs (docs/methods.md#polar-gradient):

* `polar(A)` = U V^T for the thin SVD A = U S V^T (n >= k; the transpose otherwise). With X = U^T dA V,
  dQ = U K V^T + (I - U U^T) dA V S^+ V^T,  K_ij = (X_ij - X_ji) / (s_i + s_j),
  the exact derivative wherever A has full column rank, repeated singular values included (only sums
  of singular values appear). K_ij = 0 where s_i + s_j is numerically zero and S^+ is the pseudo-inverse,
  so a rank-deficient A gets a finite derivative too; for A = [A_1 | 0] with A_1 of full column rank the
  first block's derivative is exactly that of polar(A_1).
* `svd(A)` returns what `jnp.linalg.svd(A, full_matrices=False)` returns; its JVP writes
  dU = U Omega_U + (I - U U^T) dA V S^+, dV = V Omega_V + (I - V V^T) dA^T U S^+, dS = diag(X), with
  Omega_U = a G + b H and Omega_V = a G - b H, a and b the symmetric and skew parts of X,
  G_ij = 1 / (s_j - s_i), H_ij = 1 / (s_i + s_j). G is set to 0 for pairs whose singular values agree to
  sqrt(eps) * max(S) ("degenerate" pairs, the diagonal included) and H for pairs that are both zero. The
  dropped a G part is a joint rotation of U and V inside a block of equal singular values, which the
  SVD does not determine. It leaves the derivative exact for every function that does not change under
  such rotations and gives the vectors of a block one weight (Iso-C's U V^T, Iso-CTS's projector and
  isotropic polar(U*) polar(V*)^T, a polar factor); for a function weighting them by S itself the part
  is finite (an infinitely fast rotation times a zero difference of weights), so
* `svd_middle(A)` returns (U, diag(S), Vh) with the middle factor as a matrix whose derivative takes
  that part over: dM = diag(X) plus, inside degenerate blocks, the symmetric part of X. TSV-M's
  polar(U) M polar(V)^T is then exact at repeated singular values too.

Away from repeated and zero singular values they equal JAX's own derivatives. Where a block of equal values is
cut (a kept triplet equal to a dropped one) the merges are not differentiable and the derivatives are
only finite.

Both run under jit and vmap (leading axes are batch axes) and in float32 or float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from drm_jax.math.arrays import mm
from drm_jax.math import lapack


def _t(x):
    return jnp.swapaxes(x, -1, -2)


def _zero_tolerance(s: Array, shape: tuple[int, ...]) -> Array:
    """max(n, m) * eps * max(S), NumPy's matrix_rank rule, with a trailing (1, 1) for pair tables."""
    return (max(shape[-2:]) * jnp.finfo(s.dtype).eps * jnp.max(s, axis=-1))[..., None, None]


def _pseudo_inverse(s: Array, tol: Array) -> Array:
    keep = s > tol[..., 0]
    return jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)


def _svd_tangents(a, da):
    """(u, s, vh) and their tangents (du, ds, dvh), plus the tangent of the middle factor diag(S)
    (module docstring)."""
    u, s, vh = lapack.svd(a)
    v = _t(vh)
    n, m = a.shape[-2:]
    x = mm(mm(_t(u), da), v)  # (..., r, r)
    si, sj = s[..., :, None], s[..., None, :]
    top = jnp.max(s, axis=-1)[..., None, None]
    gap = sj - si
    degenerate = jnp.abs(gap) <= jnp.sqrt(jnp.finfo(s.dtype).eps) * top
    g = jnp.where(degenerate, 0.0, 1.0 / jnp.where(degenerate, 1.0, gap))
    tol = _zero_tolerance(s, a.shape)
    both_zero = si + sj <= tol
    h = jnp.where(both_zero, 0.0, 1.0 / jnp.where(both_zero, 1.0, si + sj))
    sym, skew = 0.5 * (x + _t(x)), 0.5 * (x - _t(x))
    du = mm(u, sym * g + skew * h)
    dv = mm(v, sym * g - skew * h)
    s_inv = _pseudo_inverse(s, tol)[..., None, :]
    if n > s.shape[-1]:  # the part of dA outside U's span: (I - U U^T) dA V S^+
        du = du + (mm(da, v) - mm(u, x)) * s_inv
    if m > s.shape[-1]:  # (I - V V^T) dA^T U S^+
        dv = dv + (mm(_t(da), u) - mm(v, _t(x))) * s_inv
    ds = jnp.diagonal(x, axis1=-2, axis2=-1)
    # inside a block of equal singular values the symmetric part of X is the middle factor's own change
    eye = jnp.eye(s.shape[-1], dtype=bool)
    dmiddle = jnp.where(eye, x, jnp.where(degenerate, sym, 0.0))
    return (u, s, vh), (du, ds, _t(dv)), dmiddle


@jax.custom_jvp
def svd(a: Float[Array, "... n m"]) -> tuple[Array, Array, Array]:
    """Thin SVD (U (..., n, r), S (..., r) descending, Vh (..., r, m)), r = min(n, m), as jnp.linalg.svd
    computes it; derivatives as the module docstring says."""
    return lapack.svd(a)


@svd.defjvp
def _svd_jvp(primals, tangents):
    primal, tangent, _ = _svd_tangents(primals[0], tangents[0])
    return primal, tangent


@jax.custom_jvp
def svd_middle(a: Float[Array, "... n m"]) -> tuple[Array, Array, Array]:
    """(U, M, Vh) with M = diag(S) as a matrix (..., r, r): `svd` for functions that weight the singular
    vectors by the singular values themselves, U f(M) V^T-like (TSV-M's polar(U) M polar(V)^T).

    Its derivative dM also holds, off the diagonal, the symmetric part of U^T dA V inside each block of
    equal singular values: where singular values coincide, a change of A turns into a change of the
    (no longer diagonal) middle factor rather than an infinitely fast rotation of U and V. With it, the
    derivative of such a function is exact at repeated singular values too (module docstring).
    """
    u, s, vh = lapack.svd(a)
    return u, s[..., :, None] * jnp.eye(s.shape[-1], dtype=s.dtype), vh


@svd_middle.defjvp
def _svd_middle_jvp(primals, tangents):
    (u, s, vh), (du, _, dvh), dmiddle = _svd_tangents(primals[0], tangents[0])
    return (u, s[..., :, None] * jnp.eye(s.shape[-1], dtype=s.dtype), vh), (du, dmiddle, dvh)


@jax.custom_jvp
def _polar_tall(a):
    p, _, qh = lapack.svd(a)
    return mm(p, qh)


@_polar_tall.defjvp
def _polar_tall_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    p, s, qh = lapack.svd(a)  # a (..., n, k), n >= k: p (..., n, k), qh (..., k, k)
    q = _t(qh)
    x = mm(mm(_t(p), da), q)  # (..., k, k)
    total = s[..., :, None] + s[..., None, :]
    tol = _zero_tolerance(s, a.shape)
    zero = total <= tol
    k = jnp.where(zero, 0.0, (x - _t(x)) / jnp.where(zero, 1.0, total))
    s_inv = _pseudo_inverse(s, tol)[..., None, :]
    dq = mm(mm(p, k), qh) + mm((mm(da, q) - mm(p, x)) * s_inv, qh)
    return mm(p, qh), dq


def polar(a: Float[Array, "... n k"]) -> Float[Array, "... n k"]:
    """The nearest matrix with orthonormal columns (rows if n < k): P Q^T for the thin SVD a = P Z Q^T.

    Not QR or Gram-Schmidt (those depend on the column order). Unique for a of full rank. For a
    rank-deficient a, the part on a's null space is whatever the SVD returns; for the block form
    a = [A_1 | 0] with A_1 of full column rank, the first block is polar(A_1) all the same (the subspace
    merges rely on this), and so is its derivative. Differentiable with a finite derivative everywhere
    (module docstring).

    Args:
      a: shape (..., n, k); leading axes are batch axes.

    Returns:
      shape (..., n, k).
    """
    if a.shape[-2] < a.shape[-1]:
        return _t(_polar_tall(_t(a)))
    return _polar_tall(a)


__all__ = ["polar", "svd", "svd_middle"]
