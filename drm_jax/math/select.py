"""Order statistics that keep shapes static under `jax.jit`.

Magnitude pruning needs "the k-th smallest magnitude" of a set whose size can depend on traced values
(DRM's rank cut is a mask, so the number of valid entries is only known at run time). A sort would work
but costs O(N log N) and a full copy; instead we bisect on the IEEE-754 bit pattern: for non-negative
floats the int32 view is monotonic, so 31 counting passes find the exact k-th smallest value. Each pass
is a fused compare-and-sum, which vectorises on CPU and is bandwidth-bound on GPU/TPU.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

# Bit pattern of +inf in float32: every finite non-negative float32 maps below it.
_INF_BITS = 0x7F800000


def kth_smallest(
    x: Float[Array, " N"],
    k: Int[Array, ""] | int,
    where: Bool[Array, " N"] | None = None,
) -> Float[Array, ""]:
    """Exact k-th smallest (1-based) of the non-negative float32 values `x[where]`.

    Args:
      x: magnitudes, shape (N,), all >= 0 and finite.
      k: rank to select, 1 <= k <= count(where); may be traced.
      where: optional validity mask, shape (N,); invalid entries are ignored.

    Returns:
      The value v = x[i] for some valid i, with count(valid & x <= v) >= k and count(valid & x < v) < k.
      Undefined (returns +inf) when k exceeds the number of valid entries; callers guard k <= 0.
    """
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    if where is not None:
        # invalid entries get bits that every candidate threshold (>= 0) exceeds: they always count,
        # so the target rank shifts by their number and each pass is one compare-and-sum
        k = k + jnp.sum(~where, dtype=jnp.int32)
        bits = jnp.where(where, bits, -1)
    k = jnp.asarray(k, jnp.int32)

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2  # no int32 overflow: hi - lo < 2**31
        enough = jnp.sum(bits <= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    # 31 halvings of [0, 0x7f800000] reach a single candidate.
    lo, _ = lax.fori_loop(0, 31, body, (jnp.int32(0), jnp.int32(_INF_BITS)))
    return lax.bitcast_convert_type(lo, jnp.float32)


def keep_at_least_kth(
    magnitude: Float[Array, " N"],
    k: Int[Array, ""] | int,
    where: Bool[Array, " N"] | None = None,
) -> Bool[Array, " N"]:
    """Mask of entries whose magnitude is >= the k-th smallest valid magnitude.

    This is the rule of the TIES and DRM reference implementations (`kthvalue` then `>=`): it keeps
    N - k + 1 entries when there are no ties. k <= 0 keeps every valid entry.
    """
    valid = jnp.ones(magnitude.shape, bool) if where is None else where
    k = jnp.asarray(k, jnp.int32)
    threshold = kth_smallest(magnitude, jnp.maximum(k, 1), valid)
    return valid & ((k <= 0) | (magnitude >= threshold))


def drop_count(
    n_rows: Int[Array, ""] | int, row_size: int, max_rows: int, keep: float
) -> Int[Array, ""]:
    """k = N - round(N * keep) of SPEC for N = n_rows * row_size, exact for n_rows in [0, max_rows].

    N may be traced (the rank mask sets n_rows), so SPEC's Python-float rounding is precomputed on the
    host for each possible row count and looked up: exact even where N exceeds float32's integers.
    """
    table = np.array(
        [n * row_size - round(n * row_size * keep) for n in range(max_rows + 1)], dtype=np.int64
    )
    if table.max(initial=0) >= 2**31:
        raise ValueError(f"{max_rows * row_size} entries exceed the int32 range of the pruning count")
    return jnp.asarray(table.astype(np.int32))[jnp.asarray(n_rows, jnp.int32)]


__all__ = ["drop_count", "keep_at_least_kth", "kth_smallest"]
