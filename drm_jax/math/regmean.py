"""RegMean: the closed-form merge of linear layers that best reproduces each model's outputs on its own
inputs (docs/methods.md#regmean).

For one linear layer y = x W (W: in x out, a Flax Dense kernel) and each model's Gram matrix of that
layer's inputs G_t = X_t^T X_t (in x in), RegMean solves

    min_W sum_t ||X_t W - X_t W_t||_F^2   =>   W = (sum_t G_t')^-1 sum_t G_t' W_t,

with G_t' = G_t whose off-diagonal entries are scaled by `reduce_non_diagonal_ratio` alpha (alpha = 1:
the plain least-squares solution; alpha = 0: a per-input-feature weighted mean; FusionBench's CLIP
config uses 0.95). A torch Linear weight is stored (out x in) and computes y = x W^T; with
input_axis=1 the same solve runs on W^T and the result is transposed back, which is FusionBench's
`merging_with_regmean_weights` with weight_transpose=True.

Pure and vmappable: vmap over a leading layer axis L for a stack of same-shaped layers. The solve is one
LU factorization (jnp.linalg.solve), no explicit inverse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

# FusionBench's RegMean config for CLIP models.
DEFAULT_REDUCE_NON_DIAGONAL_RATIO = 0.95


def reduce_non_diagonal(gram: Float[Array, "... d d"], ratio) -> Float[Array, "... d d"]:
    """G with its off-diagonal entries multiplied by `ratio` (traced), its diagonal unchanged."""
    d = gram.shape[-1]
    eye = jnp.eye(d, dtype=gram.dtype)
    return gram * (ratio + (1 - ratio) * eye)


def regmean(weights: Float[Array, "K a b"], grams: Float[Array, "K d d"],
            reduce_non_diagonal_ratio=DEFAULT_REDUCE_NON_DIAGONAL_RATIO, *, input_axis: int = 0
            ) -> Float[Array, "a b"]:
    """The RegMean merge of one linear weight from K models.

    weights: (K, in, out) with input_axis=0 (Flax Dense kernel, y = x W), or (K, out, in) with
      input_axis=1 (torch Linear weight, y = x W^T).
    grams: (K, in, in), each model's Gram matrix of this layer's inputs (any common scale: a mean over
      rows, as FusionBench and `drm_jax.input_grams` give, or a plain sum; only the ratio between models
      matters, so models whose Grams count different numbers of rows weigh differently under a sum).
    reduce_non_diagonal_ratio: alpha in [0, 1] (default 0.95), traced.
    Returns the merged weight in the layout of `weights`, in their dtype.
    """
    if input_axis not in (0, 1):
        raise ValueError(f"input_axis must be 0 (in x out) or 1 (out x in), got {input_axis!r}")
    kernels = weights if input_axis == 0 else jnp.swapaxes(weights, 1, 2)
    reduced = reduce_non_diagonal(grams.astype(kernels.dtype), reduce_non_diagonal_ratio)
    hi = jax.lax.Precision.HIGHEST
    rhs = jnp.einsum("kij,kjo->io", reduced, kernels, precision=hi)
    merged = jnp.linalg.solve(jnp.sum(reduced, axis=0), rhs)
    return (merged if input_axis == 0 else merged.T).astype(weights.dtype)
