"""Reductions over the task axis, and scalings: disjoint mean, weighted mean, sum, lambda."""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float

from drm_jax.math.elect import elect_sign, elected_sign
from drm_jax.math.state import MergeState, MergeTransform, broadcast_tasks, chain, hyper, reads, task_sum

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


def weighted_sum() -> MergeTransform:
    """merged = sum_t lambda_t X_t: `scale_by_coefficients()` then `sum_tasks()` in one stage, same value.

    The products are taken slice by slice inside the sum, so an elementwise merge stays one fused pass over
    the inputs; multiplying the whole (K, ...) stack first makes XLA write that product (task arithmetic
    on the MiniLM tree: 0.28 s against 0.07 s). The stage leaves `values` unscaled: put it last before
    `scale()`, where nothing reads the scaled values again.
    """

    def apply(state: MergeState) -> MergeState:
        return state.replace(merged=task_sum(state.values, state.coefficients))

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

    return apply if factor is not None else reads(apply, "lambda_")


def generalized_reduce(consensus: bool, normalize: bool) -> MergeTransform:
    """mergekit's generalized task arithmetic after its sparsifier (docs/methods.md#generalized-task-arithmetic).

    X_t = lambda_t delta_t; with `consensus`, only the X_t whose sign is the elected one (the sign of
    sum_t X_t, + where it is 0) are kept, and `normalize` divides by the sum of the kept tasks'
    coefficients (1 where it is 0); without `consensus`, `normalize` divides the sum by sum_t lambda_t
    (1 where its magnitude is below 1e-8). Without `normalize`: the sum. Ends with a mean or sum stage
    (put `scale()` after it for the global lambda).
    """
    if consensus:
        return chain(scale_by_coefficients(), elect_sign("positive"),
                     disjoint_mean("coefficients") if normalize else sum_tasks())
    return weighted_mean() if normalize else weighted_sum()


# SCE's floor of a sum of weights (mergekit: `abs(sum) < 1e-6` in float64 of a float32 value, which is
# `< float32(1e-6)` since float32(1e-6) > 1e-6; and `clamp(min=1e-6)` in float32).
_SCE_FLOOR = 1e-6


def energy_weights(values: Float[Array, "K ..."]) -> Float[Array, " K"]:
    """SCE's per-task weights: w_t = mean(X_t^2) / sum_s mean(X_s^2) over the whole tensor, or 1 / K
    each where that sum is below 1e-6 (mergekit's `sce_weight`). values: (K, ...) -> (K,)."""
    k = values.shape[0]
    energy = jnp.mean(jnp.square(values).reshape(k, -1), axis=1)
    total = jnp.sum(energy)
    tiny = jnp.abs(total) < jnp.asarray(_SCE_FLOOR, total.dtype)
    return jnp.where(tiny, 1.0 / k, energy / jnp.where(tiny, 1.0, total))


def energy_weighted_mean(values: Float[Array, "K ..."]) -> Float[Array, "..."]:
    """SCE's merge of (already selected) task vectors X (K, ...) (docs/methods.md#sce).

    Elect s = sign(sum_t X_t) (+ where it is 0); with w = `energy_weights`(X) and a_t = [sign(X_t) = s],
    merged = sum_t w_t a_t X_t / max(sum_t w_t a_t, 1e-6). Entries no task agrees with are 0.
    """

    sign = elected_sign(values, "positive")
    agree = (jnp.sign(values) == sign[None]).astype(values.dtype)
    weights = broadcast_tasks(energy_weights(values), values) * agree
    total = task_sum(weights)
    return task_sum(values * weights) / jnp.maximum(total, jnp.asarray(_SCE_FLOOR, total.dtype))


def overlap_counts(values: Float[Array, "K ..."], epsilon) -> tuple[Array, Array]:
    """RAM's bookkeeping: (active (K, ...) bool: |X_t| > epsilon, count (...) int32 of active tasks)."""
    active = jnp.abs(values) > jnp.asarray(epsilon, values.dtype)
    return active, jnp.sum(active, axis=0, dtype=jnp.int32)


def overlap_mean(values: Float[Array, "K ..."], epsilon) -> Float[Array, "..."]:
    """RAM (docs/methods.md#ram): per entry, the mean of the task values with |X_t| > epsilon (a value
    alone is kept as it is; entries no task reaches are 0). values (K, ...), epsilon () -> (...)."""
    active, count = overlap_counts(values, epsilon)
    kept = jnp.where(active, values, 0.0)
    unique = (count == 1).astype(values.dtype)
    overlap = (count > 1).astype(values.dtype)
    divisor = jnp.maximum(count, 1).astype(values.dtype)
    return task_sum(kept * unique[None] + kept * overlap[None] / divisor[None])


def overlap_mean_plus(values: Float[Array, "K ..."], epsilon, r, alpha) -> Float[Array, "..."]:
    """RAM+ tensor-local (docs/methods.md#ramplus-tl): RAM, with each task's unique entries scaled up.

    Per task t over the tensor: shared_t = #{active entries others also reach}, unique_t = #{active entries
    only t reaches}, rho_t = shared_t / max(unique_t, epsilon), lambda_t = 1 + r clip(rho_t, 0, alpha).
    merged = sum_t (lambda_t X_t [unique] + X_t [overlap] / count), X_t zeroed where |X_t| <= epsilon.
    values (K, ...); epsilon, r, alpha () -> (...). Counts are exact integers, their ratio float32.
    """
    k = values.shape[0]
    active, count = overlap_counts(values, epsilon)
    unique_entry, overlap_entry = count == 1, count > 1
    shared = jnp.sum((active & overlap_entry[None]).reshape(k, -1), axis=1, dtype=jnp.int32)
    unique = jnp.sum((active & unique_entry[None]).reshape(k, -1), axis=1, dtype=jnp.int32)
    dtype = values.dtype
    rho = shared.astype(dtype) / jnp.maximum(unique.astype(dtype), jnp.asarray(epsilon, dtype))
    boost = 1.0 + jnp.asarray(r, dtype) * jnp.clip(rho, 0.0, jnp.asarray(alpha, dtype))
    kept = jnp.where(active, values, 0.0)
    divisor = jnp.maximum(count, 1).astype(dtype)
    return task_sum(kept * unique_entry.astype(dtype)[None] * broadcast_tasks(boost, values)
                    + kept * overlap_entry.astype(dtype)[None] / divisor[None])


__all__ = ["disjoint_mean", "disjoint_mean_of", "energy_weighted_mean", "energy_weights", "generalized_reduce",
           "mean_tasks", "overlap_counts", "overlap_mean", "overlap_mean_plus", "scale", "scale_by_coefficients",
           "sum_tasks", "weighted_mean", "weighted_sum"]
