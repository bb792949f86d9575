"""Weight averaging and task arithmetic (docs/methods.md#linear, docs/methods.md#task-arithmetic).

Both are linear combinations of the inputs: nothing is prepared besides the task vectors, coefficients
and lambda are traced, and the merge is one fused elementwise pass.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from drm_jax.math.mean import generalized_reduce, scale
from drm_jax.math.rounding import rounded_task_arithmetic
from drm_jax.math.state import chain
from drm_jax.methods.base import COEFFICIENTS, INT8_MASK, LAMBDA, ROUND_TO, MethodSpec, Param, Rules, chain_rule, scalar

LINEAR_NORMALIZE = Param("normalize", "bool", True, "divide by the sum of the weights (false: a weighted sum)")
TA_NORMALIZE = Param("normalize", "bool", False, "divide the weighted sum by the sum of the weights")
# mergekit's task_arithmetic declares these (it is its generalized task arithmetic without a sparsifier) and
# ignores them; accepted so that its configs run unchanged
TA_DENSITY = Param("density", "fraction", 1.0, "accepted for mergekit configs; no effect (task arithmetic does not "
                   "sparsify)", traced=True, per_model=True)
TA_RESCALE = Param("rescale", "bool", False, "accepted for mergekit configs; no effect")


def _build_linear(static: dict) -> Rules:
    rule = chain_rule(generalized_reduce(False, static["normalize"]))
    return Rules(linear=rule, other=rule, row_separable=frozenset({"matrix", "other"}), linear_combination=True,
                 shift_equivariant=static["normalize"])


def _build_task_arithmetic(static: dict) -> Rules:
    rule = chain_rule(chain(generalized_reduce(False, static["normalize"]), scale()))
    if static["round_to"] is not None:  # mergekit's dtype: its float16 arithmetic (linear: float32)
        rule = chain_rule(rounded_task_arithmetic(None, False, static["normalize"], static["round_to"]))
    return Rules(linear=rule, other=rule, row_separable=frozenset({"matrix", "other"}), linear_combination=True)


class LinearNumbers(NamedTuple):
    """Weight averaging reads no number besides the coefficients (`LayerContext.coefficients`)."""


class TaskArithmeticNumbers(NamedTuple):
    """Task arithmetic's one number besides the coefficients: lambda_."""

    lambda_: Any


def _linear_numbers(values, role, shape, k, static) -> LinearNumbers:
    return LinearNumbers()


def _task_arithmetic_numbers(values, role, shape, k, static) -> TaskArithmeticNumbers:
    return TaskArithmeticNumbers(scalar(values["lambda_"]))


LINEAR = MethodSpec(
    name="linear",
    summary="weighted average of the models (model soups)",
    paper="Wortsman et al., Model soups, arXiv 2203.05482",
    params=(COEFFICIENTS, LINEAR_NORMALIZE),
    needs_base=False, elementwise=True, random=False, mergekit=True,
    build=_build_linear, layer_hparams=_linear_numbers, reference="docs/methods.md#linear",
)

TASK_ARITHMETIC = MethodSpec(
    name="task_arithmetic",
    summary="base + lambda * sum_t lambda_t delta_t",
    paper="Ilharco et al., Editing Models with Task Arithmetic, arXiv 2212.04089",
    params=(COEFFICIENTS, LAMBDA, TA_NORMALIZE, TA_DENSITY, TA_RESCALE, INT8_MASK),
    needs_base=True, elementwise=True, random=False, mergekit=True,
    build=_build_task_arithmetic, layer_hparams=_task_arithmetic_numbers, reference="docs/methods.md#task-arithmetic",
    engine_params=(ROUND_TO,),
)

__all__ = ["LINEAR", "LinearNumbers", "TASK_ARITHMETIC", "TaskArithmeticNumbers"]
