"""The jitted, vmapped programs that prepare and merge one stacked group of layers.

A group is L same-shaped leaves of one role. Its programs are cached by jax.jit on the static structure
only (the method's rule, the members' layouts and dtypes, shapes): every number (drop rate, lambda,
coefficients, rank cut, DARE's probabilities, pruning counts) is an array input, so a new value never
compiles again. Each program is `jax.vmap` of the per-layer function: batched over layers, no loop.

Inputs are passed as tuples of the members' own arrays (stored layout and dtype) and stacked, transposed
to (out, in) and cast to float32 inside the program, where XLA fuses it with the merge: an elementwise
merge reads each input once and writes each output once. Outputs come back per member, in the member's
layout and dtype.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from drm_jax.buffers import aligned_empty, is_aligned
from drm_jax.math.arrays import is_traced
from drm_jax.math.rounding import round_to_dtype
from drm_jax.math.task_vectors import task_vectors
from drm_jax.methods.base import LayerContext, LayerRule


class Layout(NamedTuple):
    """Static facts of a group's members: stored (in, out) (transpose to (out, in)), and output dtypes.

    compute: the dtype the merge's arithmetic runs in (float32, or float64 under jax_enable_x64).
    round_to: None, or a narrower dtype ("float16", "bfloat16": mergekit's `dtype`) every input is rounded
      to before the merge and every output is rounded to after it (then cast to its stored dtype); the
      method's own stages round where mergekit's arithmetic in that dtype rounds (docs/methods.md#compute-dtype).
    """

    transposed: tuple[bool, ...]
    dtypes: tuple[str, ...]
    compute: str = "float32"
    round_to: str | None = None


def _finite_rows(x: Array, lead: int) -> Array:
    """all(isfinite) over every axis after the first `lead` ones."""
    return jnp.all(jnp.isfinite(x), axis=tuple(range(lead, x.ndim)))


def _canonical(x, transposed: bool, dtype, round_to: str | None = None):
    x = jnp.asarray(x).astype(dtype)
    if round_to is not None:  # mergekit's `dtype`: the input as that dtype holds it
        x = round_to_dtype(x, round_to)
    return x.T if transposed else x


def _rounded(x, round_to: str | None):
    return x if round_to is None else round_to_dtype(x, round_to)


def stack_inputs(layout: Layout, base: tuple, models: tuple, dtype) -> tuple[Array, Array]:
    """(base (L, ...), models (L, K, ...)) in (out, in) orientation and the compute dtype."""
    r = layout.round_to
    b = jnp.stack([_canonical(x, t, dtype, r) for x, t in zip(base, layout.transposed)])
    m = jnp.stack([jnp.stack([_canonical(x, t, dtype, r) for x in row]) for row, t in zip(models, layout.transposed)])
    return b, m


def unstack_outputs(layout: Layout, merged: Array) -> tuple[Array, ...]:
    """Per member: back to its stored layout and dtype (through `Layout.round_to` where set)."""
    return tuple(_rounded(merged[i].T if t else merged[i], layout.round_to).astype(d)
                 for i, (t, d) in enumerate(zip(layout.transposed, layout.dtypes)))


def _sanitize(base, models, check_inputs: bool):
    if not check_inputs:
        return base, models, None
    finite = jnp.concatenate([_finite_rows(base, 1)[:, None], _finite_rows(models, 2)], axis=1)
    return jnp.where(jnp.isfinite(base), base, 0.0), jnp.where(jnp.isfinite(models), models, 0.0), finite


def _prepare_layers(rule: LayerRule, base, models):
    deltas = jax.vmap(task_vectors)(base, models)
    if rule.prepare is None:
        return deltas
    return jax.vmap(rule.prepare)(deltas)


def _merge_layers(rule: LayerRule, prepared, base, coefficients, keys, threshold, hparams, per_member: bool = False):
    """vmap of base + merge over the layers; `per_member`: hparams carry a leading layer axis (one value per
    member, `Prepared.run(leaf_params=...)`), vmapped with the layers instead of shared by them."""
    def one(p, b, c, key, h):
        return b + rule.merge(p, LayerContext(c, key, threshold, h, b))

    return jax.vmap(one, in_axes=(0, 0, 0, 0, 0 if per_member else None))(prepared, base, coefficients, keys, hparams)


def under_trace() -> bool:
    """Whether the caller runs inside a jax.jit trace (its own function jitted around a merge): even a
    constant is a tracer there, so no host value can be read; host checks are skipped."""
    return isinstance(jnp.zeros((), jnp.int8), jax.core.Tracer)


@jax.jit
def _all_finite(x: Array) -> Array:
    return jnp.all(jnp.isfinite(x))


def finite_flags(outputs: tuple) -> np.ndarray:
    """(L,) whether each output is free of Inf/NaN. Programs of their own (one per shape and dtype):
    inside the merge's program XLA would recompute the merge for the check instead of reading its result."""
    flags = [_all_finite(x) for x in outputs]  # dispatched together, then read
    return np.array([bool(f) for f in flags])


@functools.partial(jax.jit, static_argnames=("rule", "layout", "check_inputs"))
def prepare_group(rule: LayerRule, layout: Layout, base: tuple, models: tuple, *, check_inputs: bool = True):
    """(base stack (L, ...), prepared state (L, ...), input finite flags (L, K + 1) or None)."""
    b, m = stack_inputs(layout, base, models, layout.compute)
    b, m, finite = _sanitize(b, m, check_inputs)
    return b, _prepare_layers(rule, b, m), finite


@functools.partial(jax.jit, static_argnames=("rule", "layout", "per_member"))
def merge_layers_jit(rule: LayerRule, layout: Layout, prepared, base, coefficients, keys, threshold, hparams,
                     per_member: bool = False):
    """Merged members (a tuple in their stored layout and dtype); check them with `finite_flags`."""
    return unstack_outputs(layout, _merge_layers(rule, prepared, base, coefficients, keys, threshold, hparams,
                                                 per_member))


@functools.partial(jax.jit, static_argnames=("rule", "per_member"))
def merge_deltas_jit(rule: LayerRule, prepared, coefficients, keys, threshold, hparams, base=None,
                     per_member: bool = False):
    """The merged deltas (L, ...) of a prepared chunk, in (out, in) orientation and the compute dtype."""
    def one(p, c, key, b, h):
        return rule.merge(p, LayerContext(c, key, threshold, h, b))

    return jax.vmap(one, in_axes=(0, 0, 0, None if base is None else 0, 0 if per_member else None))(
        prepared, coefficients, keys, base, hparams)


@functools.partial(jax.jit, static_argnames=("layout",))
def combine_jit(layout: Layout, base, deltas, scale):
    """base + scale * delta per member, in its stored layout and dtype (the last stage of `merge`); scale is
    one number or one per member (L,)."""
    scale = jnp.asarray(scale, deltas.dtype)
    return unstack_outputs(layout, base + scale.reshape(scale.shape + (1,) * (deltas.ndim - scale.ndim)) * deltas)


def member_hparams(hparams, r: int, per_member: bool):
    """Member r's hyperparameters: row r of per-member hparams (leading layer axis), else the shared ones."""
    return jax.tree.map(lambda x: x[r], hparams) if per_member else hparams


# Below this many bytes the copy's cost does not matter either way.
_ALIGN_MIN_BYTES = 1 << 16


def aligned(x):
    """`x` as an array the CPU backend reads in place: a NumPy array that is not 64-byte aligned becomes
    an aligned copy (NumPy's copy, several times faster than the one XLA's CPU client makes when handed a
    misaligned buffer); anything else (JAX arrays, small or aligned arrays, other backends) is returned as
    it is. Every host input reaches the engine's programs through `executors.to_device`, which calls this."""
    if (not isinstance(x, np.ndarray) or x.nbytes < _ALIGN_MIN_BYTES or is_aligned(x)
            or jax.default_backend() != "cpu"):
        return x
    out = aligned_empty(x.nbytes).view(x.dtype).reshape(x.shape)
    np.copyto(out, x)
    return out


# Members merged by one program of `merge_once`: its program is unrolled per member (one fused kernel
# each), so its compile time grows with the members; a chunk is merged in pieces of at most this many
# members, and equal pieces share one program. A first TIES merge of 16 same-shaped layers compiles one
# 4-member program instead of one 16-member program (issue 27).
FUSED_MEMBERS = 4


def fused_pieces(length: int, most: int = FUSED_MEMBERS) -> list[tuple[int, int]]:
    """(start, stop) of the pieces of a chunk of `length` members: as few as hold at most `most` members
    each, of equal size but the last (so that most pieces share a program)."""
    count = -(-length // most)
    size = -(-length // count)
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def _piece_deltas(layout: Layout, r: int, base, models, check_inputs: bool):
    """(base, deltas (K, ...), input flags (K + 1,) or None) of member r in (out, in) orientation, NaN/Inf
    zeroed where checked."""
    transposed = layout.transposed[r]
    b = _canonical(base, transposed, layout.compute, layout.round_to)
    ms = [_canonical(x, transposed, layout.compute, layout.round_to) for x in models]
    flags = None
    if check_inputs:
        flags = jnp.stack([jnp.all(jnp.isfinite(x)) for x in [b] + ms])
        b, ms = jnp.where(jnp.isfinite(b), b, 0.0), [jnp.where(jnp.isfinite(x), x, 0.0) for x in ms]
    # each task's delta on its own, then stacked: the task sums' slices of the stack fold back to them
    return b, jnp.stack([x - b for x in ms]), flags


@functools.partial(jax.jit, static_argnames=("rule", "layout", "check_inputs", "per_member"))
def _merge_piece(rule: LayerRule, layout: Layout, base: tuple, models: tuple, coefficients, keys, threshold, hparams,
                 offset, row0=0, stats=None, *, check_inputs: bool, per_member: bool):
    """Members offset .. offset + len(base) - 1 of a chunk (`merge_once`); coefficients, keys and per-member
    hparams are the whole chunk's, indexed at a traced offset so that every piece of one size shares this
    program. row0, stats: a row block's (`merge_block`)."""
    merged, flags = [], []
    for r, transposed in enumerate(layout.transposed):
        b, deltas, flag = _piece_deltas(layout, r, base[r], models[r], check_inputs)
        flags.append(flag)
        i = offset + r
        delta = rule.merge(deltas, LayerContext(coefficients[i], keys[i], threshold,
                                                member_hparams(hparams, i, per_member), b, row0, stats))
        merged.append((b + delta).T if transposed else b + delta)
    outputs = tuple(_rounded(x, layout.round_to).astype(d) for x, d in zip(merged, layout.dtypes))
    return outputs, (jnp.stack(flags) if check_inputs else None)


@functools.partial(jax.jit, static_argnames=("rule", "layout", "per_member"))
def _block_stats(rule: LayerRule, layout: Layout, base, models: tuple, coefficients, keys, hparams, row0, *,
                 per_member: bool):
    """A row block's statistics (`RowBlocks.stats`) of the chunk's one member, from its inputs with NaN/Inf
    zeroed as the merge zeroes them."""
    b, deltas, _ = _piece_deltas(layout, 0, base, models, True)
    return rule.rows.stats(deltas, LayerContext(coefficients[0], keys[0], None, member_hparams(hparams, 0, per_member),
                                                b, row0))


def block_stats(rule: LayerRule, layout: Layout, base, models: tuple, coefficients, keys, hparams, row0, *,
                per_member: bool):
    """`RowBlocks.stats` of one row block (base (rows, ...), models K such, stored layout) of a one-member
    chunk, as float64 NumPy arrays (the blocks' sums are added on the host); in float64 where the rule's
    `RowBlocks.x64` asks for it."""
    scope = jax.enable_x64(True) if rule.rows.x64 and not jax.config.jax_enable_x64 else contextlib.nullcontext()
    with scope:
        out = _block_stats(rule, layout, base, models, coefficients, keys, hparams, row0, per_member=per_member)
        return jax.tree.map(lambda x: np.asarray(x, np.float64), out)


def merge_block(rule: LayerRule, layout: Layout, base, models: tuple, coefficients, keys, threshold, hparams, row0,
                stats, *, check_inputs: bool, per_member: bool):
    """Rows row0.. of a one-member chunk's leaf (base (rows, ...), models K such, stored layout), merged
    with the whole leaf's statistics `stats` (`RowBlocks`). Returns (merged block, input flags (1, K + 1)
    or None)."""
    merged, flags = _merge_piece(rule, layout, (base,), (tuple(models),), coefficients, keys, threshold, hparams,
                                 np.int32(0), np.uint32(row0), stats, check_inputs=check_inputs,
                                 per_member=per_member)
    return merged[0], flags


def merge_once(rule: LayerRule, layout: Layout, base: tuple, models: tuple, coefficients, keys, threshold, hparams,
               *, check_inputs: bool = True, per_member: bool = False):
    """Merge the members of a rule that prepares nothing (the elementwise family, TIES, DARE) straight from
    their stored arrays. Returns (members, input flags (L, K + 1) or None).

    Each member is merged on its own (no loop: one fused kernel per member), in pieces of at most
    `FUSED_MEMBERS` members per program (`fused_pieces`): the K inputs of a member are stacked and sliced
    back by the task sums, which XLA folds away, so an elementwise merge reads each input once and writes
    each output once. (Stacking the members on a layer axis first, as the vmapped programs do, would make
    XLA write the whole (L, K, ...) stack.)
    """
    outputs, flags = [], []
    for start, stop in fused_pieces(len(layout.transposed)):
        piece = layout._replace(transposed=layout.transposed[start:stop], dtypes=layout.dtypes[start:stop])
        merged, flag = _merge_piece(rule, piece, base[start:stop], models[start:stop], coefficients,
                                    keys, threshold, hparams, np.int32(start), check_inputs=check_inputs,
                                    per_member=per_member)
        outputs.extend(merged)
        flags.append(flag)
    if not check_inputs:
        return tuple(outputs), None
    if len(flags) == 1:
        return tuple(outputs), flags[0]
    if is_traced(flags):  # under the caller's jit
        return tuple(outputs), jnp.concatenate(flags)
    # on the host: every piece was dispatched before any flag is read
    return tuple(outputs), np.concatenate([np.asarray(f) for f in flags])


__all__ = ["Layout", "aligned", "block_stats", "combine_jit", "finite_flags", "is_traced", "merge_deltas_jit", "merge_layers_jit",
           "merge_block", "merge_once", "prepare_group", "under_trace"]
