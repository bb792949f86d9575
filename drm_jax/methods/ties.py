"""TIES-Merging: trim, elect sign, disjoint merge (docs/methods.md#ties).

`trim_scope="tensor"` follows mergekit's `ties` to the tensor: each model's tensor keeps its floor(density N)
largest deltas (at least one; per-model densities allowed), coefficients apply before the sign election,
an exact tie of the sign goes to +, and the mean is weighted by the coefficients of the agreeing models;
`rescale` scales each trimmed task tensor back to its L1 norm (mergekit's `rescale`).
`trim_scope="model"` is the paper's trim over the whole task vector (per-task thresholds computed by the
engine over every merged leaf: the `kthvalue` rule, majority tie rule, mean over the count of agreeing
models). Nothing is prepared besides the task vectors; every number is traced.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from drm_jax.math.elect import elect_sign
from drm_jax.math.mean import disjoint_mean, scale, scale_by_coefficients, sum_tasks
from drm_jax.math.sparsify import prune, prune_by_threshold, prune_counts, rescale_l1
from drm_jax.math.rounding import rounded_task_arithmetic
from drm_jax.math.state import chain
from drm_jax.methods.base import (COEFFICIENTS, INT8_MASK, LAMBDA, ROUND_TO, MethodSpec, Param, Rules, chain_rule,
                                  one_minus, per_model_numbers, scalar)

DENSITY = Param("density", "fraction", 0.2, "fraction of each task vector kept by the trim (= 1 - drop_rate)",
                traced=True, per_model=True, mergekit_default=1.0, aliases=("drop_rate",),
                alias_maps=(("drop_rate", one_minus),))
TRIM_SCOPE = Param("trim_scope", "choice", "tensor", "tensor (mergekit's ties) or model (the paper's trim over "
                   "the whole task vector; alias global)", choices=("tensor", "model", "global"))
NORMALIZE = Param("normalize", "bool", True, "divide by the (weighted) count of agreeing models; false sums them")
RESCALE = Param("rescale", "bool", False, "scale each trimmed task tensor back to its L1 norm (mergekit's rescale)")


def build(static: dict) -> Rules:
    if static["trim_scope"] == "tensor":
        trim, tie, weighting, whole = prune(None, "per_task", "top_k"), "positive", "coefficients", None
    else:
        trim, tie, weighting, whole = prune_by_threshold(), "majority", "count", "density"
    reduce = disjoint_mean(weighting) if static["normalize"] else sum_tasks()
    if static["rescale"]:
        trim = rescale_l1(trim)
    rule = chain_rule(chain(trim, scale_by_coefficients(), elect_sign(tie), reduce, scale()))
    if static["round_to"] is not None and whole is None:  # mergekit's dtype: its float16 arithmetic
        rule = chain_rule(rounded_task_arithmetic(trim, True, static["normalize"], static["round_to"]))
    return Rules(linear=rule, other=rule, whole_model_trim_param=whole)


class TiesNumbers(NamedTuple):
    """The numbers TIES' rule reads for one group: lambda_, and with the tensor-scope trim its exact counts
    (`prune_counts`, the hook of `prune(None)`, from the per-model densities). The model-scope trim's
    density becomes the engine's whole-model thresholds (`Rules.whole_model_trim_param`)."""

    lambda_: Any
    prune_counts: Any = None


def layer_hparams(values: dict, role: str, shape: tuple[int, ...], k: int, static: dict) -> TiesNumbers:
    if static["trim_scope"] != "tensor":
        return TiesNumbers(scalar(values["lambda_"]))
    density = per_model_numbers(values["density"], k, "density")
    return TiesNumbers(scalar(values["lambda_"]),
                       prune_counts(density, (k,) + tuple(shape), "per_task", "top_k", joint=False))


TIES = MethodSpec(
    name="ties",
    summary="TIES-Merging: trim each task vector, elect the sign by mass, disjoint mean",
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, arXiv 2306.01708",
    params=(DENSITY, COEFFICIENTS, LAMBDA, TRIM_SCOPE, NORMALIZE, RESCALE, INT8_MASK),
    needs_base=True, elementwise=False, random=False, mergekit=True,
    build=build, layer_hparams=layer_hparams, reference="docs/methods.md#ties", engine_params=(ROUND_TO,),
)

__all__ = ["TIES", "TiesNumbers"]
