"""Sparsification stages: magnitude pruning (TIES, DRM step 5) and random drop (DARE)."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from drm_jax.math.select import drop_count, keep_at_least_kth
from drm_jax.math.space import unit_magnitudes
from drm_jax.math.state import MergeState, MergeTransform, broadcast_tasks

Scope = Literal["joint", "per_task"]
Rule = Literal["kthvalue", "top_k"]


def check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _static_k(n: int, keep: float, rule: Rule) -> int:
    """k for `keep_at_least_kth` over n entries (static n)."""
    if rule == "kthvalue":
        return n - round(n * keep)  # SPEC / DRM reference
    # mergekit `magnitude`: the floor(keep * n) largest survive (at least one unless keep is 0), i.e.
    # those >= the (n - kept + 1)-th smallest
    kept = max(1, int(keep * n)) if keep > 0 else 0
    return n - kept + 1


def magnitude_mask(
    magnitudes: Float[Array, "K ..."],
    keep: float,
    scope: Scope = "joint",
    rule: Rule = "kthvalue",
    valid_rows: Bool[Array, " q"] | None = None,
) -> Bool[Array, "K ..."]:
    """Which entries survive magnitude pruning at density `keep`.

    Args:
      magnitudes: (K, ...) non-negative magnitudes. In a joint space (K, q, m).
      keep: fraction kept (1 - drop rate).
      scope: "joint" ranks all K tasks' entries together (DRM step 5); "per_task" ranks each task alone
        (TIES' trim; DRM's per-block ablation).
      rule: "kthvalue": keep magnitudes >= the k-th smallest, k = N - round(N keep) (SPEC; the TIES/DRM
        reference code, which keeps N - k + 1 entries). "top_k": keep exactly floor(keep N) largest
        (mergekit's `magnitude`, up to ties).
      valid_rows: joint-space rank mask (q,); invalid rows never survive and are not counted in N.
    """
    if keep >= 1.0 and rule == "top_k":
        return jnp.ones(magnitudes.shape, bool) if valid_rows is None else jnp.broadcast_to(
            valid_rows[None, :, None], magnitudes.shape)
    per_task = scope == "per_task"
    flat = magnitudes.reshape(magnitudes.shape[0], -1) if per_task else magnitudes.reshape(1, -1)
    if valid_rows is None:
        n = flat.shape[1]
        valid = None
        k = _static_k(n, keep, rule)
    else:
        q, m = magnitudes.shape[1], magnitudes.shape[2]
        rows_per_group = 1 if per_task else magnitudes.shape[0]
        valid = jnp.broadcast_to(valid_rows[None, :, None], magnitudes.shape).reshape(flat.shape)
        n_rows = jnp.sum(valid_rows, dtype=jnp.int32)
        if rule == "kthvalue":
            k = drop_count(n_rows, rows_per_group * m, q, keep)
        else:
            n = n_rows * rows_per_group * m
            k = n - jnp.floor(keep * n).astype(jnp.int32) + 1
    if valid is None:
        mask = jax.vmap(lambda x: keep_at_least_kth(x, k))(flat)
    else:
        mask = jax.vmap(lambda x, v: keep_at_least_kth(x, k, v))(flat, valid)
    return mask.reshape(magnitudes.shape)


def prune(keep: float, scope: Scope = "joint", rule: Rule = "kthvalue") -> MergeTransform:
    """Magnitude pruning of the current values at density `keep` (see `magnitude_mask`).

    In a joint space the magnitudes are those of the unit-norm blocks (after `renormalize`) or of Vh
    (without), and the values keep their scale: X_t = S_t V_t pruned (DRM steps 5-6).
    """
    keep = check_fraction("density", keep)
    if scope not in ("joint", "per_task"):
        raise ValueError(f"unknown pruning scope {scope!r}; expected 'joint' or 'per_task'")
    if rule not in ("kthvalue", "top_k"):
        raise ValueError(f"unknown pruning rule {rule!r}; expected 'kthvalue' or 'top_k'")

    def apply(state: MergeState) -> MergeState:
        mask = magnitude_mask(unit_magnitudes(state), keep, scope, rule, state.valid)
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


def random_drop_mask(key: Array, shape: tuple[int, ...], drop_rate: float) -> Bool[Array, "..."]:
    """Bernoulli keep-mask with P(keep) = 1 - drop_rate."""
    return jax.random.bernoulli(key, 1.0 - drop_rate, shape)


def dare_drop(drop_rate: float, rescale: bool = True) -> MergeTransform:
    """DARE (arXiv 2311.03099): drop each entry with probability p, rescale survivors by 1 / (1 - p).

    Uses `MergeState.key`; the engine derives it from the seed and the leaf's path, so the result does
    not depend on how leaves are grouped, chunked or sharded.
    """
    drop_rate = check_fraction("drop rate", drop_rate)

    def apply(state: MergeState) -> MergeState:
        if state.key is None:
            raise ValueError("dare_drop() needs a PRNG key in MergeState.key")
        if drop_rate >= 1.0:
            return state.replace(values=jnp.zeros_like(state.values))
        mask = random_drop_mask(state.key, state.values.shape, drop_rate)
        scale = 1.0 / (1.0 - drop_rate) if rescale else 1.0
        return state.replace(values=jnp.where(mask, state.values * scale, 0.0))

    return apply


__all__ = ["Rule", "Scope", "check_fraction", "dare_drop", "magnitude_mask", "prune",
           "prune_by_threshold", "random_drop_mask"]
