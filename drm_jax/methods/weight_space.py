"""Merges that select or mix weights against the base: nearswap, arcee_fusion, model_stock, passthrough
(docs/methods.md#nearswap, docs/methods.md#arcee-fusion, docs/methods.md#model-stock,
docs/methods.md#passthrough).

mergekit's methods of the same names, with their parameter names, defaults and base-model rules. A layer's
merge gets the task vectors delta_t = W_t - W_base and the base weights (`LayerContext.base`) and returns
the merged weights minus the base. Every number (t, scale) is traced; nothing is prepared.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from drm_jax.math import interpolate as ip
from drm_jax.methods.base import LayerRule, MethodSpec, Param, Rules, per_model_values, scalar, traced_numbers

NEARSWAP_T = Param("t", "float", 1e-4, "similarity threshold: entries where the model is within t of the base "
                   "take the model's value, others move towards it by t / |difference| (mergekit: required)",
                   traced=True, required=True)
FILTER_WISE = Param("filter_wise", "bool", False, "one ratio per row (per vector along the last axis) instead of "
                    "one per tensor")
SCALE = Param("scale", "float", 1.0, "multiplies the model's weights (mergekit's default None: unscaled)",
              traced=True, per_model=True)


def _rules(merge, *, exact: bool = False, linear_combination: bool = False) -> Rules:
    rule = LayerRule(prepare=None, merge=merge)
    roles = frozenset({"matrix", "other"}) if exact else frozenset()
    return Rules(linear=rule, other=rule, row_separable=roles, linear_combination=linear_combination)


_no_hparams = traced_numbers("NoNumbers")


# -- nearswap --------------------------------------------------------------------------------------------
def _build_nearswap(static: dict) -> Rules:
    def merge(deltas, ctx):
        return ip.nearswap_weight(ctx.hparams.t, deltas[0]) * deltas[0]

    return _rules(merge, exact=True)


_t_only = traced_numbers("NearswapNumbers", "t")


NEARSWAP = MethodSpec(
    name="nearswap",
    summary="take the other model's value where it is within t of the base, move towards it by t / |difference| "
            "elsewhere",
    paper="alchemonaut, NearSwap (model card of QuartetAnemoi-70B-t0.0001)",
    params=(NEARSWAP_T,),
    needs_base=True, elementwise=True, random=False, mergekit=True, base="required", min_models=1, max_models=1,
    build=_build_nearswap, layer_hparams=_t_only, reference="docs/methods.md#nearswap",
)


# -- arcee_fusion ----------------------------------------------------------------------------------------
def _build_fusion(static: dict) -> Rules:
    def merge(deltas, ctx):
        return ip.fusion_delta(ctx.base, deltas[0])

    return _rules(merge)


ARCEE_FUSION = MethodSpec(
    name="arcee_fusion",
    summary="keep the other model's changes whose importance |delta| KL(softmax(model) || softmax(base)) passes "
            "median + 1.5 IQR, the base elsewhere",
    paper="Arcee AI, Arcee Fusion (mergekit's arcee_fusion), no paper",
    params=(),
    needs_base=True, elementwise=False, random=False, mergekit=True, base="required", min_models=1, max_models=1,
    reads_base=True,
    build=_build_fusion, layer_hparams=_no_hparams, reference="docs/methods.md#arcee-fusion",
)


# -- model_stock -----------------------------------------------------------------------------------------
def _build_model_stock(static: dict) -> Rules:
    filter_wise = static["filter_wise"]

    def merge(deltas, ctx):
        return ip.model_stock_delta(deltas, filter_wise)

    return _rules(merge)


MODEL_STOCK = MethodSpec(
    name="model_stock",
    summary="move from the base towards the models' average by t = K cos / (1 + (K - 1) cos), cos the mean "
            "angle between their task vectors",
    paper="Jang et al., Model Stock: All we need is just a few fine-tuned models, arXiv 2403.19522",
    params=(FILTER_WISE,),
    needs_base=True, elementwise=False, random=False, mergekit=True, base="required", min_models=2,
    build=_build_model_stock, layer_hparams=_no_hparams, reference="docs/methods.md#model-stock",
)


# -- passthrough -----------------------------------------------------------------------------------------
def _build_passthrough(static: dict) -> Rules:
    def merge(deltas, ctx):
        return (ctx.base + deltas[0]) * ctx.hparams.scale[0] - ctx.base

    return _rules(merge, exact=True, linear_combination=True)


class PassthroughNumbers(NamedTuple):
    """passthrough's one number: the scale of each model (K,)."""

    scale: Any


def _scale(values, role, shape, k, static) -> PassthroughNumbers:
    return PassthroughNumbers(jnp.stack([scalar(v) for v in per_model_values(values["scale"], k, "scale")]))


PASSTHROUGH = MethodSpec(
    name="passthrough",
    summary="one model's weights unchanged (times scale); with slices, the frankenmerge building block",
    paper="",
    params=(SCALE,),
    needs_base=False, elementwise=True, random=False, mergekit=True, base="input", min_models=1, max_models=1,
    reads_base=True,
    build=_build_passthrough, layer_hparams=_scale, reference="docs/methods.md#passthrough",
)

__all__ = ["ARCEE_FUSION", "MODEL_STOCK", "NEARSWAP", "PASSTHROUGH"]
