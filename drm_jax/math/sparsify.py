"""Sparsification stages: magnitude pruning (TIES, DRM step 5), random drop (DARE), mergekit's magnitude
band (Model Breadcrumbs), magnitude-ranked random drop (DELLA) and mergekit's L1 rescaling
(docs/methods.md#rescale)."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float


from drm_jax.math.select import keep_at_least_kth, kth_smallest, pruning_counts
from drm_jax.math.space import unit_magnitudes
from drm_jax.math.arrays import is_traced
from drm_jax.math.state import (MergeState, MergeTransform, broadcast_tasks, derives, hyper, number, reads,
                                 stage_reads)

Scope = Literal["joint", "per_task"]
Rule = Literal["kthvalue", "top_k"]
RescaleRule = Literal["inverse", "l1"]


def check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def prune_geometry(shape: tuple[int, ...], scope: Scope, joint: bool) -> tuple[int, int]:
    """(rows, row_size) of the competition `pruning_counts` sizes, for values of shape (K, ...).

    In a joint space (K, q, m) the rows are the q singular directions (only the valid ones compete);
    joint scope pools the K tasks (row_size K m), per_task ranks each task alone (row_size m). In weight
    space there is one "row": the whole tensor of one task (per_task) or of all tasks (joint).
    """
    k = shape[0]
    if joint:
        q, m = shape[1], int(math.prod(shape[2:]))
        return q, (m if scope == "per_task" else k * m)
    size = int(math.prod(shape[1:]))
    return 1, (size if scope == "per_task" else k * size)


def magnitude_mask(
    magnitudes: Float[Array, "K ..."],
    keep: float | None = None,
    scope: Scope = "joint",
    rule: Rule = "kthvalue",
    valid_rows: Bool[Array, " q"] | None = None,
    counts: Array | None = None,
) -> Bool[Array, "K ..."]:
    """Which entries survive magnitude pruning at density `keep`.

    Args:
      magnitudes: (K, ...) non-negative magnitudes. In a joint space (K, q, m).
      keep: fraction kept (1 - drop rate), or None when `counts` are given.
      scope: "joint" ranks all K tasks' entries together (DRM step 5); "per_task" ranks each task alone
        (TIES' trim; DRM's per-block ablation).
      rule: "kthvalue": keep magnitudes >= the k-th smallest, k = N - round(N keep) (the TIES/DRM
        reference code, which keeps N - k + 1 entries). "top_k": keep exactly floor(keep N) largest
        (mergekit's `magnitude`, up to ties).
      valid_rows: joint-space rank mask (q,); invalid rows never survive and are not counted in N.
      counts: `pruning_counts` table, shape (rows + 1,) or (K, rows + 1) for per-task densities
        (per_task scope only); computed from `keep` when None.
    """
    per_task = scope == "per_task"
    joint_space = valid_rows is not None
    rows, row_size = prune_geometry(magnitudes.shape, scope, joint_space)
    if counts is None:
        counts = pruning_counts(check_fraction("density", keep) if not is_traced(keep) else keep,
                                rows, row_size, rule)
    k_tasks = magnitudes.shape[0]
    flat = magnitudes.reshape(k_tasks, -1) if per_task else magnitudes.reshape(1, -1)
    n_valid = jnp.sum(valid_rows, dtype=jnp.int32) if joint_space else jnp.int32(1)
    k = counts[..., n_valid]  # () or (K,)
    k = jnp.broadcast_to(k, (flat.shape[0],))
    if not joint_space:
        mask = jax.vmap(lambda x, kk: keep_at_least_kth(x, kk))(flat, k)
    else:
        valid = jnp.broadcast_to(valid_rows[None, :, None], magnitudes.shape).reshape(flat.shape)
        mask = jax.vmap(lambda x, kk, v: keep_at_least_kth(x, kk, v))(flat, k, valid)
    return mask.reshape(magnitudes.shape)


def prune(keep: float | None = None, scope: Scope = "joint", rule: Rule = "kthvalue") -> MergeTransform:
    """Magnitude pruning of the current values at density `keep` (see `magnitude_mask`).

    keep: a fixed density, or None to read it from the merge state (traced): the exact counts
      `state.hparams["prune_counts"]` where the engine computed them, else `state.hparams["density"]`.
    In a joint space the magnitudes are those of the unit-norm blocks (after `renormalize`) or of Vh
    (without), and the values keep their scale: X_t = S_t V_t pruned (DRM steps 5-6).
    """
    if keep is not None:
        keep = check_fraction("density", keep)
    if scope not in ("joint", "per_task"):
        raise ValueError(f"unknown pruning scope {scope!r}; expected 'joint' or 'per_task'")
    if rule not in ("kthvalue", "top_k"):
        raise ValueError(f"unknown pruning rule {rule!r}; expected 'kthvalue' or 'top_k'")

    def apply(state: MergeState) -> MergeState:
        counts = None if keep is not None else number(state.hparams, "prune_counts", required=False)
        density = keep if keep is not None or counts is not None else hyper(state, None, "density")
        mask = magnitude_mask(unit_magnitudes(state), density, scope, rule, state.valid, counts)
        return state.replace(values=jnp.where(mask, state.values, 0.0))

    def counts(numbers: dict, at: MergeState):  # the host hook: exact counts at the values the stage receives
        return prune_counts(numbers["density"], at.values.shape, scope, rule, joint=at.valid is not None)

    return apply if keep is not None else derives(reads(apply, "density"), "prune_counts", counts)


def prune_counts(density, shape: tuple[int, ...], scope: Scope, rule: Rule, joint: bool):
    """The host hook of `prune(None)`: its exact counts (`pruning_counts`) for values of shape (K, ...) at
    the stage (a joint space's (K, q, m) with `joint`), from a concrete or traced density."""
    rows, row_size = prune_geometry(shape, scope, joint=joint)
    return pruning_counts(density, rows, row_size, rule)


def prune_by_threshold() -> MergeTransform:
    """Keep entries whose magnitude is >= their task's threshold in `MergeState.threshold`.

    The thresholds come from the whole task vector (TIES paper); the engine computes them beforehand.
    """

    def apply(state: MergeState) -> MergeState:
        if state.threshold is None:
            raise ValueError("prune_by_threshold() needs MergeState.threshold")
        keep = unit_magnitudes(state) >= broadcast_tasks(state.threshold, state.values)
        return state.replace(values=jnp.where(keep, state.values, 0.0))

    return reads(apply, "threshold")  # the engine's whole-model thresholds of a traced density


def row_uniform(key: Array, shape: tuple[int, ...], row0=0) -> Float[Array, "..."]:
    """Uniform float32 draws in [0, 1) for values of shape (K, rows, ...): row r of the leaf (axis 1 of
    the values) draws its (K, ...) numbers from its own key, `fold_in(key, row0 + r)`, so a block of rows
    starting at row0 draws exactly what those rows draw in the whole leaf, however the leaf is cut.
    Values of a 0-D or 1-D leaf, (K,) or (K, n), are one row: drawn from `key` itself."""
    if len(shape) < 3:
        return jax.random.uniform(key, shape, jnp.float32)
    rows = jnp.asarray(row0, jnp.uint32) + jnp.arange(shape[1], dtype=jnp.uint32)
    draws = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), (shape[0],) + tuple(shape[2:]),
                                                  jnp.float32))(rows)
    return jnp.moveaxis(draws, 0, 1)


