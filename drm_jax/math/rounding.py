"""Stages that round where arithmetic in a narrower dtype rounds (mergekit's `dtype: float16`).

mergekit casts every input to its config's `dtype` and runs its generalized task arithmetic (task
arithmetic, TIES, DARE) in that dtype, one rounded operation after another: the deltas, the weights, each
product, each sum over the models, the division, the lambda scaling (docs/methods.md#compute-dtype). These
stages compute in float32 and round to the narrow dtype after each of those operations. A float32
operation on float16 or bfloat16 values, rounded once, is the correctly rounded narrow result (float32 has
more than 2p + 2 bits for p = 11 and 8), so the emulation is exact where the order of operations is
mergekit's: sums over the models are taken in float32 and rounded once, as torch does.

`round_to` is None (no rounding: every stage is the identity wrapper) or a dtype name ("float16",
"bfloat16").
"""

from __future__ import annotations

import jax.numpy as jnp

from drm_jax.math.elect import elect_sign
from drm_jax.math.mean import scale, scale_by_coefficients
from drm_jax.math.state import MergeState, MergeTransform, chain, task_sum

# mergekit's guard for a vanishing sum of weights (generalized task arithmetic without consensus).
_TINY_WEIGHT = 1e-8


# float16: normal numbers from 2**-14; below, subnormals spaced 2**-24
_F16_MIN_NORMAL, _F16_SUBNORMAL_STEP = 2.0**-14, 2.0**24


def round_to_dtype(x, round_to: str):
    """x (float32) rounded to the nearest value of `round_to` ("float16", "bfloat16"), ties to even, as
    `x.astype(round_to).astype(x.dtype)` computes it, float16's subnormals and overflow to inf included.

    Written with `lax.reduce_precision` (integer operations on the bits) rather than two conversions:
    the CPU compiler may drop a float32 -> float16 -> float32 round trip between two operations (it
    keeps excess precision for half-precision arithmetic), which changes results where an intermediate
    lies off the float16 grid.
    """
    from jax import lax

    if round_to == "bfloat16":
        return lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
    if round_to == "float16":
        normal = lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)  # flushes float16 subnormals
        tiny = jnp.round(x * _F16_SUBNORMAL_STEP) / _F16_SUBNORMAL_STEP  # exact scalings by 2**24
        return jnp.where(jnp.abs(x) < _F16_MIN_NORMAL, tiny, normal)
    raise ValueError(f"unknown rounding dtype {round_to!r}; expected 'float16' or 'bfloat16'")


def rounder(round_to: str | None):
    """x -> `round_to_dtype(x, round_to)` (the identity for None; None stays None)."""
    if round_to is None:
        return lambda x: x
    return lambda x: x if x is None else round_to_dtype(x, round_to)


def round_inputs(round_to: str | None) -> MergeTransform:
    """The task deltas and the coefficients as the narrow dtype holds them (mergekit: `model - base` in that
    dtype, the weights a tensor of that dtype)."""
    r = rounder(round_to)

    def apply(state: MergeState) -> MergeState:
        return state.replace(values=r(state.values), coefficients=r(state.coefficients))

    return apply


def rounded_after(stage: MergeTransform, round_to: str | None) -> MergeTransform:
    """`stage`, then its values and merged value rounded (one narrow operation: a product, a scaling)."""
    if round_to is None:
        return stage
    r = rounder(round_to)

    def apply(state: MergeState) -> MergeState:
        out = stage(state)
        return out.replace(values=r(out.values), merged=r(out.merged))

    return apply


def rounded_reduce(consensus: bool, normalize: bool, round_to: str | None) -> MergeTransform:
    """mergekit's reduction of the weighted deltas X_t (after `scale_by_coefficients`, and with `consensus`
    after the sign election zeroed the disagreeing ones), each operation rounded:

    consensus: mixed = R(sum_t X_t), divisor = R(sum_t lambda_t [X_t kept]), 1 where it is 0;
    else: mixed = R(sum_t X_t), divisor = R(sum_t lambda_t), 1 where |divisor| < 1e-8;
    normalize: merged = R(mixed / divisor), else merged = mixed.
    """
    r = rounder(round_to)

    def apply(state: MergeState) -> MergeState:
        values, c = state.values, state.coefficients
        mixed = r(task_sum(values))
        if not normalize:
            return state.replace(merged=mixed)
        if consensus:
            divisor = r(task_sum((values != 0).astype(values.dtype), c))
            divisor = jnp.where(divisor == 0, jnp.ones_like(divisor), divisor)
        else:
            divisor = r(jnp.sum(c))
            divisor = jnp.where(jnp.abs(divisor) < _TINY_WEIGHT, jnp.ones_like(divisor), divisor)
        return state.replace(merged=r(mixed / divisor))

    return apply


def rounded_task_arithmetic(sparsify: MergeTransform | None, consensus: bool, normalize: bool,
                            round_to: str) -> MergeTransform:
    """mergekit's generalized task arithmetic in `round_to`, rounded per operation: deltas and weights in the
    narrow dtype, the sparsifier (TIES' trim, DARE's drop) on them, X_t = R(lambda_t delta_t), with
    `consensus` the sign election (+ on a tie), `rounded_reduce`, then R(lambda merged). The engine adds
    the base and rounds the sum (docs/methods.md#compute-dtype)."""
    stages = [round_inputs(round_to)]
    if sparsify is not None:
        stages.append(rounded_after(sparsify, round_to))
    stages.append(rounded_after(scale_by_coefficients(), round_to))
    if consensus:
        stages.append(elect_sign("positive"))
    stages += [rounded_reduce(consensus, normalize, round_to), rounded_after(scale(), round_to)]
    return chain(*stages)


__all__ = ["round_inputs", "round_to_dtype", "rounded_after", "rounded_reduce", "rounded_task_arithmetic", "rounder"]
