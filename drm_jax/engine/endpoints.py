"""Where a merge reads and where it writes: the `Source` of leaves and the sinks of merged leaves.

A `Source` reads leaf i of the base and of model t on demand: the leaves of trees in memory
(`drm_jax.prepare`), or the checkpoint readers of `engine/sources.py` (`merge_leaves`). A sink receives
each merged leaf once, by index: `TreeSink` puts it back into the base's structure in memory (the tree
`Prepared.merge` returns), `CallbackSink` hands it to a callback (the command line's checkpoint writer,
`io/writer.py`). `streamed_thresholds` is the whole-model trim's statistics pass over a source, with one
tensor in memory at a time.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.engine.plan import Plan
from drm_jax.engine.tree import like_leaf, unflatten
from drm_jax.errors import MergeInputError, clip, quote
from drm_jax.math.select import kth_magnitude_per_task, whole_model_ranks
from drm_jax.methods.base import MethodSpec


class Source(NamedTuple):
    """Where the planner reads leaves: get_base(i) and get_model(t, i) return leaf i of the base and of
    model t (arrays in their stored layout and dtype). In memory: the trees' leaves; on disk: readers."""

    get_base: Callable[[int], Any]
    get_model: Callable[[int, int], Any]
    # leaf i's per-leaf data (`MethodSpec.leaf_data`): one (K, ...) array per entry, for the linear role
    get_data: Callable[[int], tuple] | None = None


class Sink(Protocol):
    """Receives merged leaf i (in its stored layout and dtype) once per merge."""

    def put(self, i: int, leaf: Any) -> None: ...


class TreeSink:
    """The in-memory tree: the base's leaves, each merged leaf put in its place (`result`)."""

    def __init__(self, flat):
        self._flat, self._out = flat, list(flat.leaves)  # leaves that are not merged: the base's own

    def put(self, i: int, leaf: Any) -> None:
        self._out[i] = like_leaf(leaf, self._flat.leaves[i])

    def result(self) -> Any:
        return unflatten(self._flat, self._out)


class CallbackSink(NamedTuple):
    """A callback `put(i, array)`: the command line's checkpoint writer, `merge_leaves`' caller."""

    put: Callable[[int, Any], None]


def split_leaf_data(spec: MethodSpec, keywords: dict) -> tuple[dict, dict]:
    """(the method's per-leaf data keywords (`MethodSpec.leaf_data`), the other keywords)."""
    names = {d.name for d in spec.leaf_data}
    return {k: v for k, v in keywords.items() if k in names}, {k: v for k, v in keywords.items() if k not in names}


def leaf_data_reader(spec: MethodSpec, given: dict, names: Sequence[str], chunks_: Sequence, k: int):
    """`Source.get_data` for a method that reads per-leaf data, from its keywords (each a list of K dicts
    {leaf name: array}), checked against the planned leaves: every name a leaf of the linear role, one
    dict per model with the same names, arrays of `LeafData.shape`. A linear leaf no dict names gets
    `LeafData.missing`. None for a method without leaf data. MergeInputError naming what is wrong."""
    if not spec.leaf_data:
        return None
    linear = {names[i]: c.group.shape for c in chunks_ if c.group.role == "matrix" for i in c.members}
    tables = []
    for entry in spec.leaf_data:
        what = f"method {spec.name!r}: {entry.name}"
        dicts = given.get(entry.name)
        if dicts is None:
            raise MergeInputError(f"{what} is required: {entry.doc}")
        if isinstance(dicts, dict) or not isinstance(dicts, (list, tuple)) or len(dicts) != k or \
                not all(isinstance(d, dict) for d in dicts):
            raise MergeInputError(f"{what} must be a list of {k} dicts (one per model) {{leaf name: array}}, got "
                                  f"{quote(dicts)}")
        keys = set(dicts[0])
        for t, d in enumerate(dicts[1:], 1):
            if set(d) != keys:
                raise MergeInputError(f"{what}[{t}] names {clip(sorted(set(d) ^ keys)[0])!r}, which {entry.name}[0] "
                                      f"does not (or the reverse): every model's dict names the same leaves")
        table = {}
        for name in sorted(keys):
            if name not in linear:
                raise MergeInputError(f"{what} names {clip(name)!r}, which is not a 2-D weight of the merge's "
                                      f"linear role (leaves: include / exclude)")
            want = entry.shape(linear[name])
            rows = [np.asarray(d[name], np.float32) for d in dicts]
            for t, row in enumerate(rows):
                if row.shape != want:
                    raise MergeInputError(f"{what}[{t}][{clip(name)!r}] has shape {row.shape}, expected {want}")
                if not np.all(np.isfinite(row)):
                    raise MergeInputError(f"{what}[{t}][{clip(name)!r}] contains NaN or Inf")
            table[name] = np.stack(rows)
        tables.append(table)

    def get_data(i: int) -> tuple:
        shape = linear[names[i]]
        return tuple(table[names[i]] if names[i] in table else np.stack([entry.missing(shape)] * k)
                     for entry, table in zip(spec.leaf_data, tables))

    return get_data