def random_drop_mask(key: Array, shape: tuple[int, ...], drop_rate) -> Bool[Array, "..."]:
    """Bernoulli keep-mask with P(keep) = 1 - drop_rate; drop_rate () or (K,) for shape (K, ...)."""
    keep = 1.0 - jnp.asarray(drop_rate, jnp.float32)
    return jax.random.bernoulli(key, keep.reshape(keep.shape + (1,) * (len(shape) - keep.ndim)), shape)


def dare_drop(drop_rate: float | None = None, rescale: bool = True, rule: RescaleRule = "inverse") -> MergeTransform:
    """DARE (arXiv 2311.03099): drop each entry with probability p, rescale the survivors.

    drop_rate: a fixed p, or None to read it from the merge state: `state.hparams["drop_rate"]`, shape ()
      or (K,) (one per model), with the keep probability 1 - p and the factor 1 / (1 - p) computed exactly
      on the host where given ("dare_keep", "dare_scale": the stage's hooks, `state.derives`). p = 1 drops everything.
    rule: with `rescale`, "inverse" divides each survivor by its keep probability 1 - p (the paper), "l1"
      scales each task's tensor back to its L1 norm (mergekit 0.1.5's `rescale`; `l1_rescaled`).
    Uses `MergeState.key`; the engine derives it from the seed and the leaf's path, and the draws are
    keyed per row of the leaf (`row_uniform`), so the result does not depend on how leaves are grouped,
    chunked, sharded or cut into row blocks.
    """
    if drop_rate is not None:
        drop_rate = check_fraction("drop rate", drop_rate)
    if rule not in ("inverse", "l1"):
        raise ValueError(f"unknown rescale rule {rule!r}; expected 'inverse' or 'l1'")

    def factors(state: MergeState):
        if drop_rate is not None:
            return dare_factors(drop_rate)
        if number(state.hparams, "dare_keep", required=False) is not None:  # `dare_factors` on the host
            return number(state.hparams, "dare_keep"), number(state.hparams, "dare_scale")
        return dare_factors(hyper(state, None, "drop_rate"))

    def masked(state: MergeState):
        if state.key is None:
            raise ValueError("dare_drop() needs a PRNG key in MergeState.key")
        keep_p, factor = factors(state)
        keep_p = jnp.asarray(keep_p, jnp.float32)
        if keep_p.ndim:  # one probability per model
            keep_p = broadcast_tasks(keep_p, state.values)
        mask = row_uniform(state.key, state.values.shape, state.row0) < keep_p
        return mask, factor

    def apply(state: MergeState) -> MergeState:
        mask, factor = masked(state)
        if rescale and rule == "l1":
            return state.replace(values=l1_rescaled(state.values, jnp.where(mask, state.values, 0.0), state.stats))
        factor = jnp.asarray(factor if rescale else 1.0, state.values.dtype)
        if factor.ndim:
            factor = broadcast_tasks(factor, state.values)
        return state.replace(values=jnp.where(mask, state.values * factor, 0.0))

    if rescale and rule == "l1":
        apply.row_sums = lambda state: l1_sums(state.values, jnp.where(masked(state)[0], state.values, 0.0))
    if drop_rate is not None:
        return reads(apply, "seed")

    def keep(numbers: dict, at: MergeState):  # the host hooks: `dare_factors` of the drop rates given
        return dare_factors(numbers["drop_rate"])[0]

    def factor(numbers: dict, at: MergeState):
        return dare_factors(numbers["drop_rate"])[1]

    return derives(derives(reads(apply, "drop_rate", "seed"), "dare_keep", keep), "dare_scale", factor)


