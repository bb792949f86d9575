"""Two array facts every layer asks: a full-precision matmul, and whether a value is traced.

The one home of each (they were written in four and five places).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def mm(a, b):
    """a @ b at full float32 precision (XLA's default on accelerators rounds the inputs to bfloat16)."""
    return jnp.matmul(a, b, precision="highest")


def is_traced(*values: Any) -> bool:
    """Whether any leaf of the values is a tracer (a merge inside the caller's jit, vmap or grad): host-side
    checks and exact host arithmetic are then skipped."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(values))


__all__ = ["is_traced", "mm"]