# Bins of the first statistics pass: a magnitude's float bits shifted right by the width less this many
# bits (sign, exponent and the leading mantissa bits; 2**19 bins below +inf for float32 and float64).
_HIST_BITS = 20


def _computed(x, dtype: np.dtype, round_to: str | None) -> np.ndarray:
    """A stored leaf as the merge's programs compute with it (`compiled.stack_inputs`): cast to the compute
    dtype, rounded through `round_to` where set, non-finite entries 0 (the merge then reports them)."""
    x = np.asarray(x).astype(dtype, copy=False)
    if round_to is not None:  # NumPy's cast rounds to nearest, ties to even, as `round_to_dtype`
        x = x.astype(jnp.dtype(round_to)).astype(dtype)
    return x if np.all(np.isfinite(x)) else np.where(np.isfinite(x), x, 0)


def _task_bits(source: Source, chunk, i: int, k: int, wide: bool):
    """(t, the float bits of |model_t - base| of leaf i, flat) for each task t, computed in the chunk's
    dtype as the in-memory deltas are, then float64 where any chunk computes in float64 (`wide`: exact,
    as `kth_smallest_per_task` widens); the base read once. Bits of non-negative floats order as the
    floats do."""
    dtype, round_to = np.dtype(chunk.layout.compute), chunk.layout.round_to
    base = _computed(source.get_base(i), dtype, round_to)
    for t in range(k):
        magnitude = np.abs(_computed(source.get_model(t, i), dtype, round_to) - base).reshape(-1)
        yield t, magnitude.astype(np.float64 if wide else np.float32, copy=False).view(np.int64 if wide else np.int32)


def streamed_thresholds(source: Source, plan: Plan, density: np.ndarray) -> jax.Array:
    """The whole-model thresholds of `math.select.whole_model_thresholds`, exact in the merge's compute
    dtype (float64 where a chunk computes in float64), with one tensor in memory at a time, over the merged
    leaves of `plan` read from `source`.

    Two statistics passes over the inputs: a histogram of the magnitudes' float bits (2**19 bins per task:
    the bisection's first halvings at once) finds the bin holding each task's k-th smallest magnitude; the
    second pass keeps only the magnitudes in that bin, and `math.select`'s bisection finds among them the
    exact threshold. Then the merge itself streams.
    """
    k = plan.num_models
    wide = any(c.layout.compute == "float64" for c in plan.chunks)
    float_type, int_type = (np.float64, np.int64) if wide else (np.float32, np.int32)
    d = sum(int(np.prod(c.group.shape)) * len(c.members) for c in plan.chunks)  # from the plan: no read
    target, nothing = (np.asarray(x) for x in whole_model_ranks(d, density))  # (K,) ranks >= 1
    if d == 0:
        return jnp.zeros((k,), jnp.float32)
    shift = 8 * np.dtype(int_type).itemsize - _HIST_BITS
    bins = int(np.array(np.inf, float_type).view(int_type)) >> shift
    hist = np.zeros((k, bins + 1), np.int64)
    for c in plan.chunks:
        for i in c.members:
            for t, bits in _task_bits(source, c, i, k, wide):
                hist[t] += np.bincount(bits >> shift, minlength=bins + 1)
    cum = np.cumsum(hist, axis=1)
    chosen = np.array([int(np.searchsorted(cum[t], target[t])) for t in range(k)])
    below = np.array([cum[t, chosen[t] - 1] if chosen[t] > 0 else 0 for t in range(k)])
    inside: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c in plan.chunks:
        for i in c.members:
            for t, bits in _task_bits(source, c, i, k, wide):
                inside[t].append(bits[(bits >> shift) == chosen[t]])
    # each task's candidates in one row, padded with its largest (the rank stays among the candidates) to a
    # power of two: few shapes, few programs
    rows = [np.concatenate(bits).view(float_type) for bits in inside]
    width = 1 << int(max(len(r) for r in rows) - 1).bit_length()
    stack = np.stack([np.pad(r, (0, width - len(r)), constant_values=r.max()) for r in rows])
    kth = kth_magnitude_per_task((jnp.asarray(stack),), jnp.asarray((target - below).astype(np.int32)))
    return jnp.where(jnp.asarray(nothing), 0.0, kth)


__all__ = ["CallbackSink", "Sink", "Source", "TreeSink", "leaf_data_reader", "split_leaf_data",
           "streamed_thresholds"]
