"""The one method registry: name -> `MethodSpec`, and parameter resolution from it.

Adding a method is one module (its parameters, rules and facts in a `MethodSpec`) plus one entry in
`METHODS`; a user adds one at run time with `register(name, method)` (a `MethodSpec` or a `MergeMethod`
composition). `drm_jax.merge` / `drm_jax.prepare`, the YAML config checker, the command line and
`drm-jax methods` all read the specs here; no other place lists a method's parameters.
"""

from __future__ import annotations

from dataclasses import replace

from drm_jax.errors import MergeInputError
from drm_jax.math.state import MergeMethod
from drm_jax.methods.base import MethodSpec, UnknownParameter
from drm_jax.methods.compose import composed
from drm_jax.methods.breadcrumbs import BREADCRUMBS, BREADCRUMBS_TIES
from drm_jax.methods.dare import DARE_LINEAR, DARE_TIES
from drm_jax.methods.della import DELLA, DELLA_LINEAR
from drm_jax.methods.drm import DRM, KNOTS_TIES
from drm_jax.methods.interpolate import KARCHER, MULTISLERP, NUSLERP, SLERP
from drm_jax.methods.linear import LINEAR, TASK_ARITHMETIC
from drm_jax.methods.ram import RAM, RAMPLUS_TL
from drm_jax.methods.regmean import REGMEAN, REGMEAN_PLUSPLUS
from drm_jax.methods.sce import SCE
from drm_jax.methods.subspace import ISO_C, ISO_CTS, TSV_M
from drm_jax.methods.ties import TIES
from drm_jax.methods.weight_space import ARCEE_FUSION, MODEL_STOCK, NEARSWAP, PASSTHROUGH
from drm_jax.methods.wudi import WUDI

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    DRM, KNOTS_TIES, TIES, TASK_ARITHMETIC, LINEAR, DARE_LINEAR, DARE_TIES, TSV_M, ISO_C, ISO_CTS,
    BREADCRUMBS, BREADCRUMBS_TIES, DELLA, DELLA_LINEAR, SCE, RAM, RAMPLUS_TL,
    SLERP, NUSLERP, MULTISLERP, KARCHER, NEARSWAP, ARCEE_FUSION, MODEL_STOCK, PASSTHROUGH,
    WUDI, REGMEAN, REGMEAN_PLUSPLUS,
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


def method_spec(method: "str | MethodSpec | MergeMethod") -> MethodSpec:
    """Any form of a method as its `MethodSpec`: a registered name, a spec (possibly with bound parameters,
    `drm_jax.drm(direction="vertical")`), or a `MergeMethod` composition of stages (`compose.composed`)."""
    if isinstance(method, MethodSpec):
        return method
    if isinstance(method, MergeMethod):
        return composed(method)
    if isinstance(method, str):
        return get_method(method)
    raise MergeInputError(f"method must be a registered name, a MethodSpec or a MergeMethod, got "
                          f"{type(method).__name__}")


_BUILT_IN = frozenset(METHODS)


def register(name: str, method: "MethodSpec | MergeMethod") -> MethodSpec:
    """Make a method available by name to `drm_jax.merge(method=name)`, `drm_jax.prepare`, the command line
    (YAML `merge_method: name`, in this process) and `drm-jax methods`. `method`: a `MergeMethod`
    composition or a `MethodSpec`. A built-in name cannot be replaced; a registered one can. Returns its spec."""
    if not isinstance(name, str) or not name.isidentifier():
        raise MergeInputError(f"a method name must be an identifier, got {name!r}")
    if name in _BUILT_IN:
        raise MergeInputError(f"{name!r} is a built-in method; register yours under another name")
    spec = composed(method, name) if isinstance(method, MergeMethod) else method_spec(method)
    if spec.name != name:
        spec = replace(spec, name=name, _by_name={})
    METHODS[name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method `register` added (built-in methods stay)."""
    if name in _BUILT_IN:
        raise MergeInputError(f"{name!r} is a built-in method")
    METHODS.pop(name, None)


__all__ = ["METHODS", "get_method", "method_spec", "register", "split_params", "static_values", "traced_values",
           "unregister"]