def dare_factors(drop_rate):
    """(keep probability 1 - p, rescaling 1 / (1 - p), 0 where p = 1), in float64 on the host for
    concrete p (the float32 of 1 - 0.9 is not 1 - float32(0.9)), on the device for a traced one."""
    if is_traced(drop_rate):
        keep = 1.0 - drop_rate
        return keep, jnp.where(keep > 0, 1.0 / jnp.where(keep > 0, keep, 1.0), 0.0)
    keep = 1.0 - np.asarray(drop_rate, np.float64)
    with np.errstate(divide="ignore"):
        factor = np.where(keep > 0, 1.0 / np.where(keep > 0, keep, 1.0), 0.0)
    return jnp.asarray(keep.astype(np.float32)), jnp.asarray(factor.astype(np.float32))


# -- mergekit 0.1.5's sparsifiers: L1 rescaling, magnitude band, magnitude-ranked drop --------------------
# mergekit's floor under which a norm counts as zero (no rescaling), compared in float32.
L1_FLOOR = 1e-7


def l1_sums(original: Float[Array, "K ..."], masked: Float[Array, "K ..."]) -> tuple[Array, Array]:
    """(||original_t||_1, ||masked_t||_1), each (K,): the statistics of `l1_rescaled`, which a leaf cut into
    row blocks sums over its blocks (`RowBlocks`)."""
    axes = tuple(range(1, original.ndim))
    return jnp.sum(jnp.abs(original), axis=axes), jnp.sum(jnp.abs(masked), axis=axes)


