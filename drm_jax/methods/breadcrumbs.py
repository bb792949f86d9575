"""Model Breadcrumbs: drop each task vector's largest outliers and its smallest entries, then task arithmetic
(`breadcrumbs`) or TIES' sign consensus (`breadcrumbs_ties`), as mergekit 0.1.5 does
(docs/methods.md#breadcrumbs).

Per model and tensor, the band of kept magnitudes is two integer counts computed on the host from the
tensor's size and the model's density and gamma (`band_counts`); they reach the merge program as arrays,
so a new density, gamma, weight or lambda never compiles again. Nothing is prepared besides the task
vectors.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from drm_jax.math.mean import generalized_reduce, scale
from drm_jax.math.sparsify import band_counts, magnitude_band, rescale_l1
from drm_jax.math.state import chain
from drm_jax.methods.base import (COEFFICIENTS, INT8_MASK, LAMBDA, MethodSpec, Param, Rules, chain_rule, one_minus,
                                  per_model_numbers, scalar)

DENSITY = Param("density", "fraction", 1.0, "fraction of each task's tensor kept (= 1 - drop_rate; mergekit's "
                "default 1 keeps everything)", traced=True, per_model=True, aliases=("drop_rate",),
                alias_maps=(("drop_rate", one_minus),))
GAMMA = Param("gamma", "fraction", 0.01, "fraction of each task's tensor dropped from the top as outliers (the "
              "largest magnitudes)", traced=True, per_model=True)
RESCALE = Param("rescale", "bool", False, "scale each sparsified task tensor back to its L1 norm (mergekit)")
NORMALIZE = Param("normalize", "bool", False, "divide by the sum of the weights (with the consensus: of the "
                  "agreeing models' weights)")


def _builder(consensus: bool):
    def build(static: dict) -> Rules:
        sparsify = rescale_l1(magnitude_band(None, None)) if static["rescale"] else magnitude_band(None, None)
        rule = chain_rule(chain(sparsify, generalized_reduce(consensus, static["normalize"]), scale()))
        return Rules(linear=rule, other=rule)

    return build


class BreadcrumbsNumbers(NamedTuple):
    """The numbers Breadcrumbs' rule reads: lambda_, and each model's magnitude band (K,) that `band_counts`,
    the hook of `magnitude_band(None, None)`, derives from density and gamma."""

    lambda_: Any
    band_low: Any
    band_count: Any


def layer_hparams(values: dict, role: str, shape: tuple[int, ...], k: int, static: dict) -> BreadcrumbsNumbers:
    n = int(math.prod(shape))
    low, count = band_counts(per_model_numbers(values["density"], k, "density"),
                             per_model_numbers(values["gamma"], k, "gamma"), n)
    return BreadcrumbsNumbers(scalar(values["lambda_"]), low, count)


_PARAMS = (DENSITY, GAMMA, COEFFICIENTS, LAMBDA, NORMALIZE, RESCALE, INT8_MASK)
_PAPER = ("Davari and Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
          "arXiv 2312.06795")

BREADCRUMBS = MethodSpec(
    name="breadcrumbs",
    summary="Model Breadcrumbs: drop the largest outliers and the smallest entries, then task arithmetic",
    paper=_PAPER, params=_PARAMS,
    needs_base=True, elementwise=False, random=False, mergekit=True,
    build=_builder(False), layer_hparams=layer_hparams, reference="docs/methods.md#breadcrumbs",
)

BREADCRUMBS_TIES = MethodSpec(
    name="breadcrumbs_ties",
    summary="Model Breadcrumbs' sparsification, then TIES' sign consensus",
    paper=_PAPER, params=_PARAMS,
    needs_base=True, elementwise=False, random=False, mergekit=True,
    build=_builder(True), layer_hparams=layer_hparams, reference="docs/methods.md#breadcrumbs",
)

__all__ = ["BREADCRUMBS", "BREADCRUMBS_TIES"]
