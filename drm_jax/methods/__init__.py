"""Named merge methods: one registry of `MethodSpec`s (their parameters declared once), each method a
module whose per-layer rules are compositions of `drm_jax.math` stages.

A method is a value: a registered name, a `MethodSpec` (`drm_jax.methods.drm`, or the same with some
parameters bound, `drm_jax.methods.drm(direction="vertical")`), or a `MergeMethod` composition of stages
(made a spec by `compose.composed`). `register(name, method)` adds a user's method to the registry.
"""

from drm_jax.methods.base import LayerContext, LayerRule, MethodSpec, Param, Rules
from drm_jax.methods.drm import ties_like
from drm_jax.methods.registry import METHODS, get_method, method_spec, register, unregister

# The named methods as values, assigned after the method modules were imported (importing a submodule sets
# the package attribute of its name, e.g. `drm`, to the module): calling one binds parameters.
drm = METHODS["drm"]
knots_ties = METHODS["knots_ties"]
ties = METHODS["ties"]
task_arithmetic = METHODS["task_arithmetic"]
linear = METHODS["linear"]
dare_linear = METHODS["dare_linear"]
dare_ties = METHODS["dare_ties"]

__all__ = ["METHODS", "LayerContext", "LayerRule", "MethodSpec", "Param", "Rules", "dare_linear", "dare_ties", "drm",
           "get_method", "knots_ties", "linear", "method_spec", "register", "task_arithmetic", "ties", "ties_like",
           "unregister"]
