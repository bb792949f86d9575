"""LoRA deltas in factored form: their joint space without n x m deltas, and merged deltas back to LoRA.

A PEFT LoRA delta is D_t = s_t B_t A_t (B_t: (n, r), A_t: (r, m), s_t = lora_alpha / r or as given).
DRM-H's stack M = [D_1 | ... | D_K] (n, K m) factors as Bc Ab with Bc = [B_1 ... B_K] (n, K r) and
Ab = blockdiag(s_1 A_1, ..., s_K A_K) (K r, K m) (docs/methods.md#drm-lora). With Bc = Q_1 R_1 and
Ab^T = Q_2 R_2 (block diagonal: one QR of s_t A_t^T per task), M = Q_1 (R_1 R_2^T) Q_2^T, and the SVD of
the small core W S Z^T gives M's thin SVD U = Q_1 W, S, Vh = (Q_2 Z)^T at cost O((n + K m)(K r)^2), with
no n x m matrix formed. DRM-V's vertical stack is DRM-H's on the transposed deltas s_t A_t^T B_t^T, i.e.
the same computation with the roles of B and A swapped.

The merged delta every joint-space method returns is U X (U: (n, q), X: (q, m)), of rank at most q = K r:
`to_lora_factors` turns it into an adapter of rank q (exact) or of a requested rank.

Methods that are equivariant under orthogonal maps of both sides (TSV-M, Iso-C, Iso-CTS) need less:
with Q1 an orthonormal basis of span(B_1 ... B_K) (n, q1) and Q2 one of span(A_1^T ... A_K^T) (m, q2),
D_t = Q1 C_t Q2^T for the small cores C_t = s_t (Q1^T B_t)(A_t Q2) (q1, q2), and the merge of the D_t
is Q1 (the merge of the C_t) Q2^T when the merge takes its budgets, means and zero tolerance from the
deltas' shape (n, m) (`lora_cores`; docs/methods.md#lora-factored).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float

from drm_jax.math.arrays import mm
from drm_jax.math import lapack
from drm_jax.math.decompose import JointSpace

DIRECTIONS = ("horizontal", "vertical")



class LoraWeight(NamedTuple):
    """One adapted weight: its update is scale * B @ A, or scale * (B @ A)^T where `transposed`.

    b: (out, r), PEFT's lora_B.weight (an embedding's lora_embedding_B). a: (r, in), lora_A.weight
    (lora_embedding_A). scale: lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). transposed: the
    base weight is stored as the transpose of B @ A's shape (fan_in_fan_out Conv1D, embeddings).
    """

    b: Any
    a: Any
    scale: Any = 1.0
    transposed: bool = False


def _check_factors(b: Array, a: Array, scales: Array) -> None:
    if b.ndim != 3 or a.ndim != 3 or b.shape[0] != a.shape[0] or b.shape[2] != a.shape[1]:
        raise ValueError(f"LoRA factors need B (K, n, r) and A (K, r, m), got {b.shape} and {a.shape}")
    if jnp.shape(scales) != (b.shape[0],):
        raise ValueError(f"LoRA scales need shape ({b.shape[0]},), got {jnp.shape(scales)}")


def lora_deltas(b: Float[Array, "K n r"], a: Float[Array, "K r m"], scales: Float[Array, " K"]) -> Float[Array, "K n m"]:
    """The dense deltas D_t = s_t B_t A_t, shape (K, n, m) (for tests and elementwise methods)."""
    _check_factors(b, a, scales)
    return jnp.asarray(scales)[:, None, None] * mm(b, a)


def joint_space_lora(
    b: Float[Array, "K n r"],
    a: Float[Array, "K r m"],
    scales: Float[Array, " K"],
    direction: str = "horizontal",
    rank_rtol: float = 0.01,
) -> JointSpace:
    """The joint space of K LoRA deltas s_t B_t A_t, from the factors (no n x m delta is formed).

    Args:
      b: B_t, shape (K, n, r) (PEFT's lora_B weights, (out, rank)).
      a: A_t, shape (K, r, m) (PEFT's lora_A weights, (rank, in)).
      scales: s_t, shape (K,) (PEFT's scaling lora_alpha / r, times any task coefficient).
      direction: "horizontal" (DRM-H: M = [D_1 | ... | D_K], (n, K m)) or "vertical" (DRM-V: the vertical
        stack (K n, m), returned as `drm_jax.math.space.joint_space("vertical")` works on it: the horizontal
        form of the transposed deltas, so n and m swap below).
      rank_rtol: the rank cut of `JointSpace.valid`, S_j > rank_rtol * max(S) (default 0.01, the 1% of docs/methods.md#drm-h).

    Returns:
      JointSpace as `drm_jax.math.decompose.joint_space` returns for the dense stack: basis U (n, q),
      singular values S (q,) descending, coordinates P_t = U^T D_t (K, q, m), valid (q,), with
      q = min(n, K r, K min(r, m)) (= K r for the usual n >= K r, m >= r) instead of the dense min(n, K m):
      the dense stack's triplets past K r have zero singular values and carry nothing. The columns agree
      with the dense SVD's up to sign where the singular values are distinct.

    Cost: QR of Bc (n, K r), one QR of s_t A_t^T (m, r) per task, an SVD of the (K r, K r) core and the
    coordinates: O((n + K m)(K r)^2).
    """
    _check_factors(b, a, scales)
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected 'horizontal' or 'vertical'")
    scales = jnp.asarray(scales, b.dtype)
    if direction == "vertical":  # D_t^T = s_t A_t^T B_t^T
        b, a = jnp.swapaxes(a, 1, 2), jnp.swapaxes(b, 1, 2)
    k, n, r = b.shape
    q1, r1 = lapack.qr(jnp.transpose(b, (1, 0, 2)).reshape(n, k * r))  # (n, q_1), (q_1, K r)
    q2, r2 = lapack.qr(scales[:, None, None] * jnp.swapaxes(a, 1, 2))  # (K, m, j), (K, j, r)
    j = r2.shape[1]
    # R_2 = blockdiag(r2_t) (K j, K r), so the core R_1 R_2^T has the column blocks R_1[:, task t] r2_t^T.
    core = jnp.einsum("qtr,tjr->qtj", r1.reshape(-1, k, r), r2, precision="highest").reshape(-1, k * j)
    w, s, zh = lapack.svd(core)  # (q_1, q), (q,), (q, K j)
    basis = mm(q1, w)
    # P_t = U^T D_t = diag(S) Z_t^T Q2_t^T with Z_t the rows of Z for task t.
    coordinates = s[None, :, None] * jnp.einsum("qtj,tmj->tqm", zh.reshape(-1, k, j), q2, precision="highest")
    return JointSpace(basis, s, coordinates, s > rank_rtol * jnp.max(s))


class LoraCores(NamedTuple):
    """K deltas D_t = left C_t right^T: left (n, q1) and right (m, q2) with orthonormal columns, the cores
    C_t (K, q1, q2) (docs/methods.md#lora-factored)."""

    left: Float[Array, "n q1"]
    cores: Float[Array, "K q1 q2"]
    right: Float[Array, "m q2"]


def lora_cores(b: Float[Array, "K n r"], a: Float[Array, "K r m"], scales: Float[Array, " K"]) -> LoraCores:
    """The cores of K LoRA deltas s_t B_t A_t in the joint bases of their factors (no n x m matrix formed).

    Q1 R1 = [B_1 ... B_K] (n, K r) and Q2 R2 = [A_1^T ... A_K^T] (m, K r) by QR, so B_t = Q1 R1_t and
    A_t^T = Q2 R2_t (R1_t, R2_t the task's column blocks) and C_t = s_t R1_t R2_t^T. Exact for any
    factors (a rank-deficient stack included: QR still spans it). q1 = min(n, K r), q2 = min(m, K r).
    Cost: the two QRs, O((n + m)(K r)^2).
    """
    _check_factors(b, a, scales)
    k, n, r = b.shape
    m = a.shape[2]
    scales = jnp.asarray(scales, b.dtype)
    q1, r1 = lapack.qr(jnp.transpose(b, (1, 0, 2)).reshape(n, k * r))  # (n, q1), (q1, K r)
    q2, r2 = lapack.qr(jnp.transpose(a, (2, 0, 1)).reshape(m, k * r))  # (m, q2), (q2, K r)
    cores = jnp.einsum("pkr,qkr->kpq", r1.reshape(-1, k, r), r2.reshape(-1, k, r), precision="highest")
    return LoraCores(q1, scales[:, None, None] * cores, q2)


def _split_spectrum(left, w, s, zh, rank: int):
    """B = left W_r diag(sqrt S_r), A = diag(sqrt S_r) Z_r^T, zero-padded to `rank`; the discarded energy."""
    kept = min(rank, s.shape[0])
    root = jnp.sqrt(s[:kept])
    b = mm(left, w[:, :kept]) * root[None, :] if left is not None else w[:, :kept] * root[None, :]
    a = root[:, None] * zh[:kept]
    if rank > kept:
        b = jnp.pad(b, ((0, 0), (0, rank - kept)))
        a = jnp.pad(a, ((0, rank - kept), (0, 0)))
    energy = s * s
    total = jnp.sum(energy)
    discarded = jnp.where(total > 0, jnp.sum(energy[kept:]) / jnp.where(total > 0, total, 1.0), 0.0)
    return b, a, discarded


def dense_to_lora(delta: Float[Array, "n m"], rank: int) -> tuple[Array, Array, Array]:
    """The best rank-`rank` LoRA factors (B (n, rank), A (rank, m)) of a dense delta (truncated SVD, the
    singular values split evenly as in `to_lora_factors`), and the discarded energy fraction."""
    if delta.ndim != 2:
        raise ValueError(f"dense_to_lora needs a delta (n, m), got {delta.shape}")
    if int(rank) < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    w, s, zh = lapack.svd(delta)
    return _split_spectrum(None, w, s, zh, int(rank))


def to_lora_factors(
    u: Float[Array, "n q"], x: Float[Array, "q m"], rank: int | None = None
) -> tuple[Float[Array, "n rank"], Float[Array, "rank m"], Float[Array, ""]]:
    """LoRA factors (B, A) with B A = U X, exactly at full rank, else the best rank-`rank` approximation.

    U X = Q (R X) with U = Q R (QR), and the SVD of the small factor R X = W diag(S) Z^T gives
    U X = (Q W) diag(S) Z^T. The factors keep the top `rank` triplets with the singular values split
    evenly, B = Q W_r diag(sqrt S_r), A = diag(sqrt S_r) Z_r^T (PEFT's scaling must then be 1:
    lora_alpha = rank). For DRM-V's transposed merge (U X)^T, swap and transpose: (A^T, B^T).

    Args:
      u: U, shape (n, q) (need not be orthonormal).
      x: X, shape (q, m).
      rank: static; None for q. Past U X's largest possible rank min(n, q, m) the factors are padded with
        zero columns of B and zero rows of A (still exact).

    Returns:
      (B (n, rank), A (rank, m), discarded energy = sum of the discarded S_j^2 / sum of all S_j^2, 0 at
      full rank and for U X = 0).
    """
    if u.ndim != 2 or x.ndim != 2 or u.shape[1] != x.shape[0]:
        raise ValueError(f"to_lora_factors needs U (n, q) and X (q, m), got {u.shape} and {x.shape}")
    rank = u.shape[1] if rank is None else int(rank)
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    q, r = lapack.qr(u)
    w, s, zh = lapack.svd(mm(r, x))
    return _split_spectrum(q, w, s, zh, rank)


__all__ = ["LoraCores", "LoraWeight", "dense_to_lora", "joint_space_lora", "lora_cores", "lora_deltas", "to_lora_factors"]
