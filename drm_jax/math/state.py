"""The state a merge threads through its stages, and how stages compose.

As optax threads gradients through `GradientTransformation`s, drm_jax threads a `MergeState` through
`MergeTransform`s: pure functions `MergeState -> MergeState` that run on one layer (vmap adds the layer
axis) and compose with `chain`. A `MergeMethod` is one chain for the 2-D weights of a method's linear path
and one for every other leaf; `drm_jax.methods.compose` makes it a method like any registered one.

A state starts in weight space (`values` are the K task deltas). `joint_space` moves it into a shared SVD
basis (`values` become coordinates, `basis` is set); pruning, sign election and the means work in either
space; a mean sets `merged`; `recompose` maps `merged` back to weight space.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence


import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float


@struct.dataclass
class MergeState:
    """Per-layer state of a merge.

    values: (K, ...) per-task values: deltas in weight space, coordinates (K, q, m) in a joint space.
    coefficients: (K,) per-task coefficients lambda_t (docs/methods.md#conventions; default 1).
    key: PRNG key (for DARE's random drop), or None.
    threshold: (K,) externally computed per-task magnitude thresholds (TIES' whole-model trim), or None.
    row_scale: (K, q) divisor turning |coordinates| into the magnitudes pruning compares: S_j (entries of
      Vh, no renormalization) or S_tj (entries of the unit-norm blocks, after `renormalize`). None in
      weight space.
    valid: (q,) rank-cut mask of a joint space, or None.
    basis: (n, q) shared basis U of a joint space, or None.
    merged: the merged values once a mean has run, (q, m) in a joint space, else values.shape[1:].
    hparams: the method's numbers, which stages read when they were built without a fixed number (the way
      optax's `inject_hyperparams` makes numbers state): a NamedTuple the method declares (its traced
      parameters and what the stages' host hooks derive from them, e.g. exact pruning counts), or a dict
      for a composition; see `number` and `hyper`.
    transposed: static; the joint space was built on transposed deltas (DRM-V).
    row0: the leaf row where `values`' rows (their axis 1) start: 0 for a whole leaf, the block's first row
      when a leaf is merged in row blocks (random draws are keyed per row of the leaf).
    stats: None, or, for a row block, the statistics of the whole leaf a stage reads instead of computing
      them from the block (the L1 norms of `drm_jax.math.sparsify.l1_rescaled`; `RowBlocks`).
    """

    values: Float[Array, "K ..."]
    coefficients: Float[Array, " K"]
    key: Array | None = None
    threshold: Float[Array, " K"] | None = None
    row_scale: Float[Array, "K q"] | None = None
    valid: Bool[Array, " q"] | None = None
    basis: Float[Array, "n q"] | None = None
    merged: Float[Array, "..."] | None = None
    hparams: Any = struct.field(default_factory=dict)
    transposed: bool = struct.field(pytree_node=False, default=False)
    row0: Any = 0
    stats: Any = None

    @property
    def num_tasks(self) -> int:
        return self.values.shape[0]

    @property
    def in_joint_space(self) -> bool:
        return self.basis is not None


MergeTransform = Callable[[MergeState], MergeState]


def reads(transform: MergeTransform, *names: str) -> MergeTransform:
    """Declare the traced numbers a stage reads from `MergeState.hparams` (or, for "seed", its key).

    Each stage built without a fixed number calls this next to its definition, so a composition's
    parameters are derived from its chains (`stage_reads`): a `MergeMethod` then takes exactly those as
    traced parameters of the method (drm_jax.methods.compose). Returns the transform itself.
    """
    transform.reads = tuple(names)
    return transform


def stage_reads(transform: MergeTransform) -> tuple[str, ...]:
    """The numbers a transform (a stage or a chain of stages) reads, in first-use order."""
    return tuple(getattr(transform, "reads", ()))


def derives(transform: MergeTransform, name: str, hook: Callable) -> MergeTransform:
    """Declare a quantity the stage reads as `name` that is derived on the host from its numbers (pruning's
    exact counts, DARE's factors): `hook(numbers, at)` with the numbers given to the merge (a dict, concrete
    on the host or traced inside the caller's jit) and `at`, the abstract `MergeState` the stage receives
    (shapes and dtypes: `jax.eval_shape` of the stages before it). A method's numbers then carry the
    quantity (`derived_numbers`); where they do not, the stage derives it itself, in the program. Returns
    the transform itself."""
    transform.derived = getattr(transform, "derived", ()) + ((name, hook),)
    return transform


def chain(*transforms: MergeTransform) -> MergeTransform:
    """Apply transforms left to right, like `optax.chain`; the chain reads what its stages read and keeps
    its stages in order (`stages`: the host hooks of `derives` see the state each one receives)."""

    def apply(state: MergeState) -> MergeState:
        return functools.reduce(lambda s, t: t(s), transforms, state)

    apply.stages = tuple(s for t in transforms for s in getattr(t, "stages", (t,)))
    return reads(apply, *dict.fromkeys(n for t in transforms for n in stage_reads(t)))


def stage_derives(transform: MergeTransform) -> tuple[str, ...]:
    """The names of the host-derived quantities a transform's stages read (`derives`), one per stage that
    derives it, in stage order."""
    return tuple(name for s in getattr(transform, "stages", (transform,)) for name, _ in getattr(s, "derived", ()))


def stage_hooks(transform: MergeTransform, probe: MergeState) -> tuple[tuple[str, Callable, MergeState], ...]:
    """(name, hook, the abstract state its stage receives) of each host hook of a transform's stages
    (`derives`). probe: the abstract state the transform receives (`jax.ShapeDtypeStruct` leaves, hparams a
    dict of the traced numbers), carried through the stages before each hook's by `jax.eval_shape`."""
    stages = getattr(transform, "stages", (transform,))
    return tuple((name, hook, jax.eval_shape(chain(*stages[:i]), probe))
                 for i, stage in enumerate(stages) for name, hook in getattr(stage, "derived", ()))


def derived_numbers(hooks: Sequence[tuple[str, Callable, MergeState]], numbers: dict) -> dict:
    """{name: hook(numbers, at)} of `stage_hooks` at these numbers."""
    return {name: hook(numbers, at) for name, hook, at in hooks}


class MergeMethod(NamedTuple):
    """A named merge method: how DRM linear weights and all other leaves are merged.

    linear: transform applied to 2-D weights selected for DRM (in (out, in) orientation).
    other: transform applied to every other floating leaf (biases, norms, embeddings, N-D leaves).
    global_density: when set, pruning uses per-task thresholds computed over the whole task vector
      (TIES paper) at this density (the default of the method's traced `density`); the engine computes
      them and passes them in `MergeState.threshold`.

    A `MergeMethod` is a method like any registered one (`drm_jax.methods.compose.composed`): its traced
    parameters are the numbers its stages read (`stage_reads`), plus the per-model `coefficients`.
    """

    linear: MergeTransform
    other: MergeTransform
    global_density: float | None = None


def init_state(
    deltas: Float[Array, "K ..."],
    coefficients: Float[Array, " K"] | None = None,
    key: Array | None = None,
    threshold: Float[Array, " K"] | None = None,
    hparams: dict | None = None,
    row0: Any = 0,
    stats: Any = None,
) -> MergeState:
    """A weight-space state for deltas (K, ...); coefficients default to ones. row0, stats: a row block's
    (`MergeState`)."""
    if coefficients is None:
        coefficients = jnp.ones((deltas.shape[0],), deltas.dtype)
    return MergeState(values=deltas, coefficients=jnp.asarray(coefficients, deltas.dtype), key=key,
                      threshold=threshold, hparams={} if hparams is None else hparams, row0=row0, stats=stats)


def merge_deltas(
    transform: MergeTransform,
    deltas: Float[Array, "K ..."],
    coefficients: Float[Array, " K"] | None = None,
    key: Array | None = None,
    threshold: Float[Array, " K"] | None = None,
    hparams: dict | None = None,
) -> Float[Array, "..."]:
    """Run a transform on one layer's deltas (K, ...) and return the merged delta (...)."""
    return merged_of(transform(init_state(deltas, coefficients, key, threshold, hparams)))


def merged_of(state: MergeState) -> Float[Array, "..."]:
    """The merged delta of a finished state (checks that the chain reduced and left the joint space)."""
    if state.merged is None:
        raise ValueError("the merge transform never reduced the tasks: end it with a mean or sum stage")
    if state.in_joint_space:
        raise ValueError("the merge transform left the joint space: end it with `recompose()`")
    return state.merged


def number(numbers, name: str, required: bool = True):
    """The number `name` of a method's numbers: a typed NamedTuple declared by the method (a required field
    it does not declare is an error naming both: producer and reader must agree), or a dict (a stage
    called on its own, outside a method). None where the field is unset or undeclared and not `required`."""
    if isinstance(numbers, dict):
        value = numbers.get(name)
    elif name in getattr(type(numbers), "_fields", ()):
        value = getattr(numbers, name)
    elif required:
        raise ValueError(f"a stage reads {name!r}, which {type(numbers).__name__} does not declare")
    else:
        value = None
    if value is None and required:
        raise ValueError(f"this stage was built without a value for {name!r} and the merge state has none: "
                         f"pass {name} when merging")
    return value


def with_number(numbers, name: str, value):
    """The numbers with `name` replaced (a NamedTuple's `_replace`, a dict's copy)."""
    return {**numbers, name: value} if isinstance(numbers, dict) else numbers._replace(**{name: value})


def hyper(state: MergeState, fixed, name: str):
    """A stage's number: `fixed` where the stage was built with one, else the traced `number(state.hparams, name)`."""
    if fixed is not None:
        return fixed
    return number(state.hparams, name)


def task_sum(values: Array, weights: Array | None = None) -> Array:
    """sum_t w_t values[t] over the leading task axis, written as K - 1 additions of slices.

    Same value as jnp.sum(values, axis=0) (summed in task order); written out because XLA then fuses the
    whole merge into one elementwise pass over the inputs, where a reduction over the stacked task axis
    makes it materialize the stack first (K is static and small).
    """
    terms = [values[t] if weights is None else values[t] * weights[t] for t in range(values.shape[0])]
    return functools.reduce(lambda a, b: a + b, terms)


def broadcast_tasks(x: Float[Array, " K"], like: Array) -> Array:
    """(K,) -> (K, 1, ..., 1) to broadcast against `like` of shape (K, ...)."""
    return x.reshape((-1,) + (1,) * (like.ndim - 1))


__all__ = ["MergeMethod", "MergeState", "MergeTransform", "broadcast_tasks", "chain", "derived_numbers", "derives",
           "hyper", "init_state", "number", "reads", "stage_derives", "stage_hooks", "stage_reads", "with_number",
           "merge_deltas", "merged_of", "task_sum"]
