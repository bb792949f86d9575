"""The pytree engine: grouping, stacking, compiling and sharding merges over whole models."""

from drm_jax.engine.adapters import LoraWeight, MergedAdapter, merge_adapters
from drm_jax.engine.merge import merge, merge_leaves
from drm_jax.engine.options import MergeOptions
from drm_jax.engine.prepare import Prepared, prepare
from drm_jax.engine.roles import DEFAULT_EXCLUDE, RoleRules

__all__ = ["DEFAULT_EXCLUDE", "LoraWeight", "MergeOptions", "MergedAdapter", "Prepared", "RoleRules", "merge",
           "merge_adapters", "merge_leaves", "prepare"]
