"""The jitted, vmapped function that merges one stacked group of layers.

One call merges L layers: base (L, ...) and models (L, K, ...) give merged weights (L, ...). jax.jit
caches the compiled program by the static transform and the input shapes, so every chunk of a group and
every later merge with the same method reuse it.
"""

from __future__ import annotations



import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from drm_jax.math.state import MergeTransform, merge_deltas
from drm_jax.math.task_vectors import task_vectors


def _finite_rows(x: Array, lead: int) -> Array:
    """all(isfinite) over every axis after the first `lead` ones."""
    return jnp.all(jnp.isfinite(x), axis=tuple(range(lead, x.ndim)))


def merge_layers(
    transform: MergeTransform,
    base: Float[Array, "L ..."],
    models: Float[Array, "L K ..."],
    coefficients: Float[Array, " K"],
    keys: Array,
    threshold: Float[Array, " K"] | None,
) -> tuple[Float[Array, "L ..."], Bool[Array, "L K1"]]:
    """Merge a stack of L layers; also report which inputs were finite.

    Returns (merged (L, ...) in the compute dtype, finite (L, K + 1): column 0 the base, 1..K the
    models). Non-finite inputs are replaced by zeros before the merge so that no LAPACK routine ever
    sees a NaN; the caller raises on the flags before returning anything.
    """
    finite = jnp.concatenate([_finite_rows(base, 1)[:, None], _finite_rows(models, 2)], axis=1)
    base = jnp.where(jnp.isfinite(base), base, 0.0)
    models = jnp.where(jnp.isfinite(models), models, 0.0)

    def one_layer(b, ms, key):
        return b + merge_deltas(transform, task_vectors(b, ms), coefficients, key, threshold)

    # lax.map, not vmap: DRM truncates each layer's joint space to its own rank bucket with lax.switch,
    # which vmap would turn into computing every branch
    return jax.lax.map(lambda args: one_layer(*args), (base, models, keys)), finite


merge_layers_jit = jax.jit(merge_layers, static_argnums=(0,))




__all__ = ["merge_layers", "merge_layers_jit"]
