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


# Float bits of a magnitude, shifted: 2**19 bins per task for the first pass of the streamed threshold.
_HIST_SHIFT = 12


def _task_bits(source: Source, i: int, k: int):
    """(t, the float bits of |model_t - base| of leaf i, flat) for each task t; the base read once."""
    base = np.asarray(source.get_base(i), np.float32)
    for t in range(k):
        yield t, np.abs(np.asarray(source.get_model(t, i), np.float32) - base).reshape(-1).view(np.int32)


def streamed_thresholds(source: Source, plan: Plan, density: np.ndarray) -> jax.Array:
    """The whole-model thresholds of `math.select.whole_model_thresholds`, exact, with one tensor in memory
    at a time, over the merged leaves of `plan` read from `source`.

    Two statistics passes over the inputs: a histogram of the magnitudes' float bits (2**19 bins per task)
    finds the bin holding each task's k-th smallest magnitude; the second pass keeps only the magnitudes
    in that bin, whose k'-th smallest is the exact threshold. Then the merge itself streams.
    """
    k = plan.num_models
    members = plan.leaves()
    d = sum(int(np.prod(c.group.shape)) * len(c.members) for c in plan.chunks)  # from the plan: no read
    kth = d - np.floor(d * density).astype(np.int64)  # (K,)
    if d == 0:
        return jnp.zeros((k,), jnp.float32)
    bins = (0x7F800000 >> _HIST_SHIFT) + 1
    hist = np.zeros((k, bins), np.int64)
    for i in members:
        for t, bits in _task_bits(source, i, k):
            hist[t] += np.bincount(bits >> _HIST_SHIFT, minlength=bins)
    cum = np.cumsum(hist, axis=1)
    target = np.maximum(kth, 1)
    chosen = np.array([int(np.searchsorted(cum[t], target[t])) for t in range(k)])
    below = np.array([cum[t, chosen[t] - 1] if chosen[t] > 0 else 0 for t in range(k)])
    inside: list[list[np.ndarray]] = [[] for _ in range(k)]
    for i in members:
        for t, bits in _task_bits(source, i, k):
            inside[t].append(bits[(bits >> _HIST_SHIFT) == chosen[t]])
    out = np.zeros(k, np.float32)
    for t in range(k):
        if kth[t] <= 0:
            continue  # nothing to trim: keep everything
        values = np.concatenate(inside[t])
        out[t] = np.partition(values, target[t] - below[t] - 1)[target[t] - below[t] - 1].view(np.float32)
    return jnp.asarray(out)


__all__ = ["CallbackSink", "Sink", "Source", "TreeSink", "leaf_data_reader", "split_leaf_data",
           "streamed_thresholds"]
