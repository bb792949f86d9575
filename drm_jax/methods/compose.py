"""A researcher's composition of `drm_jax.math` stages as a method like any registered one.

A `MergeMethod(linear=chain(...), other=chain(...))` becomes a `MethodSpec` here, so it runs on the one
engine path (prepare / merge, sweeps, `mesh=`, `leaf_params=`, `drm_jax.merge_adapters`, the command line
through `drm_jax.methods.register`). Its traced parameters are derived from its chains: every stage
built without a number declares the number it reads (`drm_jax.math.state.reads`, next to the stage),
and each such number is the registry's own parameter of that name (its range and default, declared
once in the method module that owns it), plus the per-model `coefficients`. The numbers its stages
receive are a NamedTuple with exactly those traced parameters (`traced_numbers`), as for a registered
method: a stage reading a number the composition does not declare is an error naming both.
"""

from __future__ import annotations

import dataclasses
import functools

from drm_jax.errors import MergeInputError
from drm_jax.math.state import MergeMethod, stage_reads
from drm_jax.methods.base import COEFFICIENTS, LAMBDA, SEED, MethodSpec, Param, Rules, chain_rule, traced_numbers
from drm_jax.methods.dare import DROP_RATE as DARE_DROP_RATE
from drm_jax.methods.drm import RANK_RTOL
from drm_jax.methods.ties import DENSITY as TIES_DENSITY

# The numbers a composition can read: the stage's number -> the registry's parameter declaring it. A
# composition's density is one number shared by the models (the in-program count of `prune(None)`).
_READABLE: dict[str, Param] = {
    "density": dataclasses.replace(TIES_DENSITY, per_model=False, aliases=(), alias_maps=(), mergekit_default=None),
    "drop_rate": dataclasses.replace(DARE_DROP_RATE, aliases=(), alias_maps=(), mergekit_default=None),
    "lambda_": LAMBDA,
    "rank_rtol": RANK_RTOL,
    "seed": SEED,
}


def composition_params(method: MergeMethod) -> tuple[Param, ...]:
    """The parameters of a composition: coefficients, then each number its stages read, in first-use order.

    A stage reading "threshold" (`prune_by_threshold`) makes `density` the whole-model trim's density,
    defaulting to `MergeMethod.global_density`. Raises MergeInputError for a number only a registered
    method computes (Breadcrumbs' bands, DELLA's probabilities).
    """
    names = list(dict.fromkeys(stage_reads(method.linear) + stage_reads(method.other)))
    params: list[Param] = [COEFFICIENTS]
    for name in names:
        if name == "threshold":
            if "density" in names:
                raise MergeInputError("a composition cannot read `density` both for prune(None) and for the "
                                      "whole-model trim of prune_by_threshold()")
            if method.global_density is None:
                raise MergeInputError("prune_by_threshold() needs MergeMethod.global_density (the default density "
                                      "of the whole-model trim)")
            params.append(dataclasses.replace(_READABLE["density"], default=method.global_density))
        elif name in _READABLE:
            params.append(_READABLE[name])
        else:
            raise MergeInputError(f"a composition's stage reads {name!r}, which only its registered method computes; "
                                  f"build the stage with a number or use that method")
    return tuple(params)


@functools.lru_cache(maxsize=None)
def composed(method: MergeMethod, name: str = "composition") -> MethodSpec:
    """The `MethodSpec` of a composition (cached: the same composition gives the same rules, so jax.jit's
    caches hit across calls). `linear` merges the 2-D weights on the linear path, `other` every other leaf."""
    if not isinstance(method, MergeMethod):
        raise MergeInputError(f"method must be a registered name, a MethodSpec or a MergeMethod, got "
                              f"{type(method).__name__}")
    params = composition_params(method)
    reads_all = stage_reads(method.linear) + stage_reads(method.other)
    whole = "density" if "threshold" in reads_all else None
    traced = tuple(p.name for p in params if p.traced and p.name != "coefficients" and p.name != whole)

    def build(static: dict) -> Rules:
        return Rules(linear=chain_rule(method.linear), other=chain_rule(method.other), whole_model_trim_param=whole)

    return MethodSpec(name=name, summary="a composition of drm_jax.math stages", paper="", params=params,
                      needs_base=True, elementwise=False, random="seed" in reads_all, build=build,
                      layer_hparams=traced_numbers("CompositionNumbers", *traced))


__all__ = ["composed", "composition_params"]
