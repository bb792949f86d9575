"""Named merge methods (compositions of `drm_jax.math` stages) and their parameter resolution."""

from drm_jax.methods.alias import dare_linear, dare_ties, drm, knots_ties, linear, task_arithmetic, ties, ties_like
from drm_jax.methods.registry import METHODS, resolve_method

__all__ = ["METHODS", "dare_linear", "dare_ties", "drm", "knots_ties", "linear", "resolve_method",
           "task_arithmetic", "ties", "ties_like"]
