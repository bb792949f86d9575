"""Host-side checks of the numbers a user gives (config values, coefficients, adapter scales), shared by
every layer: it imports nothing of drm_jax, so `io` and `methods` both read it without importing each other."""

from __future__ import annotations

import math
import numbers
from typing import Any


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


__all__ = ["is_finite_number"]
