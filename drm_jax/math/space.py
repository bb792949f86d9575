"""Stages that enter and leave DRM's joint space, and renormalization (docs/methods.md#drm-h, steps 1-4 and 9)."""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float

from drm_jax.math import decompose
from drm_jax.math.state import MergeState, MergeTransform, hyper, reads

Direction = Literal["horizontal", "vertical"]
DIRECTIONS = ("horizontal", "vertical")


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected 'horizontal' or 'vertical'")
    return direction


def horizontal_view(deltas: Float[Array, "K n m"], direction: str, stage: str) -> tuple[Array, bool]:
    """Deltas as the horizontal form works on them: transposed for DRM-V (docs/methods.md#drm-v: V on W is H on W^T)."""
    if deltas.ndim != 3:
        raise ValueError(f"{stage} needs deltas of shape (K, n, m), got {deltas.shape}")
    transposed = direction == "vertical"
    return (jnp.swapaxes(deltas, 1, 2) if transposed else deltas), transposed


def joint_space(
    direction: Direction = "horizontal", rank_rtol: float = 0.01, route: decompose.Route = "auto"
) -> MergeTransform:
    """Move K deltas (K, n, m) into their shared SVD basis (DRM steps 1-3).

    horizontal: M = [D_1 | ... | D_K] (n, K m); shared output-space basis U (n, q); values become the
      coordinates P_t = U^T D_t, shape (K, q, m).
    vertical: M = [D_1; ...; D_K] (K n, m); shared input-space basis. Computed as the horizontal form of
      the transposed deltas (docs/methods.md#drm-v: DRM-V on W is DRM-H on W^T, transposed), so values are (K, q, n).

    Rows past the rank cut (S_j <= rank_rtol * max S) are zeroed and marked invalid; they take no part in
    pruning counts. `row_scale` is set to S_j, so pruning sees the entries of Vh unless `renormalize`
    follows.
    """
    check_direction(direction)
    decompose.choose_route((1, 1), rank_rtol, route)  # validate the route name eagerly

    def apply(state: MergeState) -> MergeState:
        deltas, transposed = horizontal_view(state.values, direction, "joint_space")
        space = decompose.joint_space(deltas, rank_rtol, route)
        coords = jnp.where(space.valid[None, :, None], space.coordinates, 0.0)
        row_scale = jnp.broadcast_to(space.singular_values[None, :], coords.shape[:2])
        return state.replace(values=coords, basis=space.basis, valid=space.valid, row_scale=row_scale,
                             transposed=transposed)

    return apply


class PreparedSpace(NamedTuple):
    """One layer's joint space, decomposed once and truncated to b leading rows (the prepare step of DRM).

    basis: U (n, b), orthonormal columns; singular_values: S (b,), descending (the row norms of P);
    coordinates: P_t = U^T D_t, shape (K, b, m). For DRM-V all of it is of the transposed deltas.
    """

    basis: Float[Array, "n b"]
    singular_values: Float[Array, " b"]
    coordinates: Float[Array, "K b m"]


def prepared_space(deltas: Float[Array, "K n m"], direction: Direction, route: str, rows: int) -> PreparedSpace:
    """The joint space of one layer's deltas, its b = `rows` leading triplets (decompose once)."""
    deltas, _ = horizontal_view(deltas, direction, "prepared_space")
    k, n, m = deltas.shape
    stacked = decompose.stack_horizontal(deltas)
    u, p = decompose.factorize(stacked, route).take(rows)
    s = jnp.linalg.norm(p, axis=1)
    return PreparedSpace(u, s, jnp.transpose(p.reshape(rows, k, m), (1, 0, 2)))


def enter_prepared(space: PreparedSpace, direction: Direction, rank_rtol: float | None = None) -> MergeTransform:
    """Put a layer's `PreparedSpace` in the merge state: DRM steps 1-3 without decomposing again.

    The rank cut S_j > rank_rtol * max(S) is applied here, from a fixed `rank_rtol` or the traced
    `state.hparams["rank_rtol"]`, so a new cut reuses the decomposition and the compiled program.
    """
    check_direction(direction)

    def apply(state: MergeState) -> MergeState:
        rtol = jnp.asarray(hyper(state, rank_rtol, "rank_rtol"), space.singular_values.dtype)
        s = space.singular_values
        valid = s > rtol * jnp.max(s)
        coords = jnp.where(valid[None, :, None], space.coordinates, 0.0)
        return state.replace(values=coords, basis=space.basis, valid=valid, transposed=direction == "vertical",
                             row_scale=jnp.broadcast_to(s[None, :], coords.shape[:2]))

    return apply if rank_rtol is not None else reads(apply, "rank_rtol")


def row_norms(coordinates: Float[Array, "K q m"]) -> Float[Array, "K q"]:
    """c_tj * S_j = ||P_t[j, :]||: the per-task singular values S_tj of DRM step 4."""
    return jnp.linalg.norm(coordinates, axis=-1)


def renormalize() -> MergeTransform:
    """DRM step 4: each task's block of singular vectors is renormalized to unit rows.

    V_t[j] / c_tj with c_tj = ||V_t[j]||, and S_tj = S_j c_tj. In coordinates P_t = diag(S) V_t this is
    simply: the unit rows are P_t[j] / ||P_t[j]||, and S_tj = ||P_t[j]||. Exact: U diag(S_t) V_t is
    unchanged, so only what pruning compares changes. A zero row (a zero-delta task, an all-zero layer)
    has S_tj = 0 and stays zero instead of dividing by zero.
    """

    def apply(state: MergeState) -> MergeState:
        if not state.in_joint_space:
            raise ValueError("renormalize() needs a joint space: put joint_space() before it")
        return state.replace(row_scale=row_norms(state.values))

    return apply


def unit_magnitudes(state: MergeState) -> Float[Array, "K ..."]:
    """The magnitudes pruning compares: |values| / row_scale in a joint space, |values| otherwise."""
    mags = jnp.abs(state.values)
    if state.row_scale is None:
        return mags
    scale = state.row_scale[..., None]
    return jnp.where(scale > 0, mags / jnp.where(scale > 0, scale, 1.0), 0.0)


def recompose() -> MergeTransform:
    """DRM step 9: delta = U @ X_merged (transposed back for the vertical direction)."""

    def apply(state: MergeState) -> MergeState:
        if not state.in_joint_space:
            return state
        if state.merged is None:
            raise ValueError("recompose() needs a merged value: put a mean stage before it")
        delta = decompose.recompose(state.basis, state.merged)
        if state.transposed:
            delta = delta.T
        return state.replace(merged=delta, basis=None, valid=None, row_scale=None, transposed=False)

    return apply


__all__ = ["DIRECTIONS", "Direction", "PreparedSpace", "check_direction", "enter_prepared", "joint_space",
           "prepared_space", "recompose", "renormalize", "row_norms", "unit_magnitudes"]