def l1_rescaled(original: Float[Array, "K ..."], masked: Float[Array, "K ..."], sums=None) -> Float[Array, "K ..."]:
    """Each task's sparsified tensor scaled back to the L1 norm of its original (docs/methods.md#rescale).

    masked_t * (||original_t||_1 / ||masked_t||_1), per task t over all entries of its tensor; masked_t is
    returned unscaled where either norm is below 1e-7 (mergekit's `rescaled_masked_tensor` with the l1
    norm). Shapes (K, ...) in, (K, ...) out. sums: None, or the two norms (K,) of the whole tensor when
    `original` and `masked` are one row block of it (`l1_sums` summed over the blocks).
    """
    before, after = l1_sums(original, masked) if sums is None else sums
    shape = (original.shape[0],) + (1,) * (original.ndim - 1)
    before = jnp.asarray(before, original.dtype).reshape(shape)
    after = jnp.asarray(after, original.dtype).reshape(shape)
    floor = jnp.asarray(L1_FLOOR, before.dtype)
    ok = (before >= floor) & (after >= floor)
    return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)


def rescale_l1(sparsify: MergeTransform) -> MergeTransform:
    """`sparsify`, then every task's tensor rescaled to the L1 norm it had before (`l1_rescaled`):
    mergekit's `rescale: true` after its magnitude trim or magnitude band."""

    def apply(state: MergeState) -> MergeState:
        out = sparsify(state)
        return out.replace(values=l1_rescaled(state.values, out.values))

    apply.derived = getattr(sparsify, "derived", ())  # its host hooks: it receives the state this stage does
    return reads(apply, *stage_reads(sparsify))


def band_counts(density, gamma, n: int):
    """Where Model Breadcrumbs' band lies among the n magnitudes of a tensor sorted ascending.

    density, gamma: () or (K,), each in [0, 1]. Returns (low, count), int32 arrays of the same shape:
    count = floor(density n) entries are kept, from ascending rank `low` = max(0, n - count -
    floor(gamma n)) on (0-based): the floor(gamma n) largest are dropped as outliers unless that would
    leave fewer than `count` entries, and the smallest fill the rest (mergekit's `magnitude_outliers`).
    Concrete values are counted on the host in float64, as Python's int(density * n) does; traced ones
    on the device in float32 (which can differ by one where density * n is within rounding of an integer).
    """
    if is_traced(density, gamma):
        count = jnp.floor(jnp.asarray(density, jnp.float32) * n)
        top = jnp.floor(jnp.asarray(gamma, jnp.float32) * n)
        low = jnp.maximum(0.0, n - count - top)
        return low.astype(jnp.int32), count.astype(jnp.int32)
    if n >= 2**31:
        raise ValueError(f"{n} entries exceed the int32 range of the band counts")
    count = np.floor(np.asarray(density, np.float64) * n)
    top = np.floor(np.asarray(gamma, np.float64) * n)
    low = np.maximum(0.0, n - count - top)
    count, low = np.broadcast_arrays(count, low)
    return jnp.asarray(low.astype(np.int32)), jnp.asarray(count.astype(np.int32))


def magnitude_band_mask(magnitudes: Float[Array, "K ..."], low, count) -> Bool[Array, "K ..."]:
    """Per task, the entries whose ascending magnitude rank lies in [low_t, low_t + count_t).

    magnitudes: (K, ...) non-negative. low, count: (K,) int32 (`band_counts`). The band's ends are the
    exact (low + 1)-th and (low + count)-th smallest magnitudes (`kth_smallest`); every entry between
    them is kept, so magnitudes tied at an end are all kept (mergekit keeps exactly `count`, breaking the
    tie by its sort order). count = 0 keeps nothing.
    """
    k = magnitudes.shape[0]
    flat = magnitudes.reshape(k, -1)

    def one(x, lo_rank, n_kept):
        lo = kth_smallest(x, jnp.maximum(lo_rank + 1, 1))
        hi = kth_smallest(x, jnp.maximum(lo_rank + n_kept, 1))
        return (n_kept > 0) & (x >= lo) & (x <= hi)

    low = jnp.broadcast_to(jnp.asarray(low, jnp.int32), (k,))
    count = jnp.broadcast_to(jnp.asarray(count, jnp.int32), (k,))
    return jax.vmap(one)(flat, low, count).reshape(magnitudes.shape)


