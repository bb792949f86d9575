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


class AdapterMethodError(MergeInputError):
    """A merge method whose merged model is not base + a function of the task vectors, asked to merge LoRA
    adapters into one adapter (`drm_jax.merge_adapters`, `drm-jax merge --adapter-out`)."""


class CheckpointError(DrmJaxError, OSError):
    """A checkpoint cannot be read or written (missing, truncated, corrupt, unknown format)."""


class ConfigError(DrmJaxError, ValueError):
    """A merge configuration is invalid (YAML, unknown method or parameter)."""


# Longest quotation of a user's value in an error message: enough to recognise it, never a flood (a YAML
# alias bomb expands a few hundred bytes into hundreds of megabytes).
QUOTE_LIMIT = 80


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """repr(value) cut to about `limit` characters, computed without building the whole repr.

    Strings are cut before quoting; containers show their first few items and levels ("..." marks a cut).
    """
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 6
    short.maxlevel = 3
    text = short.repr(value)
    return text if len(text) <= limit + 3 else text[:limit] + "..."
