"""DELLA: magnitude-ranked random drop (MagPrune), rescale, then TIES' sign consensus (`della`) or task
arithmetic (`della_linear`), as mergekit 0.1.5 does (docs/methods.md#della).

Each entry is kept with a probability that grows linearly with its magnitude rank in its row, from
density - epsilon to density + epsilon; the draws come from each tensor's own key (the seed folded with
its name), one key per row, so a tensor cut into row blocks draws what it draws whole. density and
epsilon (per model), the weights and lambda are traced: the probability of each rank is computed on the
host in float64 where they are concrete (`rank_probabilities`, the hook of the stage) and reaches the
program as a (K, n) array, so a new value never compiles again; there the rule that density +- epsilon
lie in (0, 1) is checked too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from drm_jax.errors import MergeInputError
from drm_jax.math.mean import generalized_reduce, scale
from drm_jax.math.sparsify import rank_probabilities, ranked_drop
from drm_jax.math.state import chain
from drm_jax.methods.base import (COEFFICIENTS, INT8_MASK, LAMBDA, SEED, MethodSpec, Param, Rules, chain_rule,
                                  per_model_numbers, scalar)
from drm_jax.methods.breadcrumbs import DENSITY

EPSILON = Param("epsilon", "float", 0.15, "half-width of the keep probabilities: from density - epsilon (smallest "
                "magnitude of a row) to density + epsilon (largest)", traced=True, per_model=True)
RESCALE = Param("rescale", "bool", True, "restore the magnitude of the survivors (see rescale_rule)")
RESCALE_RULE = Param("rescale_rule", "choice", "l1", "l1: each task tensor keeps its L1 norm (mergekit); inverse: "
                     "each survivor divided by its keep probability (the paper)", choices=("l1", "inverse"))


def _normalize(default: bool) -> Param:
    return Param("normalize", "bool", default, "divide by the sum of the weights (della: of the agreeing models' "
                 "weights)")


def _builder(consensus: bool):
    def build(static: dict) -> Rules:
        drop = ranked_drop(None, None, static["rescale"], static["rescale_rule"])
        # the ranks are per row and the reduction elementwise: a large leaf is merged in row blocks
        rule = chain_rule(chain(drop, generalized_reduce(consensus, static["normalize"]), scale()), rows_after=drop)
        return Rules(linear=rule, other=rule)

    return build


def check_band(density, epsilon) -> None:
    """mergekit's rule: where 0 < density < 1, density - epsilon and density + epsilon must lie in (0, 1)."""
    if not isinstance(density, np.ndarray) or not isinstance(epsilon, np.ndarray):
        return  # traced values: the probabilities are used as they are (clipped to [0, 1] by the draw)
    for t, (d, e) in enumerate(zip(density, epsilon)):
        if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
            raise MergeInputError(f"della: model {t} has density {d:g} and epsilon {e:g}; density - epsilon and "
                                  f"density + epsilon must lie in (0, 1)")


class DellaNumbers(NamedTuple):
    """The numbers DELLA's rule reads: lambda_, and each model's keep probability of each magnitude rank
    (K, n) that `rank_probabilities`, the hook of `ranked_drop(None, None)`, derives from density and epsilon."""

    lambda_: Any
    della_probabilities: Any


def layer_hparams(values: dict, role: str, shape: tuple[int, ...], k: int, static: dict) -> DellaNumbers:
    density = per_model_numbers(values["density"], k, "density")
    epsilon = per_model_numbers(values["epsilon"], k, "epsilon")
    check_band(density, epsilon)
    return DellaNumbers(scalar(values["lambda_"]), rank_probabilities(density, epsilon, (k,) + tuple(shape)))


_PAPER = ("Deep, Bhardwaj and Poria, DELLA-Merging: Reducing Interference in Model Merging through "
          "Magnitude-Based Sampling, arXiv 2406.11617")


def _spec(name: str, summary: str, consensus: bool, normalize: bool) -> MethodSpec:
    return MethodSpec(
        name=name, summary=summary, paper=_PAPER,
        params=(DENSITY, EPSILON, COEFFICIENTS, LAMBDA, _normalize(normalize), RESCALE, RESCALE_RULE, SEED,
                INT8_MASK),
        needs_base=True, elementwise=False, random=True, mergekit=True,
        build=_builder(consensus), layer_hparams=layer_hparams, reference="docs/methods.md#della",
    )


DELLA = _spec("della", "DELLA: magnitude-ranked random drop, L1 rescale, TIES' sign consensus", True, True)
DELLA_LINEAR = _spec("della_linear", "DELLA's magnitude-ranked random drop and L1 rescale, then task arithmetic",
                     False, False)

__all__ = ["DELLA", "DELLA_LINEAR", "check_band"]