def magnitude_band(density: float | None = None, gamma: float | None = None) -> MergeTransform:
    """Model Breadcrumbs' sparsifier: keep each task's magnitude band (`magnitude_band_mask`) of
    `band_counts` at the stage's tensor size.

    density, gamma: fixed fractions (the band counted on the host when the program is traced), or both
      None to read the traced `state.hparams["density"]` and `["gamma"]` (() or (K,)): the counts
      `["band_low"]`, `["band_count"]` ((K,) int32) are then the stage's host hooks' (`band_counts` in
      float64 where the numbers are concrete, `state.derives`), else counted in the program.
    """
    if (density is None) != (gamma is None):
        raise ValueError("magnitude_band() takes both density and gamma, or neither (read from the merge state)")
    if density is not None:
        density, gamma = check_fraction("density", density), check_fraction("gamma", gamma)

    def counts(state: MergeState):
        n = int(math.prod(state.values.shape[1:]))
        if density is not None:
            return band_counts(density, gamma, n)
        if number(state.hparams, "band_low", required=False) is not None:  # the hooks' counts
            return number(state.hparams, "band_low"), number(state.hparams, "band_count")
        return band_counts(hyper(state, None, "density"), hyper(state, None, "gamma"), n)

    def apply(state: MergeState) -> MergeState:
        mask = magnitude_band_mask(jnp.abs(state.values), *counts(state))
        return state.replace(values=jnp.where(mask, state.values, 0.0))

    if density is not None:
        return apply

    def low(numbers: dict, at: MergeState):  # the host hooks: `band_counts` at the stage's tensor size
        return band_counts(numbers["density"], numbers["gamma"], int(math.prod(at.values.shape[1:])))[0]

    def count(numbers: dict, at: MergeState):
        return band_counts(numbers["density"], numbers["gamma"], int(math.prod(at.values.shape[1:])))[1]

    return derives(derives(reads(apply, "density", "gamma"), "band_low", low), "band_count", count)


def ranked_width(shape: tuple[int, ...]) -> int:
    """n, the length of the rows DELLA ranks in values of shape (K, ...): axis 2 of (K, rows, n, ...) (the
    input axis of an (out, in) weight), or every entry of a 0-D or 1-D leaf's (K,) or (K, n) (one row)."""
    return int(shape[2]) if len(shape) > 2 else int(math.prod(shape[1:]))


def rank_probabilities(density, epsilon, shape: tuple[int, ...]) -> Float[Array, "K n"]:
    """DELLA's keep probability of each magnitude rank (docs/methods.md#della), for values of shape (K, ...).

    density, epsilon: () or (K,). Returns (K, n) float32, n = `ranked_width(shape)`: for rank r = 0..n-1
    (ascending magnitude) p = density - epsilon + 2 epsilon r / (n - 1), from density - epsilon for the
    smallest to density + epsilon for the largest; a row of one entry (n = 1) gets p = density; density
    >= 1 gives p = 1 (nothing dropped), density <= 0 gives p = 0. Concrete values are computed on the
    host in float64 and rounded once (the host hook of `ranked_drop(None)`); traced ones in the program in
    float32.
    """
    k, n = shape[0], ranked_width(shape)
    if is_traced(density, epsilon):
        d = jnp.broadcast_to(jnp.asarray(density, jnp.float32), (k,))[:, None]
        e = jnp.broadcast_to(jnp.asarray(epsilon, jnp.float32), (k,))[:, None]
        norm = jnp.arange(n, dtype=jnp.float32) / (n - 1) if n > 1 else jnp.full((n,), 0.5, jnp.float32)
        p = (d - e) + norm * 2.0 * e
        return jnp.where(d >= 1, 1.0, jnp.where(d <= 0, 0.0, p))
    d = np.broadcast_to(np.asarray(density, np.float64), (k,))[:, None]
    e = np.broadcast_to(np.asarray(epsilon, np.float64), (k,))[:, None]
    norm = np.arange(n, dtype=np.float64) / (n - 1) if n > 1 else np.full((n,), 0.5)
    p = np.where(d >= 1, 1.0, np.where(d <= 0, 0.0, (d - e) + norm * 2.0 * e))
    return jnp.asarray(p.astype(np.float32))


