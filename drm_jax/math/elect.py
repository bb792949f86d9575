"""Sign election by mass (TIES, DRM step 7)."""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float

from drm_jax.math.state import MergeState, MergeTransform, task_sum

Tie = Literal["majority", "positive"]


def elected_sign(values: Float[Array, "K ..."], tie: Tie = "majority") -> Float[Array, "..."]:
    """Per entry, the sign of the summed mass over the K tasks.

    tie: what an entry whose sum is exactly 0 gets. "majority" (TIES and DRM reference, docs/methods.md#drm-h step 7): the
      sign of the sum of the elected signs over all entries. "positive" (mergekit): +1.
    """
    s = jnp.sign(task_sum(values))
    if tie == "majority":
        return jnp.where(s == 0, jnp.sign(jnp.sum(s)), s)
    if tie == "positive":
        return jnp.where(s == 0, 1.0, s).astype(values.dtype)
    raise ValueError(f"unknown tie rule {tie!r}; expected 'majority' or 'positive'")


def disagreeing_zeroed(values: Float[Array, "K ..."], sign: Float[Array, "..."]) -> Float[Array, "K ..."]:
    """Zero every entry whose sign differs from the elected sign (zeros stay zero)."""
    return jnp.where(jnp.sign(values) == sign[None], values, 0.0)


def elect_sign(tie: Tie = "majority") -> MergeTransform:
    """Keep, per entry, only the task values that agree with the sign elected by mass."""
    if tie not in ("majority", "positive"):
        raise ValueError(f"unknown tie rule {tie!r}; expected 'majority' or 'positive'")

    def apply(state: MergeState) -> MergeState:
        return state.replace(values=disagreeing_zeroed(state.values, elected_sign(state.values, tie)))

    return apply


__all__ = ["Tie", "disagreeing_zeroed", "elect_sign", "elected_sign"]
