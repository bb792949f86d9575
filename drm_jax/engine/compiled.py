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

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from drm_jax.math.state import MergeTransform, merge_deltas
from drm_jax.math.task_vectors import task_vectors
from drm_jax.methods.base import LayerContext, LayerRule


class Layout(NamedTuple):
    """Static facts of a group's members: stored (in, out) (transpose to (out, in)), and output dtypes."""

    transposed: tuple[bool, ...]
    dtypes: tuple[str, ...]
    compute: str = "float32"


def _finite_rows(x: Array, lead: int) -> Array:
    """all(isfinite) over every axis after the first `lead` ones."""
    return jnp.all(jnp.isfinite(x), axis=tuple(range(lead, x.ndim)))


def _canonical(x, transposed: bool, dtype):
    x = jnp.asarray(x).astype(dtype)
    return x.T if transposed else x


def stack_inputs(layout: Layout, base: tuple, models: tuple, dtype) -> tuple[Array, Array]:
    """(base (L, ...), models (L, K, ...)) in (out, in) orientation and the compute dtype."""
    b = jnp.stack([_canonical(x, t, dtype) for x, t in zip(base, layout.transposed)])
    m = jnp.stack([jnp.stack([_canonical(x, t, dtype) for x in row]) for row, t in zip(models, layout.transposed)])
    return b, m


def unstack_outputs(layout: Layout, merged: Array) -> tuple[Array, ...]:
    """Per member: back to its stored layout and dtype."""
    return tuple((merged[i].T if t else merged[i]).astype(d)
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


def _merge_layers(rule: LayerRule, prepared, base, coefficients, keys, threshold, hparams):
    def one(p, b, c, key):
        return b + rule.merge(p, LayerContext(c, key, threshold, hparams, b))

    return jax.vmap(one)(prepared, base, coefficients, keys)


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


@functools.partial(jax.jit, static_argnames=("rule", "layout"))
def merge_layers_jit(rule: LayerRule, layout: Layout, prepared, base, coefficients, keys, threshold, hparams):
    """Merged members (a tuple in their stored layout and dtype); check them with `finite_flags`."""
    return unstack_outputs(layout, _merge_layers(rule, prepared, base, coefficients, keys, threshold, hparams))


@functools.partial(jax.jit, static_argnames=("rule",))
def merge_deltas_jit(rule: LayerRule, prepared, coefficients, keys, threshold, hparams, base=None):
    """The merged deltas (L, ...) of a prepared chunk, in (out, in) orientation and the compute dtype."""
    def one(p, c, key, b):
        return rule.merge(p, LayerContext(c, key, threshold, hparams, b))

    return jax.vmap(one, in_axes=(0, 0, 0, None if base is None else 0))(prepared, coefficients, keys, base)


@functools.partial(jax.jit, static_argnames=("layout",))
def combine_jit(layout: Layout, base, deltas, scale):
    """base + scale * delta per member, in its stored layout and dtype (the last stage of `merge`)."""
    return unstack_outputs(layout, base + jnp.asarray(scale, deltas.dtype) * deltas)


@functools.partial(jax.jit, static_argnames=("rule", "layout", "check_inputs"))
def merge_once(rule: LayerRule, layout: Layout, base: tuple, models: tuple, coefficients, keys, threshold, hparams,
               *, check_inputs: bool = True):
    """Merge the members of a rule that prepares nothing (the elementwise family, TIES, DARE) in one
    program, straight from their stored arrays. Returns (members, input flags (L, K + 1) or None).

    Each member is merged on its own (L is static: the program has one fused kernel per member, no
    loop): the K inputs of a member are stacked and sliced back by the task sums, which XLA folds away,
    so an elementwise merge reads each input once and writes each output once. (Stacking the members on a
    layer axis first, as the vmapped programs do, would make XLA write the whole (L, K, ...) stack.)
    """
    merged, flags = [], []
    for r, transposed in enumerate(layout.transposed):
        b = _canonical(base[r], transposed, layout.compute)
        ms = [_canonical(x, transposed, layout.compute) for x in models[r]]
        if check_inputs:
            flags.append(jnp.stack([jnp.all(jnp.isfinite(x)) for x in [b] + ms]))
            b, ms = (jnp.where(jnp.isfinite(x), x, 0.0) for x in [b]), [jnp.where(jnp.isfinite(x), x, 0.0) for x in ms]
            b = next(b)
        # each task's delta on its own, then stacked: the task sums' slices of the stack fold back to them
        deltas = jnp.stack([x - b for x in ms])
        delta = rule.merge(deltas, LayerContext(coefficients[r], keys[r], threshold, hparams, b))
        merged.append((b + delta).T if transposed else b + delta)
    outputs = tuple(x.astype(d) for x, d in zip(merged, layout.dtypes))
    return outputs, (jnp.stack(flags) if check_inputs else None)


# -- the first design's one-shot transforms (a `MergeMethod` of `MergeTransform`s) ----------------------
def merge_layers(
    transform: MergeTransform,
    base: Float[Array, "L ..."],
    models: Float[Array, "L K ..."],
    coefficients: Float[Array, " K"],
    keys: Array,
    threshold: Float[Array, " K"] | None,
    hparams: dict | None = None,
) -> tuple[Float[Array, "L ..."], Bool[Array, "L K1"]]:
    """Merge a stack of L layers with a one-shot transform; also report which inputs were finite.

    Returns (merged (L, ...), finite (L, K + 1): column 0 the base, 1..K the models). Non-finite inputs
    are replaced by zeros before the merge so that no LAPACK routine ever sees a NaN; the caller raises on
    the flags before returning anything. The layers are vmapped: one batched program, no loop.
    """
    base, models, finite = _sanitize(base, models, True)

    def one_layer(b, ms, key):
        return b + merge_deltas(transform, task_vectors(b, ms), coefficients, key, threshold, hparams)

    return jax.vmap(one_layer)(base, models, keys), finite


merge_transform_jit = jax.jit(merge_layers, static_argnums=(0,))


def is_traced(*values: Any) -> bool:
    """Whether any leaf of the values is a tracer (a merge inside the caller's jit or grad)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(values))


__all__ = ["Layout", "combine_jit", "finite_flags", "merge_deltas_jit", "is_traced", "merge_layers", "merge_layers_jit", "merge_once", "merge_transform_jit",
           "prepare_group", "stack_inputs", "unstack_outputs"]
