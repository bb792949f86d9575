"""Named merge methods: one registry of `MethodSpec`s (their parameters declared once), each method a
module whose per-layer rules are compositions of `drm_jax.math` stages."""

from drm_jax.methods.alias import dare_linear, dare_ties, drm, knots_ties, linear, task_arithmetic, ties, ties_like
from drm_jax.methods.base import LayerContext, LayerRule, MethodSpec, Param, Rules
from drm_jax.methods.registry import METHODS, get_method, resolve_method

__all__ = ["METHODS", "LayerContext", "LayerRule", "MethodSpec", "Param", "Rules", "dare_linear", "dare_ties", "drm",
           "get_method", "knots_ties", "linear", "resolve_method", "task_arithmetic", "ties", "ties_like"]
