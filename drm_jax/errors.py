"""Exceptions shared by every layer of drm_jax.

Every error a user can cause (bad input, bad checkpoint, bad config) is a `DrmJaxError`, so the command
line can print it as one line and exit non-zero without a traceback. The message names the file, the
tensor (leaf path) or the key, and says what is wrong.
"""

from __future__ import annotations


class DrmJaxError(Exception):
    """Base class of the errors drm_jax raises on bad input."""


class MergeInputError(DrmJaxError, ValueError):
    """The models given to a merge do not fit together (structure, shape, NaN/Inf, parameters)."""


class CheckpointError(DrmJaxError, OSError):
    """A checkpoint cannot be read or written (missing, truncated, corrupt, unknown format)."""


class ConfigError(DrmJaxError, ValueError):
    """A merge configuration is invalid (YAML, unknown method or parameter)."""
