"""drm_jax: Decom-Renorm-Merge and classic model merging as compiled, vmapped JAX transforms."""

from drm_jax import math, methods
from drm_jax.engine import LoraWeight, MergedAdapter, MergeOptions, Prepared, merge, merge_adapters, prepare
from drm_jax.config.run import merge_config
from drm_jax.extract import ExtractedLora, extract_lora
from drm_jax.learned import adamerging, entropy_loss, input_grams, regmean_merge, regmean_plusplus
from drm_jax.errors import CheckpointError, ConfigError, DrmJaxError, MergeInputError
from drm_jax.math.state import MergeMethod, MergeState, chain
from drm_jax.methods import dare_linear, dare_ties, drm, knots_ties, linear, task_arithmetic, ties
from drm_jax import permute
from drm_jax.permute import (activation_align, average, mudsc, permute_merge, weight_matching, zipit,
                             PermutationSpec, mlp_spec, resnet_spec, vit_spec)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DrmJaxError", "ExtractedLora", "LoraWeight", "MergeInputError", "MergeMethod",
    "MergeOptions", "MergeState", "MergedAdapter", "Prepared", "__version__", "adamerging", "entropy_loss",
    "extract_lora", "input_grams", "merge_adapters", "merge_config", "prepare", "regmean_merge", "regmean_plusplus",
    "chain", "dare_linear", "dare_ties", "drm", "knots_ties", "linear", "math", "merge", "methods",
    "task_arithmetic", "ties",
    # models from different initializations (MuDSC and the permutation family)
    "PermutationSpec", "activation_align", "average", "mlp_spec", "mudsc", "permute", "permute_merge",
    "resnet_spec", "vit_spec", "weight_matching", "zipit",
]
