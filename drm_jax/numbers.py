"""Host-side checks of the numbers a user gives (config values, coefficients, adapter scales) and of the
dtypes that hold them, shared by every layer: it imports nothing of drm_jax, so `io`, `engine` and `methods`
all read it without importing each other."""

from __future__ import annotations

import math
import numbers
from typing import Any

import ml_dtypes
import numpy as np

# The floating dtypes numpy does not count as np.floating (ml_dtypes' bfloat16 and float8 types).
_EXTRA_FLOATING = frozenset(np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2,
                                                  ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2fnuz))


def is_finite_number(v: Any) -> bool:
    """A real number (not a bool) that a float holds finitely: an integer of 400 digits is not one."""
    if hasattr(v, "shape") and getattr(v, "shape", None) == () and not isinstance(v, bool):
        v = v.item() if hasattr(v, "item") else v  # a 0-d array or numpy scalar
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # int -> float conversion of an integer beyond float's range
        return False


def is_floating(dtype) -> bool:
    """A floating dtype, ml_dtypes' bfloat16 and float8 types included (numpy does not count them as
    np.floating); JAX's extended dtypes (an NNX State's RNG keys) hold no numbers."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return False
    return bool(np.issubdtype(dtype, np.floating)) or dtype in _EXTRA_FLOATING


__all__ = ["is_finite_number", "is_floating"]
