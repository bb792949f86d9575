"""From a checked `MergeConfig` to the engine's arguments: which models, which reference, which numbers.

No merge semantics live here: what each parameter means is its method's (`drm_jax.methods`); this module
only maps mergekit's config conventions onto the registry's parameters:

- a model's `weight` is its coefficient (the registry's `coefficients`); a shared `parameters.weight`
  is every model's default; per-model `density` values become the method's per-model density (TIES) or
  drop rate (DARE: 1 - density); DRM and KnOTS prune all models jointly, so their per-model densities
  must agree;
- where a method follows mergekit (`MethodSpec.mergekit`), an unset parameter takes mergekit's default
  (`Param.mergekit_default`: TIES keeps every entry unless a density is given, DARE drops nothing
  unless a density is given, dare_ties does not normalize, DARE rescales to the L1 norm);
- mergekit's `linear` averages full weights, not deltas over a base: the engine merges against a zero
  base (so `normalize: false` is mergekit's plain weighted sum of the weights);
- the base model, if it is also listed under `models`, is not one of the merged task vectors.

Known differences from mergekit: the random masks of DARE and DELLA come from JAX's PRNG (seeded per
tensor name), not torch's (docs/methods.md#mergekit-parity lists the others).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drm_jax.config.schema import MergeConfig, ModelEntry
from drm_jax.config.segment_defs import representative
from drm_jax.engine import roles as roles_lib
from drm_jax.engine.prepare import rules_for
from drm_jax.errors import ConfigError, DrmJaxError

from drm_jax.methods.registry import get_method, split_params, static_values


@dataclass(frozen=True)
class Recipe:
    """Everything the streaming planner needs besides the tensors.

    Attributes:
      models: the merged models, in config order (the base excluded for task-vector methods).
      reference: the model whose names, shapes, config and tokenizer the output takes (the base model,
        or the first model for a `linear` merge without one).
      zero_base: merge against a zero base (mergekit's `linear` averages full weights).
      method: the registry name.
      engine_kwargs: the method's parameters (registry names, checked), coefficients included.
      role_kwargs: include / exclude / ignore patterns.
      exact_roles: roles whose merge is elementwise: a tensor too large for the memory budget may be
        merged in row blocks without changing the result.
      warnings: notes for the user.
    """

    models: tuple[ModelEntry, ...]
    reference: ModelEntry
    zero_base: bool
    method: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    role_kwargs: dict[str, Any] = field(default_factory=dict)
    exact_roles: frozenset[str] = frozenset()
    warnings: tuple[str, ...] = ()

    @property
    def coefficients(self) -> tuple[float, ...]:
        return tuple(self.engine_kwargs.get("coefficients", ()))


def _fail(config: MergeConfig, message: str) -> ConfigError:
    return ConfigError((f"{config.source}: " if config.source is not None else "") + message)


def _per_model(config: MergeConfig, models: tuple[ModelEntry, ...], name: str) -> list:
    """Each model's own value of a per-model parameter, else the shared one, else None."""
    shared = config.parameters.get(name)
    return [m.parameters.get(name, shared) for m in models]


def _given(config: MergeConfig, models: tuple[ModelEntry, ...], name: str) -> list[str]:
    keys = [f"{m.key}.parameters.{name}" for m in models if name in m.parameters]
    if name in config.parameters:
        keys.append(f"parameters.{name}")
    return keys


def _patterns(value: Any) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _roles_kwargs(config: MergeConfig) -> dict[str, Any]:
    p = config.parameters
    kwargs: dict[str, Any] = {"ignore": _patterns(p.get("ignore"))}
    if "include" in p:
        kwargs["include"] = _patterns(p["include"])
    if "exclude" in p:
        kwargs["exclude"] = _patterns(p["exclude"])
    return kwargs


def _split_models(config: MergeConfig) -> tuple[tuple[ModelEntry, ...], ModelEntry]:
    """(merged models, reference model) under mergekit's rules for the base model (`MethodSpec.base`)."""
    spec = get_method(config.merge_method)
    if spec.base == "required" or (spec.base == "optional" and config.base_model is not None):
        merged = tuple(m for m in config.models if m.model != config.base_model)
        return merged, ModelEntry(model=config.base_model, key="base_model")
    if config.base_model is None:
        return config.models, config.models[0]
    reference = ModelEntry(model=config.base_model, key="base_model")
    if any(m.model == config.base_model for m in config.models):
        return config.models, reference
    # mergekit adds an unlisted base model to the inputs; with a weight parameter it then needs a weight.
    if "weight" in spec.names and "weight" not in config.parameters:
        raise _fail(config, f"base_model: a {spec.name} merge averages the base model with the others (as "
                            f"mergekit does), so it needs a weight: list it under 'models' with a weight, give a "
                            f"shared 'parameters.weight', or remove base_model")
    return config.models + (reference,), reference


def _check_inputs(config: MergeConfig, spec, models: tuple[ModelEntry, ...]) -> None:
    """mergekit's input contract: the number of merged models, and the parameters it has no default for."""
    if spec.leaf_data:
        given = ", ".join(d.name for d in spec.leaf_data)
        raise _fail(config, f"merge_method: {spec.name} needs per-leaf data ({given}) that a config cannot give; "
                            f"use drm_jax.merge(..., method={spec.name!r}, {spec.leaf_data[0].name}=[...])")
    problem = spec.count_problem(len(models))
    if problem is not None:
        appended = spec.base == "input" and models and models[-1].key == "base_model"
        raise _fail(config, f"{'base_model' if appended else 'models'}: {problem}")
    for p in spec.params:
        if not p.required:
            continue
        names = (p.name,) + p.aliases
        if any(n in config.parameters for n in names):
            continue
        shown = p.aliases[0] if p.aliases else p.name  # mergekit's name (`weight` for the coefficients)
        if not p.per_model:
            raise _fail(config, f"parameters.{shown}: missing; method {spec.name!r} needs it (mergekit has no "
                                f"default)")
        for m in models:
            if not any(n in m.parameters for n in names):
                raise _fail(config, f"{m.key}.parameters.{shown}: missing; method {spec.name!r} needs a {shown} "
                                    f"for every model (mergekit has no default)")


def _other_per_model(config: MergeConfig, models, spec, params: dict) -> None:
    """Per-model values of the method's other per-model parameters (passthrough's scale, ...): a model's own
    value, else the shared one, else the default."""
    for p in spec.params:
        names = (p.name,) + p.aliases
        if not p.per_model or p.name == "coefficients" or "density" in names:
            continue  # weights and densities have their own rules above
        own = [next((m.parameters[n] for n in names if n in m.parameters), None) for m in models]
        if all(v is None for v in own):
            continue
        shared = next((params.pop(n) for n in names if n in params), p.default)
        params[p.name] = tuple(shared if v is None else v for v in own)


def _densities(config: MergeConfig, models, spec) -> dict[str, Any]:
    """Per-model `density` values for the parameter that owns the name (TIES' density, DARE's drop rate
    through its alias, DRM's drop rate, which takes one value for all models)."""
    given = _given(config, models, "density")
    if not given:
        return {}
    owner = next((p for p in spec.params if "density" in (p.name,) + p.aliases), None)
    if owner is None:
        raise _fail(config, f"{given[0]}: unknown parameter for method {spec.name!r}; accepted: {sorted(spec.names)}")
    values = _per_model(config, models, "density")
    if owner.name != "density" and owner.name in config.parameters:
        raise _fail(config, f"parameters.{owner.name}: given with density ({given[0]}); {owner.name} = "
                            f"1 - density, give one of them")
    if not owner.per_model:
        if len(set(values)) > 1 or None in values:
            raise _fail(config, f"{given[0]}: {spec.name} prunes all models jointly, so one density for all; "
                                f"got {values}")
        return {"density": values[0]}
    unset = owner.mergekit_default if owner.mergekit_default is not None else owner.default
    if owner.name != "density":  # an alias: the unset entries take the owner's default through its inverse
        unset = dict(owner.alias_maps)["density"](unset)
    return {"density": tuple(unset if v is None else v for v in values)}


def build_recipe(config: MergeConfig) -> Recipe:
    """Translate a config into engine arguments (see the module docstring).

    Raises:
      ConfigError: parameters that contradict each other (per-model densities for DRM, drop_rate and
        density both given, a linear base model without a weight), naming the key.
    """
    # gradients, filter lists, slices: the recipe of one tensor (its checks); per-tensor values and the
    # slices' own recipes are drm_jax.config.segments'
    config = representative(config)
    spec = get_method(config.merge_method)
    models, reference = _split_models(config)
    _check_inputs(config, spec, models)
    params: dict[str, Any] = {k: v for k, v in config.parameters.items()
                              if k not in ("weight", "density", "include", "exclude", "ignore")}
    if "coefficients" in spec.names:  # slerp, model_stock, ... take no weights
        weights = _per_model(config, models, "weight")
        params["coefficients"] = [1.0 if w is None else float(w) for w in weights]
    params.update(_densities(config, models, spec))
    _other_per_model(config, models, spec, params)
    if spec.mergekit:  # mergekit's defaults where they differ from the Python API's
        for p in spec.params:
            if p.mergekit_default is not None and p.name not in params and not (set(p.aliases) & set(params)):
                params[p.name] = p.mergekit_default
    try:
        static, traced = split_params(spec, params, where=lambda n: f"parameters.{n}")
    except DrmJaxError as err:
        raise _fail(config, str(err).removeprefix(f"method {spec.name!r}: ")) from None
    role_kwargs = _roles_kwargs(config)
    for what in ("include", "exclude", "ignore"):
        if role_kwargs.get(what) is not None:
            try:
                roles_lib.RoleRules(**{what: role_kwargs[what]})
            except DrmJaxError as err:  # an invalid regular expression
                raise _fail(config, f"parameters.{what}: {err}") from None
    rules = rules_for(spec, static_values(spec, static))
    engine_kwargs = {**static, **traced}
    if "coefficients" in params:
        engine_kwargs["coefficients"] = list(params["coefficients"])
    zero_base = spec.base == "input" or (spec.base == "optional" and config.base_model is None)
    return Recipe(models, reference, zero_base, spec.name, engine_kwargs, role_kwargs, rules.row_separable)


__all__ = ["Recipe", "build_recipe"]
