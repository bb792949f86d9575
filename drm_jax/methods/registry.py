"""The one method registry: name -> `MethodSpec`, and parameter resolution from it.

Adding a method is one module (its parameters, rules and facts in a `MethodSpec`) plus one entry in
`METHODS`. `drm_jax.merge` / `drm_jax.prepare`, the YAML config checker, the command line and
`drm-jax methods` all read the specs here; no other place lists a method's parameters.
"""

from __future__ import annotations

from typing import Any

from drm_jax.errors import MergeInputError
from drm_jax.math.state import MergeMethod
from drm_jax.methods import alias
from drm_jax.methods.base import MethodSpec, UnknownParameter
from drm_jax.methods.breadcrumbs import BREADCRUMBS, BREADCRUMBS_TIES
from drm_jax.methods.dare import DARE_LINEAR, DARE_TIES
from drm_jax.methods.della import DELLA, DELLA_LINEAR
from drm_jax.methods.drm import DRM, KNOTS_TIES
from drm_jax.methods.interpolate import KARCHER, MULTISLERP, NUSLERP, SLERP
from drm_jax.methods.linear import LINEAR, TASK_ARITHMETIC
from drm_jax.methods.ram import RAM, RAMPLUS_TL
from drm_jax.methods.sce import SCE
from drm_jax.methods.subspace import ISO_C, ISO_CTS, TSV_M
from drm_jax.methods.ties import TIES
from drm_jax.methods.weight_space import ARCEE_FUSION, MODEL_STOCK, NEARSWAP, PASSTHROUGH

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    DRM, KNOTS_TIES, TIES, TASK_ARITHMETIC, LINEAR, DARE_LINEAR, DARE_TIES, TSV_M, ISO_C, ISO_CTS,
    BREADCRUMBS, BREADCRUMBS_TIES, DELLA, DELLA_LINEAR, SCE, RAM, RAMPLUS_TL,
    SLERP, NUSLERP, MULTISLERP, KARCHER, NEARSWAP, ARCEE_FUSION, MODEL_STOCK, PASSTHROUGH,
)}


def get_method(name: str) -> MethodSpec:
    """The spec of a registered method; MergeInputError naming the known ones otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise MergeInputError(f"unknown merge method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def split_params(spec: MethodSpec, given: dict, where=str) -> tuple[dict, dict]:
    """Given parameters (names or aliases) -> (static values, traced values), each checked.

    Raises MergeInputError naming an unknown parameter (with the accepted ones) or a bad value.
    """
    try:
        values = spec.canonical(given, where)
    except UnknownParameter as err:
        raise MergeInputError(str(err)) from None
    except ValueError as err:
        raise MergeInputError(f"method {spec.name!r}: {err}") from None
    static = {p.name: values[p.name] for p in spec.static if p.name in values}
    traced = {p.name: values[p.name] for p in spec.traced if p.name in values}
    return static, traced


def static_values(spec: MethodSpec, given: dict) -> dict:
    """Every static parameter, the given value or the default."""
    return {p.name: given.get(p.name, p.default) for p in spec.static}


def traced_values(spec: MethodSpec, given: dict) -> dict:
    """Every traced parameter, the given value or the default."""
    return {p.name: given.get(p.name, p.default) for p in spec.traced}


# -- one-shot transforms (the first design's `MergeMethod`s), kept for compositions and their tests ----
_LEGACY = {
    "drm": alias.drm, "knots_ties": alias.knots_ties, "ties": alias.ties,
    "task_arithmetic": alias.task_arithmetic, "linear": alias.linear,
    "dare_linear": alias.dare_linear, "dare_ties": alias.dare_ties,
    "tsv_m": alias.subspace_method("tsv_m"), "iso_c": alias.subspace_method("iso_c"),
    "iso_cts": alias.subspace_method("iso_cts"),
}


def resolve_method(method: str | MergeMethod, direction: str = "horizontal", drop_rate: float | None = None,
                   **params: Any) -> MergeMethod:
    """The method as a `MergeMethod` of one-shot per-layer transforms with fixed numbers.

    For researchers composing stages and for tests that run a method on raw stacked deltas; the engine
    itself runs the registry's prepare / merge rules. Parameters are checked against the registry.
    """
    if isinstance(method, MergeMethod):
        if params:
            raise MergeInputError(f"parameters {sorted(params)} given with a custom MergeMethod")
        return method
    spec = get_method(method)
    given = dict(params)
    if "direction" in spec.names:
        given["direction"] = direction
    if drop_rate is not None:
        given["drop_rate"] = drop_rate
    static, traced = split_params(spec, given)
    values = {**static, **traced}
    values.pop("coefficients", None)
    values.pop("precision", None)
    if "lambda_" in values and method in ("drm", "knots_ties"):
        values.pop("lambda_")
    if method not in _LEGACY:
        raise MergeInputError(f"method {method!r} has no one-shot MergeMethod form; merge with drm_jax.merge or "
                              f"drm_jax.prepare, which run every registered method")
    try:
        return _LEGACY[method](**values)
    except (TypeError, ValueError) as err:
        raise MergeInputError(f"method {method!r}: {err}") from None


__all__ = ["METHODS", "get_method", "resolve_method", "split_params", "static_values", "traced_values"]
