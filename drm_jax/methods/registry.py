"""From `merge(method="...", drop_rate=..., **method_params)` to a `MergeMethod`.

Each method lists the parameters it accepts; aliases follow mergekit's YAML names (`density`,
`lambda`, `normalize`) so a mergekit config maps onto the Python API one to one. An unknown method or
parameter is a `MergeInputError` that names it.
"""

from __future__ import annotations

from typing import Any, Callable

from drm_jax.errors import MergeInputError
from drm_jax.math.state import MergeMethod
from drm_jax.methods import alias

# method name -> (builder, parameters it takes besides direction / drop_rate)
METHODS: dict[str, tuple[Callable[..., MergeMethod], frozenset[str]]] = {
    "drm": (alias.drm, frozenset({"rank_rtol", "renormalize", "prune_scope", "svd_route", "nonlinear_density"})),
    "knots_ties": (alias.knots_ties, frozenset({"rank_rtol", "svd_route", "nonlinear_density"})),
    "ties": (alias.ties, frozenset({"trim_scope", "normalize", "lambda_"})),
    "task_arithmetic": (alias.task_arithmetic, frozenset({"lambda_"})),
    "linear": (alias.linear, frozenset({"normalize"})),
    "dare_linear": (alias.dare_linear, frozenset({"seed", "rescale", "lambda_"})),
    "dare_ties": (alias.dare_ties, frozenset({"seed", "rescale", "normalize", "lambda_"})),
}
_USES_DROP_RATE = {"drm", "knots_ties", "dare_linear", "dare_ties"}
_USES_DENSITY = {"ties"}
_USES_DIRECTION = {"drm", "knots_ties"}
_LAMBDA_ALIASES = ("lambda", "lambda_", "scaling")


def _fraction(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise MergeInputError(f"parameter {name!r} must be a number, got {value!r}") from None
    if not 0.0 <= value <= 1.0:
        raise MergeInputError(f"parameter {name!r} must be in [0, 1], got {value}")
    return value


def resolve_method(
    method: str | MergeMethod, direction: str = "horizontal", drop_rate: float = 0.8, **params: Any
) -> MergeMethod:
    """Build the `MergeMethod` named by `method` with the given parameters.

    `drop_rate` is the fraction dropped: DRM's pruning rate, DARE's drop probability; for `ties` the
    default density is 1 - drop_rate (0.2, the TIES paper's k). `density` may be given instead
    (mergekit's name): drop_rate = 1 - density. `lambda` (or `lambda_`, `scaling`) is the global scaling.
    A `MergeMethod` passes through unchanged (a researcher's own composition).
    """
    if isinstance(method, MergeMethod):
        if params:
            raise MergeInputError(f"parameters {sorted(params)} given with a custom MergeMethod")
        return method
    if method not in METHODS:
        raise MergeInputError(f"unknown merge method {method!r}; expected one of {sorted(METHODS)}")
    builder, accepted = METHODS[method]
    params = dict(params)
    lambdas = [k for k in _LAMBDA_ALIASES if k in params]
    if len(lambdas) > 1:
        raise MergeInputError(f"give the scaling once, not as {lambdas}")
    if lambdas:
        params["lambda_"] = float(params.pop(lambdas[0]))
    density = None
    if "density" in params:
        density = _fraction("density", params.pop("density"))
        drop_rate = 1.0 - density
    drop_rate = _fraction("drop_rate", drop_rate)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise MergeInputError(
            f"unknown parameter {unknown[0]!r} for method {method!r}; accepted: "
            f"{sorted(accepted | {'drop_rate', 'density', 'direction', 'coefficients'})}"
        )
    kwargs = dict(params)
    if method in _USES_DIRECTION:
        if direction not in ("horizontal", "vertical"):
            raise MergeInputError(f"unknown direction {direction!r}; expected 'horizontal' or 'vertical'")
        kwargs["direction"] = direction
    if method in _USES_DROP_RATE:
        kwargs["drop_rate"] = drop_rate
    if method in _USES_DENSITY:
        # a given density is passed as is: 1 - (1 - 0.1) is not 0.1 in floating point
        kwargs["density"] = density if density is not None else 1.0 - drop_rate
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as err:
        raise MergeInputError(f"method {method!r}: {err}") from None


__all__ = ["METHODS", "resolve_method"]
