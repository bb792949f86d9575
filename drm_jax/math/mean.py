"""Reductions over the task axis, and scalings: disjoint mean, weighted mean, sum, lambda."""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float

from drm_jax.math.state import MergeState, MergeTransform, broadcast_tasks, hyper, task_sum

# mergekit's guard for a vanishing sum of weights.
_TINY_WEIGHT = 1e-8


def disjoint_mean_of(values: Float[Array, "K ..."]) -> Float[Array, "..."]:
    """sum_t X_t / max(1, count_t(X_t != 0)) (TIES; docs/methods.md#drm-h step 8)."""
    count = task_sum((values != 0).astype(values.dtype))
    return task_sum(values) / jnp.maximum(count, 1)


def scale_by_coefficients() -> MergeTransform:
    """X_t *= lambda_t."""

    def apply(state: MergeState) -> MergeState:
        return state.replace(values=state.values * broadcast_tasks(state.coefficients, state.values))

    return apply


def disjoint_mean(weighting: Literal["count", "coefficients"] = "count") -> MergeTransform:
    """Mean over the tasks that kept an entry.

    weighting: "count" divides by the number of non-zero task values (docs/methods.md#ties-model, the TIES paper). "coefficients"
      divides by the sum of the coefficients of those tasks, 1 where that sum is 0 (mergekit's `ties`
      with `normalize: true`, applied after `scale_by_coefficients`).
    """
    if weighting not in ("count", "coefficients"):
        raise ValueError(f"unknown weighting {weighting!r}; expected 'count' or 'coefficients'")

    def apply(state: MergeState) -> MergeState:
        if weighting == "count":
            return state.replace(merged=disjoint_mean_of(state.values))
        kept = (state.values != 0).astype(state.values.dtype)
        divisor = task_sum(kept, state.coefficients)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
        return state.replace(merged=task_sum(state.values) / divisor)

    return apply


def sum_tasks() -> MergeTransform:
    """merged = sum_t X_t (task arithmetic, after `scale_by_coefficients`)."""

    def apply(state: MergeState) -> MergeState:
        return state.replace(merged=task_sum(state.values))

    return apply


def mean_tasks() -> MergeTransform:
    """merged = mean_t X_t (plain mean)."""

    def apply(state: MergeState) -> MergeState:
        return state.replace(merged=task_sum(state.values) / state.values.shape[0])

    return apply


def weighted_mean() -> MergeTransform:
    """merged = sum_t lambda_t X_t / sum_t lambda_t (weight average; divisor 1 if the sum vanishes)."""

    def apply(state: MergeState) -> MergeState:
        c = state.coefficients
        total = jnp.sum(c)
        total = jnp.where(jnp.abs(total) < _TINY_WEIGHT, 1.0, total)
        return state.replace(merged=task_sum(state.values, c) / total)

    return apply


def scale(factor: float | None = None) -> MergeTransform:
    """merged *= factor (the global lambda of task arithmetic and TIES).

    factor: a fixed number, or None to read the traced `state.hparams["lambda_"]`.
    """
    factor = None if factor is None else float(factor)

    def apply(state: MergeState) -> MergeState:
        if state.merged is None:
            raise ValueError("scale() multiplies the merged value: put a mean or sum stage before it")
        return state.replace(merged=state.merged * jnp.asarray(hyper(state, factor, "lambda_"), state.merged.dtype))

    return apply


__all__ = ["disjoint_mean", "disjoint_mean_of", "mean_tasks", "scale", "scale_by_coefficients",
           "sum_tasks", "weighted_mean"]
