"""A researcher's composition of `drm_jax.math` stages as a method like any registered one.

A `MergeMethod(linear=chain(...), other=chain(...))` becomes a `MethodSpec` here, so it runs on the one
engine path (prepare / merge, sweeps, `mesh=`, `leaf_params=`, `drm_jax.merge_adapters`, the command line
through `drm_jax.methods.register`). Its traced parameters are derived from its chains: every stage
built without a number declares the number it reads (`drm_jax.math.state.reads`, next to the stage),
and each such number is the registry's own parameter of that name (its range and default, declared
once in the method module that owns it), plus the per-model `coefficients`. The numbers its stages
receive are a NamedTuple with exactly those traced parameters (`traced_numbers`), as for a registered
method: a stage reading a number the composition does not declare is an error naming both. A quantity a
stage derives on the host from its numbers (`prune(None)`'s exact counts, `dare_drop(None)`'s factors,
`magnitude_band(None, None)`'s band, `ranked_drop(None, None)`'s probabilities per rank) is
its hook's (`drm_jax.math.state.derives`, next to the stage), computed here at the shape the stage
receives: what a registered method with the same stages computes, in float64 for a concrete number.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from drm_jax.errors import MergeInputError
from drm_jax.math.state import MergeMethod, MergeState, derived_numbers, stage_derives, stage_hooks, stage_reads
from drm_jax.methods.base import COEFFICIENTS, LAMBDA, SEED, MethodSpec, Param, Rules, chain_rule, traced_numbers
from drm_jax.methods.breadcrumbs import GAMMA
from drm_jax.methods.dare import DROP_RATE as DARE_DROP_RATE
from drm_jax.methods.della import EPSILON
from drm_jax.methods.drm import RANK_RTOL
from drm_jax.methods.ties import DENSITY as TIES_DENSITY

# The numbers a composition can read: the stage's number -> the registry's parameter declaring it. A
# composition's density, gamma and epsilon are each one number shared by the models (`prune(None)`,
# `magnitude_band(None, None)` and `ranked_drop(None, None)` derive their counts and probabilities from
# them on the host, in their hooks, as the registered methods do).
_READABLE: dict[str, Param] = {
    "density": dataclasses.replace(TIES_DENSITY, per_model=False, aliases=(), alias_maps=(), mergekit_default=None),
    "drop_rate": dataclasses.replace(DARE_DROP_RATE, aliases=(), alias_maps=(), mergekit_default=None),
    "epsilon": dataclasses.replace(EPSILON, per_model=False),
    "gamma": dataclasses.replace(GAMMA, per_model=False),
    "lambda_": LAMBDA,
    "rank_rtol": RANK_RTOL,
    "seed": SEED,
}


def composition_params(method: MergeMethod) -> tuple[Param, ...]:
    """The parameters of a composition: coefficients, then each number its stages read, in first-use order.

    A stage reading "threshold" (`prune_by_threshold`) makes `density` the whole-model trim's density,
    defaulting to `MergeMethod.global_density`. Raises MergeInputError for a number no registered parameter
    declares (a stage of one's own reading a name of its own).
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
            raise MergeInputError(f"a composition's stage reads {name!r}, which no parameter of a composition "
                                  f"declares; build the stage with a number")
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

    for transform in (method.linear, method.other):
        twice = [n for i, n in enumerate(stage_derives(transform)) if n in stage_derives(transform)[:i]]
        if twice:  # one field of the numbers: each stage would read the other's
            raise MergeInputError(f"two stages of one chain derive {twice[0]!r} from the numbers (two numberless "
                                  f"stages of one kind): build all but one with a number")
    derived = tuple(dict.fromkeys(stage_derives(method.linear) + stage_derives(method.other)))

    @functools.lru_cache(maxsize=None)
    def hooks(role: str, shape: tuple[int, ...], k: int):
        transform = method.linear if role == "matrix" else method.other
        return stage_hooks(transform, _probe(shape, k, traced)) if stage_derives(transform) else ()

    def derive(values: dict, role: str, shape: tuple[int, ...], k: int) -> dict:
        return derived_numbers(hooks(role, shape, k), values)

    def build(static: dict) -> Rules:
        return Rules(linear=chain_rule(method.linear), other=chain_rule(method.other), whole_model_trim_param=whole)

    return MethodSpec(name=name, summary="a composition of drm_jax.math stages", paper="", params=params,
                      needs_base=True, elementwise=False, random="seed" in reads_all, build=build,
                      layer_hparams=traced_numbers("CompositionNumbers", *traced, derived=derived, derive=derive))


def _probe(shape: tuple[int, ...], k: int, traced: tuple[str, ...]) -> MergeState:
    """The abstract state a rule's chain receives for K deltas of a group's canonical shape (its numbers
    float32 scalars), for the host hooks' shapes (`stage_hooks`)."""
    f32 = jnp.float32
    return MergeState(values=jax.ShapeDtypeStruct((k,) + shape, f32), coefficients=jax.ShapeDtypeStruct((k,), f32),
                      key=jax.ShapeDtypeStruct((2,), jnp.uint32), threshold=jax.ShapeDtypeStruct((k,), f32),
                      hparams={n: jax.ShapeDtypeStruct((), f32) for n in traced})


__all__ = ["composed", "composition_params"]
