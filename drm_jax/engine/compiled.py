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
        return b + rule.merge(p, LayerContext(c, key, threshold, hparams))

    merged = jax.vmap(one)(prepared, base, coefficients, keys)
    return merged, _finite_rows(merged, 1)


@functools.partial(jax.jit, static_argnames=("rule", "layout", "check_inputs"))
def prepare_group(rule: LayerRule, layout: Layout, base: tuple, models: tuple, *, check_inputs: bool = True):
    """(base stack (L, ...), prepared state (L, ...), input finite flags (L, K + 1) or None)."""
    b, m = stack_inputs(layout, base, models, layout.compute)
    b, m, finite = _sanitize(b, m, check_inputs)
    return b, _prepare_layers(rule, b, m), finite


@functools.partial(jax.jit, static_argnames=("rule", "layout"))
def merge_layers_jit(rule: LayerRule, layout: Layout, prepared, base, coefficients, keys, threshold, hparams):
    """Merged members (a tuple in their stored layout and dtype) and output finite flags (L,)."""
    merged, finite = _merge_layers(rule, prepared, base, coefficients, keys, threshold, hparams)
    return unstack_outputs(layout, merged), finite


@functools.partial(jax.jit, static_argnames=("rule", "layout", "check_inputs"))
def merge_once(rule: LayerRule, layout: Layout, base: tuple, models: tuple, coefficients, keys, threshold, hparams,
               *, check_inputs: bool = True):
    """prepare then merge in one program (methods with no group-level step between the two): an
    elementwise merge is one fused pass over the inputs. Returns (members, output flags, input flags)."""
    b, m = stack_inputs(layout, base, models, layout.compute)
    b, m, finite_in = _sanitize(b, m, check_inputs)
    merged, finite = _merge_layers(rule, _prepare_layers(rule, b, m), b, coefficients, keys, threshold, hparams)
    return unstack_outputs(layout, merged), finite, finite_in


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


__all__ = ["Layout", "is_traced", "merge_layers", "merge_layers_jit", "merge_once", "merge_transform_jit",
           "prepare_group", "stack_inputs", "unstack_outputs"]