def ranked_keep_probabilities(magnitudes: Float[Array, "K ..."], table: Float[Array, "K n"]) -> Float[Array, "K ..."]:
    """Each entry's keep probability from its magnitude rank in its row: `table[t, rank]`.

    magnitudes: (K, ...). A task's tensor is ranked along its axis 1 (the input axis of an (out, in)
    weight; a 1-D tensor is one row), ranks 0..n-1 by ascending magnitude, ties broken by position.
    table: (K, n) probabilities per rank (`rank_probabilities`).
    """
    k = magnitudes.shape[0]
    per_task = magnitudes.reshape(k, 1, -1) if magnitudes.ndim <= 2 else magnitudes
    n = per_task.shape[2]
    if table.shape != (k, n):
        raise ValueError(f"ranked_drop(): {table.shape} rank probabilities for {k} tasks of rows of {n} entries")
    ranks = jnp.argsort(jnp.argsort(per_task, axis=2, stable=True), axis=2, stable=True)
    p = jax.vmap(lambda row, r: row[r])(table, ranks)
    return p.reshape(magnitudes.shape)


def ranked_drop(density: float | None = None, epsilon: float | None = None, rescale: bool = True,
                rule: RescaleRule = "l1") -> MergeTransform:
    """DELLA's MagPrune: drop each entry with probability 1 - p (`ranked_keep_probabilities`), then rescale.

    density, epsilon: fixed numbers, or both None to read the traced `state.hparams["density"]` and
    `["epsilon"]` (() or (K,)): the probabilities per rank `["della_probabilities"]` ((K, n)) are then the
    stage's host hook's (`rank_probabilities` in float64 where the numbers are concrete, `state.derives`),
    else computed in the program. Draws from `MergeState.key`. rule: with `rescale`, "l1" scales each
    task's tensor back to its L1 norm (mergekit), "inverse" divides each survivor by its own p (the
    paper). A task with density >= 1 is left as it is.
    """
    if rule not in ("inverse", "l1"):
        raise ValueError(f"unknown rescale rule {rule!r}; expected 'inverse' or 'l1'")
    if (density is None) != (epsilon is None):
        raise ValueError("ranked_drop() takes both density and epsilon, or neither (read from the merge state)")
    if density is not None:
        density, epsilon = check_fraction("density", density), float(epsilon)

    def table(state: MergeState):
        if density is not None:
            return rank_probabilities(density, epsilon, state.values.shape)
        if number(state.hparams, "della_probabilities", required=False) is not None:  # the hook's
            return jnp.asarray(number(state.hparams, "della_probabilities"), jnp.float32)
        return rank_probabilities(hyper(state, None, "density"), hyper(state, None, "epsilon"), state.values.shape)

    def drawn(state: MergeState):
        if state.key is None:
            raise ValueError("ranked_drop() needs a PRNG key in MergeState.key")
        x = state.values
        p = ranked_keep_probabilities(jnp.abs(x), table(state))
        mask = row_uniform(state.key, x.shape, state.row0) < p
        return mask, p

    def apply(state: MergeState) -> MergeState:
        x = state.values
        mask, p = drawn(state)
        masked = jnp.where(mask, x, 0.0)
        if rescale and rule == "l1":
            masked = l1_rescaled(x, masked, state.stats)
        elif rescale:
            masked = jnp.where(mask, x / jnp.where(mask, p, 1.0).astype(x.dtype), 0.0)
        return state.replace(values=masked)

    if rescale and rule == "l1":
        apply.row_sums = lambda state: l1_sums(state.values, jnp.where(drawn(state)[0], state.values, 0.0))
    if density is not None:
        return reads(apply, "seed")

    def probabilities(numbers: dict, at: MergeState):  # the host hook: `rank_probabilities` at the stage's shape
        return rank_probabilities(numbers["density"], numbers["epsilon"], at.values.shape)

    return derives(reads(apply, "density", "epsilon", "seed"), "della_probabilities", probabilities)


__all__ = ["L1_FLOOR", "RescaleRule", "Rule", "Scope", "band_counts", "check_fraction", "dare_drop", "dare_factors",
           "l1_rescaled", "l1_sums", "magnitude_band", "magnitude_band_mask", "magnitude_mask", "prune", "prune_by_threshold",
           "prune_counts", "prune_geometry", "random_drop_mask", "rank_probabilities", "ranked_drop",
           "ranked_keep_probabilities", "ranked_width",
           "rescale_l1", "row_uniform"]
