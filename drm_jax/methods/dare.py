"""DARE: random drop and rescale, then task arithmetic or TIES' sign consensus (docs/methods.md#dare).

The drop probability (one for all models or one per model) is traced; the masks are drawn from each
tensor's own key (the seed folded with a hash of the tensor's name), one key per row of the tensor, so
they do not depend on grouping, chunking, sharding or a cut into row blocks, and a new drop rate reuses
the compiled program. `rescale_rule` picks the paper's
rescaling (1 / (1 - p), the Python default) or mergekit 0.1.5's (each task tensor keeps its L1 norm, the
command line's default).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from drm_jax.math.mean import generalized_reduce, scale
from drm_jax.math.sparsify import dare_drop, dare_factors
from drm_jax.math.state import chain
from drm_jax.methods.base import (COEFFICIENTS, INT8_MASK, LAMBDA, SEED, MethodSpec, Param, Rules, chain_rule, one_minus,
                                  per_model_values, scalar)

DROP_RATE = Param("drop_rate", "fraction", 0.8, "probability of dropping each delta entry (= 1 - density)",
                  traced=True, per_model=True, aliases=("density",), alias_maps=(("density", one_minus),),
                  mergekit_default=0.0)
RESCALE = Param("rescale", "bool", True, "rescale the surviving entries (see rescale_rule)")
RESCALE_RULE = Param("rescale_rule", "choice", "inverse", "inverse: survivors divided by 1 - drop_rate (the paper); "
                     "l1: each task tensor keeps its L1 norm (mergekit 0.1.5's rescale, the command line's default)",
                     choices=("inverse", "l1"), mergekit_default="l1")
LINEAR_NORMALIZE = Param("normalize", "bool", False, "divide the weighted sum by the sum of the weights")
TIES_NORMALIZE = Param("normalize", "bool", True, "divide by the weighted count of agreeing models",
                       mergekit_default=False)


# After the drop every stage is elementwise (sums, sign election and means over the tasks of one entry):
# a leaf larger than the memory budget is merged in row blocks (`chain_rule`'s rows_after).
def _build_linear(static: dict) -> Rules:
    drop = dare_drop(None, static["rescale"], static["rescale_rule"])
    rule = chain_rule(chain(drop, generalized_reduce(False, static["normalize"]), scale()), rows_after=drop)
    return Rules(linear=rule, other=rule)


def _build_ties(static: dict) -> Rules:
    drop = dare_drop(None, static["rescale"], static["rescale_rule"])
    rule = chain_rule(chain(drop, generalized_reduce(True, static["normalize"]), scale()), rows_after=drop)
    return Rules(linear=rule, other=rule)


class DareNumbers(NamedTuple):
    """The numbers DARE's rules read for one group: lambda_, and the keep probabilities and rescaling
    factors (K,) that `dare_factors`, the hook of `dare_drop(None)`, derives from the drop rates exactly."""

    lambda_: Any
    dare_keep: Any
    dare_scale: Any


def layer_hparams(values: dict, role: str, shape: tuple[int, ...], k: int, static: dict) -> DareNumbers:
    keep, factor = dare_factors(per_model_values(values["drop_rate"], k, "drop_rate"))
    return DareNumbers(scalar(values["lambda_"]), keep, factor)


_COMMON = (DROP_RATE, COEFFICIENTS, LAMBDA, SEED, RESCALE, RESCALE_RULE, INT8_MASK)

DARE_LINEAR = MethodSpec(
    name="dare_linear",
    summary="DARE drop and rescale, then task arithmetic",
    paper="Yu et al., Language Models are Super Mario (DARE), arXiv 2311.03099",
    params=_COMMON + (LINEAR_NORMALIZE,),
    needs_base=True, elementwise=False, random=True, mergekit=True,  # mergekit's L1 rescale is per tensor
    build=_build_linear, layer_hparams=layer_hparams, reference="docs/methods.md#dare",
)

DARE_TIES = MethodSpec(
    name="dare_ties",
    summary="DARE drop and rescale, then TIES' sign election and weighted disjoint mean",
    paper="Yu et al., Language Models are Super Mario (DARE), arXiv 2311.03099",
    params=_COMMON + (TIES_NORMALIZE,),
    needs_base=True, elementwise=False, random=True, mergekit=True,  # mergekit's L1 rescale is per tensor
    build=_build_ties, layer_hparams=layer_hparams, reference="docs/methods.md#dare",
)

__all__ = ["DARE_LINEAR", "DARE_TIES", "DareNumbers"]
