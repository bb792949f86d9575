"""The subspace family beside DRM: TSV-M, Iso-C and Iso-CTS, per layer, as pure array functions.

All three work on one layer's K task deltas D_t, shape (K, n, m), in the (out, in) orientation
(r = min(n, m)), and return the merged delta (n, m). K, n and m are static; `alpha` may be a traced
scalar, so the functions run under `jit` and `vmap` (a leading layer axis). Matmuls use HIGHEST precision.
The formulas are docs/methods.md#subspace-family, as fusion-bench 0.2.33 and the authors'
code compute them:

* TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
  arXiv 2412.00081): each task keeps its top k = int(r * (1 / K)) singular triplets; the merged delta is
  alpha * polar(U) diag(s) polar(V)^T of the concatenated triplets.
* Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", arXiv 2502.04959): the spectrum of the summed delta flattened to its mean
  (Iso-C), or a common subspace of the sum plus task-specific subspaces orthogonal to it, flattened the
  same way (Iso-CTS).

Rank-deficient inputs (a task of rank below k, a summed delta of rank below r, as with LoRA deltas) make
the singular vectors of zero singular values arbitrary, and the papers' formulas then depend on what the
SVD solver returns. Here a singular value counts as zero when it is at most max(n, m) * eps * sigma_ref
(NumPy's `matrix_rank` rule; sigma_ref is the largest singular value of the same SVD, see each function),
and its triplet is dropped: its columns are zeroed before the orthogonalization and its weight in the
middle factor is 0. Because polar([U_1 | 0]) = [polar(U_1) | anything], the result is the method applied
to the nonzero triplets only, and unique as long as those triplets' vectors are linearly independent
(always for Iso-C; for TSV-M when the tasks' kept directions are independent). Where they are not (TSV-M
on tasks sharing directions, Iso-CTS on low-rank deltas whose task-specific residuals overlap, since
c + K p = r columns then lie in a space of lower dimension), polar() of the dependent columns is again
whatever the SVD returns, as in fusion-bench; no rank cut is applied there, because on full-rank layers
the smallest singular values of U* are genuine. On full-rank inputs nothing is dropped and the result is
the papers' (and fusion-bench's).

Per-task coefficients (fusion-bench's alpha list for TSV-M: each D_t scaled before its SVD) are
`scale_by_coefficients()` in front of the stage; the stages themselves ignore `MergeState.coefficients`.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from drm_jax.math.arrays import mm
from drm_jax.math import linalg
from drm_jax.math.linalg import polar
from drm_jax.math.state import MergeState, MergeTransform

Scalar = float | Float[Array, ""]


def _nonzero(s: Float[Array, "... j"], sigma_ref: Float[Array, "..."], shape: tuple[int, int]) -> Bool[Array, "... j"]:
    """s_j > max(n, m) * eps * sigma_ref: the singular values that are not numerically zero."""
    tol = max(shape) * jnp.finfo(s.dtype).eps * jnp.asarray(sigma_ref)
    return s > tol[..., None]


def _isometry_product(u: Float[Array, "n r"], weights: Float[Array, " r"], v: Float[Array, "m r"]) -> Array:
    """polar(U) diag(w) polar(V)^T, with the columns of zero weight zeroed before the orthogonalization."""
    keep = (weights != 0).astype(u.dtype)
    pu = polar(u * keep[None, :])
    pv = polar(v * keep[None, :])
    return mm(pu * weights[None, :], pv.T)


def _check_deltas(deltas: Array, method: str, shape: tuple[int, int] | None) -> tuple[int, int, int]:
    """(K, n, m) of the deltas these stand for: their own shape, or `shape` (the factored path's cores)."""
    if deltas.ndim != 3:
        raise ValueError(f"{method} needs deltas of shape (K, n, m), got {deltas.shape}")
    if shape is None:
        return deltas.shape
    n, m = (int(x) for x in shape)
    if deltas.shape[1] > n or deltas.shape[2] > m:
        raise ValueError(f"{method}: deltas {deltas.shape} do not fit in the shape {(n, m)} they stand for")
    return deltas.shape[0], n, m


def tsv_budget(rank: int, num_tasks: int) -> int:
    """TSV-M's per-task number of triplets k = int(r * (1 / K)), exactly as fusion-bench computes it.

    This is r // K except where the float product rounds down (e.g. r = K = 49 gives 0); the reference's
    rounding is kept so that the two agree on every shape.
    """
    return int(rank * (1.0 / num_tasks))


def tsv_merge(deltas: Float[Array, "K n m"], alpha: Scalar = 1.0,
              shape: tuple[int, int] | None = None) -> Float[Array, "n m"]:
    """TSV-M (arXiv 2412.00081): merge K deltas through their orthogonalized task singular vectors.

    Each task's thin SVD D_t = U_t diag(s_t) V_t^T keeps its top k = int(r / K) triplets (equal budget;
    the r - K k leftover directions are dropped). U = [U_1k ... U_Kk] (n, K k), V likewise (m, K k),
    s = the kept singular values concatenated (not sorted, not renormalized). Merged delta
    = alpha * polar(U) diag(s) polar(V)^T.

    Args:
      deltas: D_t, shape (K, n, m), (out, in) orientation.
      alpha: global scale (default 1; the authors choose it on validation from 0.1..3.0). May be traced.
      shape: the (n, m) the deltas stand for, where they are the cores Q1^T D_t Q2 of larger deltas
        (`drm_jax.math.lowrank.lora_cores`): k and the zero tolerance follow it. Default: their own.

    Returns:
      the merged delta, shape (n, m).

    Task order does not matter (permuting the tasks permutes the columns of U and V and the entries of s
    alike). K = 1 returns alpha * D (k = r and polar(U_1) = U_1). Rank-deficient tasks: triplets with
    s_tj <= max(n, m) * eps * max_j s_tj are dropped (module docstring), so a task of rank below k
    contributes only its nonzero triplets; K = 1 still returns alpha * D. If k = 0 (K > r) the result is 0.
    Tasks whose kept directions are linearly dependent make polar(U) non-unique (module docstring).
    Differentiable with finite derivatives, exact at repeated singular values inside the kept triplets
    (`drm_jax.math.linalg.svd_middle`: diag(s) is the middle factor M).
    """
    k_tasks, n, m = _check_deltas(deltas, "tsv_merge", shape)
    k = tsv_budget(min(n, m), k_tasks)
    if k == 0:
        return jnp.zeros(deltas.shape[1:], deltas.dtype)
    u, middle, vh = linalg.svd_middle(deltas)  # (K, n', r), (K, r, r), (K, r, m')
    k = min(k, middle.shape[-1])
    s = jnp.diagonal(middle, axis1=1, axis2=2)
    keep = _nonzero(s, s[:, 0], (n, m))[:, :k].astype(deltas.dtype)  # (K, k)
    middle = middle[:, :k, :k] * keep[:, :, None] * keep[:, None, :]
    rows, cols = deltas.shape[1:]
    pu = polar(jnp.transpose(u[:, :, :k] * keep[:, None, :], (1, 0, 2)).reshape(rows, k_tasks * k))
    pv = polar(jnp.transpose(vh[:, :k, :] * keep[:, :, None], (2, 0, 1)).reshape(cols, k_tasks * k))
    # polar(U) blockdiag(M_1 ... M_K) polar(V)^T, the blocks applied task by task
    left = jnp.einsum("ntk,tkj->ntj", pu.reshape(rows, k_tasks, k), middle, precision="highest")
    return alpha * mm(left.reshape(rows, k_tasks * k), pv.T)


def iso_c(deltas: Float[Array, "K n m"], alpha: Scalar = 1.0,
          shape: tuple[int, int] | None = None) -> Float[Array, "n m"]:
    """Iso-C (arXiv 2502.04959): the summed delta with its spectrum flattened to the mean.

    D_TA = sum_t D_t = U diag(S) V^T; merged delta = alpha * mean(S) * U V^T, the mean over all
    r = min(n, m) singular values.

    Args:
      deltas: D_t, shape (K, n, m), (out, in) orientation.
      alpha: global scale (default 1.0; fusion-bench's docs run 1.5). May be traced.
      shape: the (n, m) the deltas stand for (see `tsv_merge`): r and the zero tolerance follow it.

    Returns:
      the merged delta, shape (n, m).

    Task order does not matter (a sum). K = 1 returns alpha * mean(S) U V^T of D itself (not D).
    Rank-deficient D_TA: U V^T is taken over the triplets with S_j > max(n, m) * eps * max(S) only (the
    solver-independent part of the paper's formula); the mean is still over all r values, zeros included,
    as in the paper. D_TA = 0 gives 0.
    """
    _, n, m = _check_deltas(deltas, "iso_c", shape)
    u, s, vh = linalg.svd(jnp.sum(deltas, axis=0))
    keep = _nonzero(s, s[0], (n, m)).astype(s.dtype)
    return alpha * (jnp.sum(s) / min(n, m)) * mm(u * keep[None, :], vh)


def _check_common_fraction(common_fraction: float) -> None:
    if not 0.0 <= common_fraction <= 1.0:
        raise ValueError(f"common_fraction must lie in [0, 1], got {common_fraction}")


def iso_cts_sizes(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """Iso-CTS's common size c = r - K * round((r - int(f r)) / K) and per-task size p = (r - c) / K.

    Python's round (half to even), as fusion-bench computes it, so c + K p = r.
    """
    _check_common_fraction(common_fraction)
    common = rank - round((rank - int(rank * common_fraction)) / num_tasks) * num_tasks
    if common < 0:
        raise ValueError(f"Iso-CTS: rank {rank} with {num_tasks} tasks and common_fraction {common_fraction} "
                         f"leaves a negative common subspace ({common}); raise common_fraction")
    return common, (rank - common) // num_tasks


def iso_cts(deltas: Float[Array, "K n m"], alpha: Scalar = 1.0, common_fraction: float = 0.8,
            shape: tuple[int, int] | None = None) -> Float[Array, "n m"]:
    """Iso-CTS (arXiv 2502.04959): isotropic merge in a common subspace plus task-specific subspaces.

    With r = min(n, m), c and p from `iso_cts_sizes` (c + K p = r): the common part is the top c triplets
    (U_c, S_c, V_c) of D_TA = sum_t D_t. Each task's residual D_t - U_c U_c^T D_t (only the output-side
    subspace is removed) gives its top p triplets. U* = [U_c | U_1p ... U_Kp], V* likewise, sigma_bar =
    the mean of the r kept singular values (S_c and every task's top p, not D_TA's spectrum). Merged delta
    = alpha * sigma_bar * polar(U*) polar(V*)^T.

    Args:
      deltas: D_t, shape (K, n, m), (out, in) orientation. Not transpose-symmetric: Flax kernels (in, out)
        must be transposed first.
      alpha: global scale (default 1.0). May be traced.
      common_fraction: f, static, in [0, 1] (default 0.8). p = 0 (e.g. f = 1) gives Iso-C.
      shape: the (n, m) the deltas stand for (see `tsv_merge`): r, c, p, the mean and the zero tolerance
        follow it (the cores have fewer than c or p triplets where c or p exceed their size: the missing
        ones are the zeros of the larger deltas).

    Returns:
      the merged delta, shape (n, m).

    Task order does not matter (block columns permute alike). K = 1 gives Iso-C of D (the residual's top
    p triplets are D's remaining ones). Rank-deficient inputs: triplets with a singular value at most
    max(n, m) * eps * sigma_ref are dropped from U* and V* (sigma_ref: the largest of D_TA's and the
    residuals' singular values); sigma_bar still averages all r values, zeros included. If the kept
    nonzero columns are linearly dependent (low-rank deltas whose residuals overlap) the result is not
    unique (module docstring).
    """
    k_tasks, n, m = _check_deltas(deltas, "iso_cts", shape)
    rows, cols = deltas.shape[1:]
    c, p = iso_cts_sizes(min(n, m), k_tasks, common_fraction)
    u, s, vh = linalg.svd(jnp.sum(deltas, axis=0))
    u_parts, s_parts, v_parts = [u[:, :c]], [s[:c]], [vh[:c].T]
    if p > 0:
        residual = deltas - mm(u[:, :c], mm(u[:, :c].T, deltas))
        ut, st, vth = linalg.svd(residual)  # (K, n', r'), (K, r'), (K, r', m')
        q = min(p, st.shape[-1])
        u_parts.append(jnp.transpose(ut[:, :, :q], (1, 0, 2)).reshape(rows, k_tasks * q))
        s_parts.append(st[:, :q].reshape(-1))
        v_parts.append(jnp.transpose(vth[:, :q, :], (2, 0, 1)).reshape(cols, k_tasks * q))
    s_all = jnp.concatenate(s_parts)
    keep = _nonzero(s_all, jnp.max(s_all), (n, m))
    weights = jnp.where(keep, jnp.sum(s_all) / min(n, m), 0.0)  # the mean over c + K p = r values
    return alpha * _isometry_product(jnp.concatenate(u_parts, axis=1), weights, jnp.concatenate(v_parts, axis=1))


def _weight_space_stage(merge: Callable[[Array], Array], name: str) -> MergeTransform:
    def apply(state: MergeState) -> MergeState:
        if state.in_joint_space:
            raise ValueError(f"{name} works on weight-space deltas: put it before any joint_space()")
        return state.replace(merged=merge(state.values))

    return apply


def tsv_m_stage(alpha: Scalar = 1.0) -> MergeTransform:
    """Stage: merged = `tsv_merge(values, alpha)`, values the (K, n, m) deltas in weight space."""
    return _weight_space_stage(lambda d: tsv_merge(d, alpha), "tsv_m_stage")


def iso_c_stage(alpha: Scalar = 1.0) -> MergeTransform:
    """Stage: merged = `iso_c(values, alpha)`, values the (K, n, m) deltas in weight space."""
    return _weight_space_stage(lambda d: iso_c(d, alpha), "iso_c_stage")


def iso_cts_stage(alpha: Scalar = 1.0, common_fraction: float = 0.8) -> MergeTransform:
    """Stage: merged = `iso_cts(values, alpha, common_fraction)`, values the (K, n, m) deltas."""
    _check_common_fraction(common_fraction)
    return _weight_space_stage(lambda d: iso_cts(d, alpha, common_fraction), "iso_cts_stage")


__all__ = ["iso_c", "iso_c_stage", "iso_cts", "iso_cts_sizes", "iso_cts_stage", "polar", "tsv_budget",
           "tsv_m_stage", "tsv_merge"]
