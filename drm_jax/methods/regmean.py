"""RegMean, data-aware and in closed form (docs/methods.md#regmean), and RegMean++'s entry
(docs/methods.md#regmean-plus-plus).

RegMean: each 2-D weight on the linear path is the solve of `drm_jax.math.regmean` with the models' Gram
matrices of that layer's inputs, given per leaf (`LeafData` "grams": one dict per model, {leaf name:
(in, in)}, as `drm_jax.input_grams` gives); every other leaf is the mean of the models. A linear leaf the
dicts do not name gets identity Grams, under which the solve is the mean (`drm_jax.regmean_merge` does the
same). RegMean is shift-equivariant (its weights sum to the identity), so the solve on the task vectors
plus the base equals the solve on the models. `reduce_non_diagonal_ratio` is traced.

RegMean++ takes each block's inputs from the partially merged model, block after block: it needs the
models' forward functions and data, not their weights alone, so it is the function
`drm_jax.regmean_plusplus`, listed here for `drm-jax methods`; merging by its name says so.
"""

from __future__ import annotations

import numpy as np

from drm_jax.errors import MergeInputError
from drm_jax.math.mean import mean_tasks
from drm_jax.math.regmean import DEFAULT_REDUCE_NON_DIAGONAL_RATIO, regmean
from drm_jax.methods.base import LayerContext, LayerRule, LeafData, MethodSpec, Param, Rules, chain_rule, traced_numbers

REDUCE_NON_DIAGONAL_RATIO = Param(
    "reduce_non_diagonal_ratio", "fraction", DEFAULT_REDUCE_NON_DIAGONAL_RATIO,
    "alpha: the Grams' off-diagonal entries are multiplied by it (1: least squares; 0: a per-input mean)",
    traced=True)

GRAMS = LeafData(
    "grams", "one dict per model {2-D weight's leaf name: (in, in) Gram matrix of its inputs} "
    "(drm_jax.input_grams); a weight not named takes the mean",
    shape=lambda shape: (shape[1], shape[1]),
    missing=lambda shape: np.eye(shape[1], dtype=np.float32))

_numbers = traced_numbers("RegMeanNumbers", "reduce_non_diagonal_ratio")


def _build(static: dict) -> Rules:
    def merge(prepared, ctx: LayerContext):
        deltas, (grams,) = prepared
        # canonical (out, in) weights: y = x W^T, the Grams live in the input space (axis 1)
        return regmean(deltas, grams, ctx.hparams.reduce_non_diagonal_ratio, input_axis=1)

    return Rules(linear=LayerRule(prepare=None, merge=merge), other=chain_rule(mean_tasks()))


REGMEAN = MethodSpec(
    name="regmean",
    summary="each 2-D weight solving min_W sum_t ||X_t W^T - X_t W_t^T||^2 from the models' input Gram matrices "
            "(grams=...); other leaves the mean",
    paper="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, arXiv 2212.09849",
    params=(REDUCE_NON_DIAGONAL_RATIO,),
    needs_base=True, elementwise=False, random=False, leaf_data=(GRAMS,),
    build=_build, layer_hparams=_numbers, reference="docs/methods.md#regmean",
)


def _build_plusplus(static: dict) -> Rules:
    raise MergeInputError("method 'regmean_plusplus' merges blocks in order, taking each block's inputs from the "
                          "merged blocks before it, so it needs the blocks' forward functions and inputs: call "
                          "drm_jax.regmean_plusplus(block_applies, blocks, inputs) (docs/methods.md#regmean-plus-plus)")


REGMEAN_PLUSPLUS = MethodSpec(
    name="regmean_plusplus",
    summary="RegMean block after block, each block's Grams from the partially merged model: the function "
            "drm_jax.regmean_plusplus(block_applies, blocks, inputs), not a per-layer merge",
    paper="RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model Merging, "
          "arXiv 2508.03121",
    params=(REDUCE_NON_DIAGONAL_RATIO,),
    needs_base=True, elementwise=False, random=False,
    build=_build_plusplus, layer_hparams=_numbers, reference="docs/methods.md#regmean-plus-plus",
)

__all__ = ["REGMEAN", "REGMEAN_PLUSPLUS"]
