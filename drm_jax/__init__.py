"""drm_jax: Decom-Renorm-Merge and classic model merging as compiled, vmapped JAX transforms."""

from drm_jax.errors import CheckpointError, ConfigError, DrmJaxError, MergeInputError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DrmJaxError", "MergeInputError", "__version__"]
