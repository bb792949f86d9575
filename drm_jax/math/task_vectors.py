"""Task vectors: delta_t = W_t - W_base (docs/methods.md#task-vectors)."""

from __future__ import annotations


from jaxtyping import Array, Float


def task_vectors(base: Float[Array, "..."], models: Float[Array, "K ..."]) -> Float[Array, "K ..."]:
    """Deltas of K fine-tuned weights (K, ...) from their base (...), in the dtype of `models`."""
    return models - base[None].astype(models.dtype)


def apply_delta(base: Float[Array, "..."], delta: Float[Array, "..."]) -> Float[Array, "..."]:
    """Merged weight W_base + delta, in the dtype of `delta`."""
    return base.astype(delta.dtype) + delta


__all__ = ["apply_delta", "task_vectors"]

