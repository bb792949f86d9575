"""From a checked `MergeConfig` to the arguments of the engine's `merge_leaves`, with mergekit's semantics.

For the methods mergekit also has (`linear`, `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`) the
defaults and meanings are mergekit's (0.1.x `generalized_task_arithmetic` and `linear`):

- a model's `weight` multiplies its task vector before the sign election; `density` defaults to 1
  (no trim) and may differ per model; `lambda` scales the merged delta; `normalize` divides by the sum of
  the weights (of the agreeing models for the TIES family) and defaults to true for `ties` and `linear`,
  false for `task_arithmetic`, `dare_linear` and `dare_ties`; DARE rescales survivors by default.
- `linear` averages the full weights, not deltas over a base (we merge against a zero base, so
  `normalize: false` is mergekit's plain weighted sum of the weights).
- the base model, if it is also listed under `models`, is not one of the merged task vectors.

`ties` trims each tensor of each model while it is read (`PreSparsify`, mergekit's `magnitude` rule, each
model at its own density) and the engine runs TIES without a trim; DARE with per-model densities that
differ drops while reading too (the engine has one drop rate). For `drm` and `knots_ties` (which prune all tasks jointly) per-model
densities must agree. Where a mergekit parameter has no effect (a `density` for `task_arithmetic`) we
warn instead of ignoring it silently.

Known differences from mergekit: DARE's random masks come from JAX's PRNG (seeded per tensor name), not
torch's, and its rescaling is the DARE paper's 1/density (mergekit 0.1.x rescales to the L1 norm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drm_jax.cli.config import MergeConfig, ModelEntry
from drm_jax.engine import roles as roles_lib
from drm_jax.errors import ConfigError, DrmJaxError
from drm_jax.math.mean import scale, weighted_mean
from drm_jax.math.sparsify import dare_drop
from drm_jax.math.state import MergeMethod, chain
from drm_jax.methods import alias

# mergekit's defaults per method: (normalize, rescale, density)
MERGEKIT_DEFAULTS = {
    "ties": (True, False, 1.0),
    "task_arithmetic": (False, False, 1.0),
    "linear": (True, False, 1.0),
    "dare_ties": (False, True, 1.0),
    "dare_linear": (False, True, 1.0),
}
DRM_DEFAULT_DROP_RATE = 0.8


@dataclass(frozen=True)
class PreSparsify:
    """A per-model sparsification applied while the model is read (its density differs from the others').

    kind: "magnitude" (mergekit's `magnitude`: the max(1, floor(density n)) largest |delta| of each
      tensor survive) or "random" (DARE: each delta entry survives with probability `density`, survivors
      scaled by 1 / density if `rescale`).
    """

    kind: str
    density: float
    rescale: bool = False


@dataclass(frozen=True)
class Recipe:
    """Everything `merge_leaves` needs besides the tensors.

    Attributes:
      models: the merged models, in config order (the base excluded for task-vector methods).
      reference: the model whose names, shapes, config and tokenizer the output takes (the base model,
        or the first model for a `linear` merge without one).
      zero_base: merge against a zero base (mergekit's `linear` averages full weights).
      method: a method name for `drm_jax.methods.registry`, or a `MergeMethod` composed here.
      engine_kwargs: direction, drop_rate, coefficients, include/exclude/ignore, seed and the method's
        own parameters, as keywords of `drm_jax.engine.merge.merge_leaves` (and of `drm_jax.merge`).
      pre_sparsify: one entry per merged model, None where the engine's own trim applies.
      warnings: notes for the user (parameters that have no effect).
    """

    models: tuple[ModelEntry, ...]
    reference: ModelEntry
    zero_base: bool
    method: str | MergeMethod
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    pre_sparsify: tuple[PreSparsify | None, ...] = ()
    warnings: tuple[str, ...] = ()
    # Roles whose merge is elementwise (no per-tensor statistic): a tensor too large for the memory budget
    # may be merged in row blocks without changing the result.
    elementwise_roles: frozenset[str] = frozenset()

    @property
    def coefficients(self) -> tuple[float, ...]:
        return tuple(self.engine_kwargs["coefficients"])


def _fail(config: MergeConfig, message: str) -> ConfigError:
    return ConfigError((f"{config.source}: " if config.source is not None else "") + message)


def _per_model(config: MergeConfig, models: tuple[ModelEntry, ...], name: str, default: float | None):
    """Each model's value of `weight` / `density`: its own, else the shared one, else `default`."""
    shared = config.parameters.get(name)
    values = []
    for m in models:
        own = getattr(m, name)
        values.append(own if own is not None else shared if shared is not None else default)
    return values


def _given(config: MergeConfig, models: tuple[ModelEntry, ...], name: str) -> list[str]:
    keys = [f"{m.key}.parameters.{name}" for m in models if getattr(m, name) is not None]
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
    """(merged models, reference model) under mergekit's rules for the base model."""
    if config.merge_method != "linear":
        merged = tuple(m for m in config.models if m.model != config.base_model)
        return merged, ModelEntry(model=config.base_model, key="base_model")
    if config.base_model is None:
        return config.models, config.models[0]
    reference = ModelEntry(model=config.base_model, key="base_model")
    if any(m.model == config.base_model for m in config.models):
        return config.models, reference
    # mergekit adds an unlisted base model to linear's inputs; it then needs a weight from `parameters`.
    if "weight" not in config.parameters:
        raise _fail(config, "base_model: a linear merge averages the base model with the others (as mergekit "
                            "does), so it needs a weight: list it under 'models' with a weight, give a shared "
                            "'parameters.weight', or remove base_model")
    return config.models + (reference,), reference


def _drm_recipe(config, models, reference, coefficients) -> Recipe:
    p = config.parameters
    densities = _per_model(config, models, "density", None)
    given = _given(config, models, "density")
    drop_rate = p.get("drop_rate")
    if given:
        if len(set(densities)) > 1 or None in densities:
            raise _fail(config, f"{given[0]}: {config.merge_method} prunes all models jointly, so one density "
                                f"for all; got {densities}")
        if drop_rate is not None and abs(drop_rate - (1.0 - densities[0])) > 1e-12:
            raise _fail(config, f"parameters.drop_rate: {drop_rate} contradicts density {densities[0]} "
                                f"(drop_rate = 1 - density); give one of them")
        drop_rate = 1.0 - densities[0]
    kwargs: dict[str, Any] = {
        "direction": p.get("direction", "horizontal"),
        "drop_rate": DRM_DEFAULT_DROP_RATE if drop_rate is None else drop_rate,
        "coefficients": coefficients,
        **_roles_kwargs(config),
    }
    names = ("rank_rtol", "prune_scope", "svd_route", "nonlinear_density")
    names += ("renormalize",) if config.merge_method == "drm" else ()
    kwargs.update({n: p[n] for n in names if n in p})
    # DRM's other path (sign election, disjoint mean) is elementwise unless it trims by magnitude. (Its
    # "majority" tie rule for entries whose task sum is exactly 0 looks at the whole tensor; such entries
    # only differ between row blocks when nonzero deltas cancel exactly.)
    elementwise = frozenset() if p.get("nonlinear_density") is not None else frozenset({"other"})
    return Recipe(models, reference, False, config.merge_method, kwargs, (None,) * len(models),
                  elementwise_roles=elementwise)


def _mergekit_method(method: str, densities: list[float], normalize: bool, rescale: bool, lam: float,
                     trim_scope: str) -> MergeMethod:
    """The `MergeMethod` of a mergekit-family method, built from `drm_jax.methods.alias` (and the math
    stages where the alias lacks mergekit's option), with the density given exactly (no 1 - (1 - d) trip)."""
    uniform = len(set(densities)) == 1
    if method == "linear":
        return alias.linear(normalize=normalize)
    if method == "task_arithmetic":
        if normalize:  # mergekit: the weighted sum of deltas divided by the sum of the weights
            t = chain(weighted_mean(), scale(lam))
            return MergeMethod(linear=t, other=t)
        return alias.task_arithmetic(lambda_=lam)
    if method == "ties":
        density = 1.0 if trim_scope == "tensor" else densities[0]  # per-tensor trims happen while reading
        return alias.ties(density=density, trim_scope=trim_scope, normalize=normalize, lambda_=lam)
    drop_rate = 1.0 - densities[0] if uniform else 0.0  # differing densities: dropped while reading
    if method == "dare_ties":
        return alias.dare_ties(drop_rate=drop_rate, rescale=rescale, normalize=normalize, lambda_=lam)
    if normalize:  # mergekit's dare_linear with normalize: weighted mean of the dropped deltas
        t = chain(dare_drop(drop_rate, rescale), weighted_mean(), scale(lam))
        return MergeMethod(linear=t, other=t, random=True)
    return alias.dare_linear(drop_rate=drop_rate, rescale=rescale, lambda_=lam)


def _mergekit_recipe(config, models, reference, coefficients) -> Recipe:
    method = config.merge_method
    p = config.parameters
    normalize_default, rescale_default, density_default = MERGEKIT_DEFAULTS[method]
    normalize = p.get("normalize", normalize_default)
    rescale = p.get("rescale", rescale_default)
    lam = p.get("lambda", 1.0)
    trim_scope = p.get("trim_scope", "tensor")
    densities = [float(d) for d in _per_model(config, models, "density", density_default)]
    uniform = len(set(densities)) == 1
    warnings: list[str] = []
    pre: list[PreSparsify | None] = [None] * len(models)
    if method in ("task_arithmetic", "linear"):
        for key in _given(config, models, "density"):
            warnings.append(f"{key}: {method} does not sparsify; density has no effect (as in mergekit)")
    elif method == "ties" and trim_scope == "tensor":
        # mergekit's per-tensor trim, done while reading (each model at its own density, exactly
        # max(1, floor(density n)) kept); the engine then elects and averages, elementwise.
        pre = [PreSparsify("magnitude", d) if d < 1.0 else None for d in densities]
    elif method == "ties" and not uniform:
        raise _fail(config, f"parameters.trim_scope: {trim_scope!r} trims the whole task vector with one "
                            f"density; per-model densities {densities} need trim_scope 'tensor'")
    elif not uniform:
        pre = [PreSparsify("random", d, rescale) for d in densities]
    kwargs: dict[str, Any] = {"coefficients": coefficients, **_roles_kwargs(config)}
    if method.startswith("dare_"):
        kwargs["seed"] = p.get("seed", 0)
    try:
        merge_method = _mergekit_method(method, densities, normalize, rescale, lam, trim_scope)
    except ValueError as err:
        raise _fail(config, f"parameters: {err}") from None
    elementwise = frozenset({"linear", "other"}) if method in ("linear", "task_arithmetic") or (
        method == "ties" and trim_scope == "tensor") else frozenset()  # DARE's masks are keyed per tensor
    return Recipe(models, reference, method == "linear", merge_method, kwargs, tuple(pre), tuple(warnings),
                  elementwise)


def build_recipe(config: MergeConfig) -> Recipe:
    """Translate a config into engine arguments (see the module docstring for the semantics).

    Raises:
      ConfigError: parameters that contradict each other (per-model densities for DRM, drop_rate and
        density both given, a linear base model without a weight).
    """
    models, reference = _split_models(config)
    coefficients = [float(w) for w in _per_model(config, models, "weight", 1.0)]
    if config.merge_method in ("drm", "knots_ties"):
        recipe = _drm_recipe(config, models, reference, coefficients)
    else:
        recipe = _mergekit_recipe(config, models, reference, coefficients)
    for what in ("include", "exclude", "ignore"):
        if recipe.engine_kwargs.get(what) is not None:
            try:
                roles_lib.RoleRules(**{what: recipe.engine_kwargs[what]})
            except DrmJaxError as err:  # an invalid regular expression
                raise _fail(config, f"parameters.{what}: {err}") from None
    return recipe


__all__ = ["MERGEKIT_DEFAULTS", "PreSparsify", "Recipe", "build_recipe"]
