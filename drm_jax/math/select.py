"""Order statistics that keep shapes static under `jax.jit`.

Magnitude pruning needs "the k-th smallest magnitude" of a set whose size can depend on traced values
(DRM's rank cut is a mask, so the number of valid entries is only known at run time). A sort would work
but costs O(N log N) and a full copy; instead we bisect on the IEEE-754 bit pattern: for non-negative
floats the int32 view is monotonic, so 31 counting passes find the exact k-th smallest value. Each pass
is a fused compare-and-sum, which vectorises on CPU and is bandwidth-bound on GPU/TPU.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from drm_jax.math.arrays import is_traced

# Per float width: (the integer type of its bits, the bit pattern of +inf, the halvings that reach one
# candidate in [0, inf bits]). Every finite non-negative float maps below its +inf pattern.
_BITS = {4: (jnp.int32, 0x7F800000, 31), 8: (jnp.int64, 0x7FF0000000000000, 63)}


def magnitude_bits(x: Float[Array, "..."]) -> tuple[Array, int, int]:
    """(integer view of |x|'s float bits, +inf's pattern, halvings): float64 keeps its own 64-bit pattern
    (rounded to float32 first, an entry equal to the k-th magnitude would compare below its own rounded
    threshold); narrower floats are widened to float32 exactly."""
    x = jnp.asarray(x)  # a NumPy float64 array is float32 here unless x64 is on
    if x.dtype != jnp.float64:
        x = x.astype(jnp.float32)
    int_type, inf_bits, halvings = _BITS[x.dtype.itemsize]
    return lax.bitcast_convert_type(x, int_type), inf_bits, halvings


def kth_smallest(
    x: Float[Array, " N"],
    k: Int[Array, ""] | int,
    where: Bool[Array, " N"] | None = None,
) -> Float[Array, ""]:
    """Exact k-th smallest (1-based) of the non-negative values `x[where]`.

    Args:
      x: magnitudes, shape (N,), all >= 0 and finite; float64 stays float64, other floats are float32.
      k: rank to select, 1 <= k <= count(where); may be traced.
      where: optional validity mask, shape (N,); invalid entries are ignored.

    Returns:
      The value v = x[i] for some valid i (in float32, or float64 for float64 x), with
      count(valid & x <= v) >= k and count(valid & x < v) < k. Undefined (returns +inf) when k exceeds
      the number of valid entries; callers guard k <= 0.
    """
    bits, inf_bits, halvings = magnitude_bits(x)
    if where is not None:
        # invalid entries get bits that every candidate threshold (>= 0) exceeds: they always count,
        # so the target rank shifts by their number and each pass is one compare-and-sum
        k = k + jnp.sum(~where, dtype=jnp.int32)
        bits = jnp.where(where, bits, -1)
    k = jnp.asarray(k, jnp.int32)

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2  # no overflow: hi - lo < the integer type's range
        enough = jnp.sum(bits <= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    # the halvings of [0, inf bits] reach a single candidate
    lo, _ = lax.fori_loop(0, halvings, body, (jnp.zeros((), bits.dtype), jnp.asarray(inf_bits, bits.dtype)))
    return lax.bitcast_convert_type(lo, jnp.float64 if bits.dtype == jnp.int64 else jnp.float32)


def kth_smallest_per_task(magnitudes: Sequence[Float[Array, "K _"]], k: Int[Array, " K"]) -> Array:
    """Per task t, the exact k[t]-th smallest (1-based) of the non-negative values in row t of every array
    (K, N_i) together, without concatenating them: the bisection of `kth_smallest`, each pass counting over
    every array. Float64 stays float64 (an array of float64 widens the others exactly), other floats are
    float32. Returns (K,); undefined (+inf) where k[t] exceeds the entries, callers guard k <= 0."""
    wide = any(jnp.asarray(x).dtype == jnp.float64 for x in magnitudes)
    views = [magnitude_bits(jnp.asarray(x, jnp.float64) if wide else x) for x in magnitudes]
    bits = [b for b, _, _ in views]
    _, inf_bits, halvings = views[0]
    k = jnp.asarray(k, jnp.int32)

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        count = sum(jnp.sum(b <= mid[:, None], axis=1, dtype=jnp.int32) for b in bits)
        enough = count >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    kk = bits[0].shape[0]
    lo, _ = lax.fori_loop(0, halvings, body, (jnp.zeros(kk, bits[0].dtype), jnp.full(kk, inf_bits, bits[0].dtype)))
    return lax.bitcast_convert_type(lo, jnp.float64 if bits[0].dtype == jnp.int64 else jnp.float32)


@jax.jit
def kth_magnitude_per_task(values: tuple, k) -> Array:
    """`kth_smallest_per_task` of the magnitudes |x| of (K, N_i) arrays: one program per shapes and dtype."""
    return kth_smallest_per_task(tuple(jnp.abs(x) for x in values), k)


def whole_model_ranks(d: int, density):
    """(k, nothing) of the TIES paper's whole-model trim over d entries per task: the rank k = d -
    floor(d density) of each task's threshold (at least 1, int32 (K,)) and where nothing is trimmed
    (k <= 0 before the clip). density: (K,), concrete (float64 on the host) or traced (float32)."""
    if isinstance(density, np.ndarray):
        k = d - np.floor(d * density).astype(np.int64)
        return jnp.asarray(np.maximum(k, 1).astype(np.int32)), jnp.asarray(k <= 0)
    k = d - jnp.floor(d * density)
    return jnp.maximum(k, 1).astype(jnp.int32), k <= 0


def whole_model_thresholds(deltas: Sequence[Float[Array, "K _"]], density) -> Array:
    """The TIES paper's per-task threshold: keep |delta| >= the k-th smallest, k = d - int(d density),
    over the whole task vector (d entries per task, every merged leaf). deltas: arrays (K, N_i); density:
    (K,), concrete (counted on the host in float64) or traced. 0 where nothing is trimmed."""
    d = sum(int(x.shape[1]) for x in deltas)
    k, nothing = whole_model_ranks(d, density)
    if d == 0:
        return jnp.zeros(k.shape, jnp.float32)
    return jnp.where(nothing, 0.0, kth_magnitude_per_task(tuple(deltas), k))


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


def pruning_counts(keep, rows: int, row_size: int, rule: str = "kthvalue"):
    """k of `keep_at_least_kth` for every possible number of valid rows, n = 0 .. rows.

    N = n * row_size entries compete; "kthvalue" gives k = N - round(N keep) (docs/methods.md#drm, the
    TIES/DRM reference rule), "top_k" gives k = N - max(1, floor(keep N)) + 1 (the floor(keep N) largest,
    at least one unless keep is 0: mergekit's `magnitude`). keep has shape () or (T,) (one density per
    task); the table has shape keep.shape + (rows + 1,).

    Concrete densities are rounded on the host in float64, exactly as Python rounds (so a traced density
    gives the same count as a fixed one). A traced density (a merge inside the caller's own jit) is rounded
    on the device in float32, which can differ by one entry where N * keep is within rounding of x.5.
    """
    n = np.arange(rows + 1, dtype=np.int64) * row_size
    if is_traced(keep):
        xp, n, keep = jnp, jnp.asarray(n, jnp.float32), jnp.asarray(keep, jnp.float32)[..., None]
    else:
        xp, keep = np, np.asarray(keep, np.float64)[..., None]
    if rule == "kthvalue":
        k = n - xp.round(n * keep)
    else:
        kept = xp.where(keep > 0, xp.maximum(1, xp.floor(keep * n)), 0)
        k = n - kept + 1
    if xp is np:
        if n[-1] >= 2**31:
            raise ValueError(f"{int(n[-1])} entries exceed the int32 range of the pruning count")
        return jnp.asarray(k.astype(np.int32))
    return k.astype(jnp.int32)


def task_variance(values: Float[Array, "K ..."]) -> Float[Array, "..."]:
    """Population variance over the K tasks, per entry (shape values.shape[1:]).

    Computed about the first task's value (x_t - x_0, then the two-pass variance of those), so an entry
    where every task has the same value gets exactly 0 and any other entry a positive value: what SCE's
    count of non-zero variances needs (torch accumulates its variance in float64, where the same holds).
    """
    d = values - values[:1]
    mean = jnp.mean(d, axis=0)
    return jnp.mean(jnp.square(d - mean[None]), axis=0)


def top_variance_mask(values: Float[Array, "K ..."], fraction) -> Bool[Array, "..."]:
    """SCE's selection: the entries whose variance over the tasks is among the k largest.

    values: (K, ...) task vectors. fraction: () in [0, 1] (SCE's `select_topk`), may be traced.
    k = floor(float32(count of non-zero variances) * float32(fraction)), as torch computes it; the mask
    keeps variance >= the k-th largest (every entry tied with it; mergekit keeps exactly k). fraction >= 1
    keeps every entry (zero variances too), fraction <= 0 or k = 0 none. Returns (...) bool.
    """
    var = task_variance(values)
    flat = var.reshape(-1)
    fraction = jnp.asarray(fraction, jnp.float32)
    nonzero = jnp.sum(flat != 0, dtype=jnp.int32)
    k = jnp.floor(nonzero.astype(jnp.float32) * fraction).astype(jnp.int32)
    threshold = kth_smallest(flat, jnp.maximum(flat.shape[0] - k + 1, 1))
    mask = (k > 0) & (flat >= threshold)
    mask = jnp.where(fraction >= 1, True, jnp.where(fraction <= 0, False, mask))
    return mask.reshape(var.shape)


__all__ = ["keep_at_least_kth", "kth_magnitude_per_task", "kth_smallest", "kth_smallest_per_task", "magnitude_bits",
           "pruning_counts", "task_variance", "top_variance_mask", "whole_model_ranks", "whole_model_thresholds"]
