"""Sparsification stages: magnitude pruning (TIES, DRM step 5) and random drop (DARE)."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float


from drm_jax.math.select import keep_at_least_kth, pruning_counts
from drm_jax.math.space import unit_magnitudes
from drm_jax.math.state import MergeState, MergeTransform, broadcast_tasks, hyper

Scope = Literal["joint", "per_task"]
Rule = Literal["kthvalue", "top_k"]


def check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def prune_geometry(shape: tuple[int, ...], scope: Scope, joint: bool) -> tuple[int, int]:
    """(rows, row_size) of the competition `pruning_counts` sizes, for values of shape (K, ...).

    In a joint space (K, q, m) the rows are the q singular directions (only the valid ones compete);
    joint scope pools the K tasks (row_size K m), per_task ranks each task alone (row_size m). In weight
    space there is one "row": the whole tensor of one task (per_task) or of all tasks (joint).
    """
    k = shape[0]
    if joint:
        q, m = shape[1], int(math.prod(shape[2:]))
        return q, (m if scope == "per_task" else k * m)
    size = int(math.prod(shape[1:]))
    return 1, (size if scope == "per_task" else k * size)


def magnitude_mask(
    magnitudes: Float[Array, "K ..."],
    keep: float | None = None,
    scope: Scope = "joint",
    rule: Rule = "kthvalue",
    valid_rows: Bool[Array, " q"] | None = None,
    counts: Array | None = None,
) -> Bool[Array, "K ..."]:
    """Which entries survive magnitude pruning at density `keep`.

    Args:
      magnitudes: (K, ...) non-negative magnitudes. In a joint space (K, q, m).
      keep: fraction kept (1 - drop rate), or None when `counts` are given.
      scope: "joint" ranks all K tasks' entries together (DRM step 5); "per_task" ranks each task alone
        (TIES' trim; DRM's per-block ablation).
      rule: "kthvalue": keep magnitudes >= the k-th smallest, k = N - round(N keep) (the TIES/DRM
        reference code, which keeps N - k + 1 entries). "top_k": keep exactly floor(keep N) largest
        (mergekit's `magnitude`, up to ties).
      valid_rows: joint-space rank mask (q,); invalid rows never survive and are not counted in N.
      counts: `pruning_counts` table, shape (rows + 1,) or (K, rows + 1) for per-task densities
        (per_task scope only); computed from `keep` when None.
    """
    per_task = scope == "per_task"
    joint_space = valid_rows is not None
    rows, row_size = prune_geometry(magnitudes.shape, scope, joint_space)
    if counts is None:
        counts = pruning_counts(check_fraction("density", keep) if not isinstance(keep, jax.core.Tracer) else keep,
                                rows, row_size, rule)
    k_tasks = magnitudes.shape[0]
    flat = magnitudes.reshape(k_tasks, -1) if per_task else magnitudes.reshape(1, -1)
    n_valid = jnp.sum(valid_rows, dtype=jnp.int32) if joint_space else jnp.int32(1)
    k = counts[..., n_valid]  # () or (K,)
    k = jnp.broadcast_to(k, (flat.shape[0],))
    if not joint_space:
        mask = jax.vmap(lambda x, kk: keep_at_least_kth(x, kk))(flat, k)
    else:
        valid = jnp.broadcast_to(valid_rows[None, :, None], magnitudes.shape).reshape(flat.shape)
        mask = jax.vmap(lambda x, kk, v: keep_at_least_kth(x, kk, v))(flat, k, valid)
    return mask.reshape(magnitudes.shape)


def prune(keep: float | None = None, scope: Scope = "joint", rule: Rule = "kthvalue") -> MergeTransform:
    """Magnitude pruning of the current values at density `keep` (see `magnitude_mask`).

    keep: a fixed density, or None to read it from the merge state (traced): the exact counts
      `state.hparams["prune_counts"]` where the engine computed them, else `state.hparams["density"]`.
    In a joint space the magnitudes are those of the unit-norm blocks (after `renormalize`) or of Vh
    (without), and the values keep their scale: X_t = S_t V_t pruned (DRM steps 5-6).
    """
    if keep is not None:
        keep = check_fraction("density", keep)
    if scope not in ("joint", "per_task"):
        raise ValueError(f"unknown pruning scope {scope!r}; expected 'joint' or 'per_task'")
    if rule not in ("kthvalue", "top_k"):
        raise ValueError(f"unknown pruning rule {rule!r}; expected 'kthvalue' or 'top_k'")

    def apply(state: MergeState) -> MergeState:
        counts = None if keep is not None else state.hparams.get("prune_counts")
        density = keep if keep is not None or counts is not None else hyper(state, None, "density")
        mask = magnitude_mask(unit_magnitudes(state), density, scope, rule, state.valid, counts)
        return state.replace(values=jnp.where(mask, state.values, 0.0))

    return apply


def prune_by_threshold() -> MergeTransform:
    """Keep entries whose magnitude is >= their task's threshold in `MergeState.threshold`.

    The thresholds come from the whole task vector (TIES paper); the engine computes them beforehand.
    """

    def apply(state: MergeState) -> MergeState:
        if state.threshold is None:
            raise ValueError("prune_by_threshold() needs MergeState.threshold")
        keep = unit_magnitudes(state) >= broadcast_tasks(state.threshold, state.values)
        return state.replace(values=jnp.where(keep, state.values, 0.0))

    return apply


def random_drop_mask(key: Array, shape: tuple[int, ...], drop_rate) -> Bool[Array, "..."]:
    """Bernoulli keep-mask with P(keep) = 1 - drop_rate; drop_rate () or (K,) for shape (K, ...)."""
    keep = 1.0 - jnp.asarray(drop_rate, jnp.float32)
    return jax.random.bernoulli(key, keep.reshape(keep.shape + (1,) * (len(shape) - keep.ndim)), shape)


def dare_drop(drop_rate: float | None = None, rescale: bool = True) -> MergeTransform:
    """DARE (arXiv 2311.03099): drop each entry with probability p, rescale survivors by 1 / (1 - p).

    drop_rate: a fixed p, or None to read it from the merge state: `state.hparams["drop_rate"]`, shape ()
      or (K,) (one per model), with the keep probability 1 - p and the factor 1 / (1 - p) computed exactly
      on the host where given ("dare_keep", "dare_scale"). p = 1 drops everything.
    Uses `MergeState.key`; the engine derives it from the seed and the leaf's path, so the result does
    not depend on how leaves are grouped, chunked or sharded.
    """
    if drop_rate is not None:
        drop_rate = check_fraction("drop rate", drop_rate)

    def apply(state: MergeState) -> MergeState:
        if state.key is None:
            raise ValueError("dare_drop() needs a PRNG key in MergeState.key")
        if drop_rate is not None:
            keep_p, factor = dare_factors(drop_rate)
        elif "dare_keep" in state.hparams:
            keep_p, factor = state.hparams["dare_keep"], state.hparams["dare_scale"]
        else:
            keep_p, factor = dare_factors(hyper(state, None, "drop_rate"))
        keep_p = jnp.asarray(keep_p, jnp.float32)
        factor = jnp.asarray(factor if rescale else 1.0, state.values.dtype)
        if keep_p.ndim:  # one probability per model
            keep_p = broadcast_tasks(keep_p, state.values)
        if factor.ndim:
            factor = broadcast_tasks(factor, state.values)
        mask = jax.random.bernoulli(state.key, keep_p, state.values.shape)
        return state.replace(values=jnp.where(mask, state.values * factor, 0.0))

    return apply


def dare_factors(drop_rate):
    """(keep probability 1 - p, rescaling 1 / (1 - p), 0 where p = 1), in float64 on the host for
    concrete p (the float32 of 1 - 0.9 is not 1 - float32(0.9)), on the device for a traced one."""
    if isinstance(drop_rate, jax.core.Tracer):
        keep = 1.0 - drop_rate
        return keep, jnp.where(keep > 0, 1.0 / jnp.where(keep > 0, keep, 1.0), 0.0)
    keep = 1.0 - np.asarray(drop_rate, np.float64)
    with np.errstate(divide="ignore"):
        factor = np.where(keep > 0, 1.0 / np.where(keep > 0, keep, 1.0), 0.0)
    return jnp.asarray(keep.astype(np.float32)), jnp.asarray(factor.astype(np.float32))


__all__ = ["Rule", "Scope", "check_fraction", "dare_drop", "dare_factors", "magnitude_mask", "prune",
           "prune_by_threshold", "prune_geometry", "random_drop_mask"]
