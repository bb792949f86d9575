"""Spherical interpolation of weights: slerp, nuslerp, multislerp, karcher (docs/methods.md#slerp,
docs/methods.md#nuslerp, docs/methods.md#multislerp, docs/methods.md#karcher).

mergekit's methods of the same names, with their parameter names, defaults and base-model rules. The
engine hands a layer's merge the task vectors delta_t = W_t - W_base and the base weights
(`LayerContext.base`); the model weights are W_base + delta_t, and the merge returns the merged weights
minus the base. On the command line, `nuslerp` / `multislerp` without a base_model and `karcher` (whose
base_model, if any, is just one more input) merge the models' own weights over a zero base. Every number
(t, weights, eps, max_iter, tol) is traced; nothing is prepared.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from drm_jax.math import interpolate as ip
from drm_jax.methods.base import COEFFICIENTS, LayerRule, MethodSpec, Param, RowBlocks, Rules, traced_numbers

T = Param("t", "float", 0.5, "interpolation factor: 0 gives the base model, 1 the other model (mergekit: "
          "required)", traced=True, required=True)
WEIGHT = dataclasses.replace(COEFFICIENTS, doc="per-model weight w_t (mergekit's `weight`, required there)",
                             required=True)
NUSLERP_FLATTEN = Param("nuslerp_flatten", "bool", True, "interpolate each tensor as one flattened vector; "
                        "false: one angle per row (per column with nuslerp_row_wise)")
NUSLERP_ROW_WISE = Param("nuslerp_row_wise", "bool", False, "with nuslerp_flatten false: vectors along axis 0 "
                         "(the columns of an (out, in) matrix) instead of the last axis")
NORMALIZE_WEIGHTS = Param("normalize_weights", "bool", True, "divide the weights by their sum")
EPS = Param("eps", "nonnegative", 1e-8, "added to norms before dividing; below it the weighted mean of the unit "
            "vectors counts as zero", traced=True)
MAX_ITER = Param("max_iter", "count", 10, "at most this many Riemannian steps", traced=True)
TOL = Param("tol", "nonnegative", 1e-5, "stop once the tangent step is shorter; tensors with a norm at or below "
            "it take no part in the direction", traced=True)


def _rules(merge, *, exact: bool = False, linear_combination: bool = False) -> Rules:
    rule = LayerRule(prepare=None, merge=merge)
    roles = frozenset({"matrix", "other"}) if exact else frozenset()
    return Rules(linear=rule, other=rule, row_separable=roles, linear_combination=linear_combination)


# -- slerp -----------------------------------------------------------------------------------------------
def _build_slerp(static: dict) -> Rules:
    def merge(deltas, ctx):
        base = ctx.base
        model = base + deltas[0]
        c0, c1 = ip.slerp_coefficients(ctx.hparams.t, base, model)
        return c0 * base + c1 * model - base

    return _rules(merge)


_t_only = traced_numbers("SlerpNumbers", "t")


SLERP = MethodSpec(
    name="slerp",
    summary="spherical interpolation from the base model (t = 0) to one other model (t = 1), one angle per "
            "tensor; linear where the two are nearly colinear",
    paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985",
    params=(T,),
    needs_base=True, elementwise=False, random=False, mergekit=True, base="required", min_models=1, max_models=1,
    reads_base=True,
    build=_build_slerp, layer_hparams=_t_only, reference="docs/methods.md#slerp",
)


# -- nuslerp ---------------------------------------------------------------------------------------------
def _build_nuslerp(static: dict) -> Rules:
    row_wise, flatten = static["nuslerp_row_wise"], static["nuslerp_flatten"]

    def merge(deltas, ctx):
        t = ip.nuslerp_t(ctx.coefficients)
        return ip.nuslerp(t, deltas[0], deltas[1], row_wise=row_wise, flatten=flatten)

    return _rules(merge)


_no_hparams = traced_numbers("NuslerpNumbers")


NUSLERP = MethodSpec(
    name="nuslerp",
    summary="spherical interpolation of two models (of their task vectors where a base is given), t = w_1 / "
            "(w_0 + w_1); per tensor, per row or per column",
    paper="mergekit's NuSLERP (Arcee AI), no paper",
    params=(WEIGHT, NUSLERP_FLATTEN, NUSLERP_ROW_WISE),
    needs_base=False, elementwise=False, random=False, mergekit=True, base="optional", min_models=2, max_models=2,
    build=_build_nuslerp, layer_hparams=_no_hparams, reference="docs/methods.md#nuslerp",
)


# -- multislerp ------------------------------------------------------------------------------------------
def _build_multislerp(static: dict) -> Rules:
    normalize = static["normalize_weights"]

    def merge(deltas, ctx):
        return ip.multislerp(deltas, ctx.coefficients, normalize_weights=normalize, eps=ctx.hparams.eps)

    return _rules(merge)


_eps_only = traced_numbers("MultislerpNumbers", "eps")


MULTISLERP = MethodSpec(
    name="multislerp",
    summary="barycentric spherical interpolation of K models (of their task vectors where a base is given): "
            "tangent-space mean at the weighted mean direction",
    paper="Goddard, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
    params=(WEIGHT, NORMALIZE_WEIGHTS, EPS),
    needs_base=False, elementwise=False, random=False, mergekit=True, base="optional", min_models=1,
    build=_build_multislerp, layer_hparams=_eps_only, reference="docs/methods.md#multislerp",
)


# -- karcher ---------------------------------------------------------------------------------------------
def _build_karcher(static: dict) -> Rules:
    def merge(deltas, ctx):
        k = deltas.shape[0]
        models = ctx.base + deltas
        if ctx.stats is not None:  # a row block: the whole leaf's coefficients (`karcher_coefficients`)
            return jnp.tensordot(jnp.asarray(ctx.stats, models.dtype), models, axes=1) - ctx.base
        alphas = jnp.full((k,), 1.0 / k, deltas.dtype)
        return ip.karcher_mean(models, alphas, ctx.hparams.max_iter, ctx.hparams.tol) - ctx.base

    def coefficients(gram, hparams):
        k = gram.shape[0]
        return ip.karcher_coefficients(gram, np.full(k, 1.0 / k), np.asarray(hparams.max_iter),
                                       np.asarray(hparams.tol))

    # a leaf larger than the memory budget: the Gram matrix summed over row blocks, then sum_k a_k W_k
    rows = RowBlocks(stats=lambda deltas, ctx: ip.karcher_gram(ctx.base + deltas), finish=coefficients, x64=True)
    rule = LayerRule(prepare=None, merge=merge, rows=rows)
    return Rules(linear=rule, other=rule)


_karcher_hparams = traced_numbers("KarcherNumbers", "max_iter", "tol", counts=("max_iter",))


KARCHER = MethodSpec(
    name="karcher",
    summary="Karcher (Riemannian) mean of the models' weights on the unit sphere, equal weights, scaled by "
            "the mean norm",
    paper="Karcher mean merging on the hypersphere, arXiv 2603.04972",
    params=(MAX_ITER, TOL),
    needs_base=False, elementwise=False, random=False, mergekit=True, base="input", min_models=1,
    reads_base=True,
    build=_build_karcher, layer_hparams=_karcher_hparams, reference="docs/methods.md#karcher",
)

__all__ = ["KARCHER", "MULTISLERP", "NUSLERP", "SLERP"]
