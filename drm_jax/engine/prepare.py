"""`drm_jax.prepare`: prepare once, merge many.

`prepare(base, models, method=..., **structural_params)` checks the trees, gives every leaf a role,
stacks same-shaped leaves of a role into groups (cut into chunks under a memory budget) and runs each
method's `prepare` over them: the work that does not depend on the numeric hyperparameters (for DRM the
joint decompositions, truncated to one rank bucket per group). `Prepared.merge(drop_rate=...,
lambda_=..., coefficients=..., density=...)` then runs only the traced part, vmapped over layers, and
returns a tree in the base's structure: a sweep is a loop over `merge` and compiles nothing new.

`merge` is differentiable in its coefficients (shape (K,), or (K, num_layers) for one coefficient per
model and merged leaf, in the order of `Prepared.layer_names`): under `jax.grad` the host-side checks are
skipped and the result is the tree of traced arrays. For the masked methods the gradient is the
derivative at fixed masks.

Methods whose rules prepare nothing (the elementwise ones) keep references to the input leaves and run
one fused program per chunk at each merge: their deltas are never stored.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.engine import roles as roles_lib
from drm_jax.engine import shard
from drm_jax.engine.compiled import (Layout, combine_jit, finite_flags, is_traced, merge_deltas_jit, merge_layers_jit,
                                     merge_once, prepare_group, under_trace)
from drm_jax.engine.stack import Group, chunk_length, chunks, group_leaves
from drm_jax.engine.tree import align_models, flatten, host_array, like_leaf, model_label, tree_list, unflatten
from drm_jax.errors import MergeInputError, quote
from drm_jax.math.state import number, with_number
from drm_jax.methods.base import MethodSpec, Rules, clip, per_model_values
from drm_jax.engine.options import DEFAULT_GROUP_BYTES, MergeOptions, method_params, split_keywords
from drm_jax.methods.registry import method_spec, split_params, static_values, traced_values

@functools.lru_cache(maxsize=128)
def _rules(build, static: tuple) -> Rules:
    # Same build and static parameters -> the same rule objects -> jax.jit's caches hit across prepare/merge
    # calls (a method with bound parameters, `drm_jax.drm(...)`, shares its method's build).
    return build(dict(static))


def rules_for(spec: MethodSpec, static: dict, round_to: str | None = None) -> Rules:
    """The method's rules for its static parameters and the engine's (`MethodSpec.engine_params`): `round_to`
    (a half dtype, mergekit's `dtype`) reaches `build` for the methods that declare it (their stages round
    where mergekit's arithmetic does); the others round only their inputs and outputs (`Layout.round_to`)."""
    engine = {p.name: None for p in spec.engine_params}
    if "round_to" in engine:
        engine["round_to"] = round_to
    return _rules(spec.build, tuple(sorted({**static, **engine}.items())))


# mergekit's `dtype` (inputs are cast to it before merging) -> (the engine's compute dtype, rounding dtype)
_COMPUTE_DTYPES = {"float32": ("float32", None), "float64": ("float64", None),
                   "float16": ("float32", "float16"), "bfloat16": ("float32", "bfloat16")}


def resolve_compute_dtype(name: str | None) -> tuple[str | None, str | None]:
    """(compute dtype or None for each leaf's own, round_to or None) of a `compute_dtype` argument.

    float16 / bfloat16: every input is rounded to it, the arithmetic runs in float32 with the method's
    stages rounding where mergekit's arithmetic in that dtype rounds, and the outputs are rounded to it.
    float64 needs jax_enable_x64 (else float32)."""
    if name is None:
        return None, None
    if name not in _COMPUTE_DTYPES:
        raise MergeInputError(f"compute_dtype must be one of {sorted(_COMPUTE_DTYPES)} or None, got {quote(name)}")
    compute, round_to = _COMPUTE_DTYPES[name]
    if compute == "float64" and not jax.config.jax_enable_x64:
        compute = "float32"
    return compute, round_to


def leaf_key(seed: int, name: str) -> jax.Array:
    """PRNG key of one leaf: the seed folded with a stable hash of its name (independent of grouping)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def compute_dtype(dtype) -> str:
    """float32, or float64 for float64 leaves when jax_enable_x64 is on."""
    if np.dtype(dtype) == np.float64 and jax.config.jax_enable_x64:
        return "float64"
    return "float32"


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def coefficient_matrix(coefficients, k: int, num_layers: int):
    """(num_layers, K) coefficients from None (ones), (K,) or (K, num_layers).

    Concrete values stay on the host (numpy: no small device program per shape); traced ones pass through.
    """
    if is_traced(coefficients):
        c = jnp.asarray(coefficients)
        return jnp.broadcast_to(c[None, :], (num_layers, k)) if c.ndim == 1 else c.T
    if coefficients is None:
        return np.ones((num_layers, k), np.float32)
    c = np.asarray(coefficients, dtype=np.float64)
    if c.ndim == 0 or c.shape[0] != k:
        raise MergeInputError(f"{c.shape[0] if c.ndim else 'a scalar as'} coefficients given for {k} models")
    if c.ndim == 2 and c.shape[1] != num_layers:
        raise MergeInputError(f"per-layer coefficients of shape {c.shape}: expected ({k}, {num_layers}), one "
                              f"column per merged leaf (Prepared.layer_names)")
    if c.ndim > 2:
        raise MergeInputError(f"coefficients must have shape ({k},) or ({k}, {num_layers}), got {c.shape}")
    if not np.all(np.isfinite(c)):
        raise MergeInputError(f"coefficients must be finite, got {c.tolist()}")
    # float64 where jax_enable_x64 is on (the programs then see float64), else float32, which must hold them
    if not jax.config.jax_enable_x64 and np.any(np.abs(c) > np.finfo(np.float32).max):
        raise MergeInputError(f"coefficients: {float(c.flat[np.argmax(np.abs(c))]):g} is beyond float32's range "
                              f"(|x| <= {float(np.finfo(np.float32).max):.4g}), in which the merge computes "
                              f"(jax_enable_x64 is off)")
    c = c.astype(np.float64 if jax.config.jax_enable_x64 else np.float32)
    return np.broadcast_to(c[None, :], (num_layers, k)) if c.ndim == 1 else np.ascontiguousarray(c.T)


@dataclass
class Chunk:
    """Members of one call: leaf indices, their static layout, keys; once prepared, the stacked base and
    the method's prepared state (both with a leading layer axis of the chunk's padded length)."""

    group: Group
    members: list[int]
    layout: Layout
    keys: jax.Array
    base: Any = None
    state: Any = None
    layer_rows: Any = None  # positions of the members in Prepared.layer_names
    length: int = 0  # the padded length of a chunk split over a mesh
    delta: Any = None  # the unscaled merged delta of the last numbers (see Prepared._merge_cached)
    delta_key: Any = None


def _hashable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    array = np.asarray(value)
    return (array.shape, array.dtype.str, array.tobytes())


def to_device(x):
    """A host array as a device array: zero-copy on CPU where numpy's buffer is 64-byte aligned, one copy
    otherwise (device_put copies several times faster than the implicit conversion of a jit argument)."""
    return jax.device_put(x) if isinstance(x, np.ndarray) else x


def raise_non_finite_inputs(finite: np.ndarray, names: Sequence[str]) -> None:
    bad = np.argwhere(~finite)
    if bad.size:
        layer, column = bad[0]
        who = model_label(None if column == 0 else int(column) - 1)
        raise MergeInputError(f"leaf {names[layer]!r} of {who} contains NaN or Inf")


def raise_non_finite_outputs(finite: np.ndarray, names: Sequence[str]) -> None:
    bad = np.flatnonzero(~finite)
    if bad.size:
        raise MergeInputError(f"leaf {names[bad[0]]!r}: the merged value overflows (Inf or NaN) although every "
                              f"input is finite; lower the coefficients or lambda")


class Source(NamedTuple):
    """Where the planner reads leaves: get_base(i) and get_model(t, i) return leaf i of the base and of
    model t (arrays in their stored layout and dtype). In memory: the trees' leaves; on disk: readers."""

    get_base: Callable[[int], Any]
    get_model: Callable[[int, int], Any]
    # leaf i's per-leaf data (`MethodSpec.leaf_data`): one (K, ...) array per entry, for the linear role
    get_data: Callable[[int], tuple] | None = None


def split_leaf_data(spec: MethodSpec, keywords: dict) -> tuple[dict, dict]:
    """(the method's per-leaf data keywords (`MethodSpec.leaf_data`), the other keywords)."""
    names = {d.name for d in spec.leaf_data}
    return {k: v for k, v in keywords.items() if k in names}, {k: v for k, v in keywords.items() if k not in names}


def leaf_data_reader(spec: MethodSpec, given: dict, names: Sequence[str], chunks_: Sequence["Chunk"], k: int):
    """`Source.get_data` for a method that reads per-leaf data, from its keywords (each a list of K dicts
    {leaf name: array}), checked against the planned leaves: every name a leaf of the linear role, one
    dict per model with the same names, arrays of `LeafData.shape`. A linear leaf no dict names gets
    `LeafData.missing`. None for a method without leaf data. MergeInputError naming what is wrong."""
    if not spec.leaf_data:
        return None
    linear = {names[i]: c.group.shape for c in chunks_ if c.group.role == "linear" for i in c.members}
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


class Prepared:
    """The merge planner's state: call `merge(**hyperparameters)` as often as needed.

    One planner serves two sinks: `merge` puts results in a tree in memory (`drm_jax.merge`,
    `drm_jax.prepare`), `run(..., put=...)` hands each merged leaf to a callback (the command line's
    on-disk writer). With `store=False` (streaming) nothing is kept between chunks: each chunk is read,
    prepared, merged and handed over before the next is read.

    Attributes:
      method: the method's registry name. static: its static parameters. defaults: the traced values
        given to `prepare` (they apply to every `merge` that does not override them).
      layer_names: the merged leaves (DRM linear weights and other leaves), in leaf order: the columns
        of per-layer coefficients.
      num_models: K.
    """

    # Whether inputs and merged leaves are checked for Inf/NaN here; a source and sink that check each
    # tensor themselves (the command line's slabs, whose leaves hold pieces of several tensors) turn it off
    # so that the error names the tensor.
    check_finite = True

    def __init__(self, spec: MethodSpec, static: dict, defaults: dict, rules: Rules, names: Sequence[str],
                 source: Source, num_models: int, chunks_: list[Chunk], *, flat=None, mesh=None, store=True,
                 traced_inputs: bool = False):
        self.spec, self.method, self.static, self.defaults, self.rules = spec, spec.name, static, defaults, rules
        self.names, self._source, self._flat = list(names), source, flat
        self._chunks, self.mesh, self.store = chunks_, mesh, store
        self.num_models = num_models
        problem = spec.count_problem(num_models)
        if problem is not None:
            raise MergeInputError(problem)
        self.layer_names = [self.names[i] for c in chunks_ for i in c.members]
        start = 0
        for c in chunks_:
            c.layer_rows = np.arange(start, start + len(c.members))
            start += len(c.members)
        self.fused = all(r.prepare is None and r.shrink is None for r in (rules.linear, rules.other)) and \
            mesh is None and not spec.leaf_data
        # inputs traced by the caller's jax.jit / vmap / grad: only a fused merge reads no host value of them
        self.traced_inputs = traced_inputs
        if traced_inputs and not self.fused:
            why = "a mesh splits its layers" if mesh is not None else "its preparation reads concrete values"
            raise MergeInputError(f"method {spec.name!r} prepares on the host ({why}), so it cannot merge traced "
                                  f"models inside jax.jit: call drm_jax.prepare(base, models, ...) outside the jit "
                                  f"and prepared.merge(...) inside it")
        if store and not self.fused:
            for c in chunks_:
                self._prepare_chunk(c)

    # -- the traced part -----------------------------------------------------------------------------
    def merge(self, coefficients=None, leaf_params=None, **hyperparameters) -> Any:
        """The merged tree for these numbers (any traced parameter of the method; see `drm-jax methods`).

        coefficients: (K,) or (K, num_layers); default: the ones given to `prepare`, else all 1.
        leaf_params: {leaf name: {traced parameter: value}}, values that replace the others for that leaf
          (mergekit's gradients and filter lists; see `run`).
        """
        spec = self.spec
        given = dict(hyperparameters)
        if coefficients is not None:
            given["coefficients"] = coefficients
        static, traced = split_params(spec, method_params(spec, given))
        if static:
            raise MergeInputError(f"{sorted(static)} of method {spec.name!r} are structure: give them to "
                                  f"drm_jax.prepare, not to merge")
        if self._flat is None:
            raise MergeInputError("this plan streams to a sink: call run(put=...)")
        out = list(self._flat.leaves)  # leaves that are not merged: the base's own

        def put(i, leaf):
            out[i] = like_leaf(leaf, self._flat.leaves[i])

        self.run(put, leaf_params=leaf_params, **given)
        return unflatten(self._flat, out)

    def run(self, put: Callable[[int, Any], None], on_chunk: Callable[[Group, int], None] | None = None,
            leaf_params=None, **given) -> None:
        """Merge every chunk and hand each merged leaf to `put(i, array)` (the leaves of the other roles are
        not put: the sink has them from the base). `on_chunk(group, n)` reports progress.

        leaf_params: None, or {leaf name: {parameter: value}} for traced parameters (names or aliases;
        `coefficients` / `weight` a scalar or one per model) that take another value on that leaf. The
        method's per-layer hyperparameters are then computed per member and stacked on the layer axis, so a
        group whose layers have different values is still one vmapped program, and new values (or new
        leaves given values) compile nothing new. Static parameters cannot vary per leaf (MergeInputError).
        """
        static, traced = split_params(self.spec, method_params(self.spec, given))
        if static:
            raise MergeInputError(f"{sorted(static)} of method {self.spec.name!r} are structure: give them to "
                                  f"drm_jax.prepare, not to merge")
        values = traced_values(self.spec, {**self.defaults, **traced})
        coeffs = values.pop("coefficients", None)  # methods without weights (slerp, ...) have none
        if isinstance(coeffs, (int, float)):  # the default: all ones
            coeffs = None
        self._run(coeffs, values, put, on_chunk, self._leaf_values(leaf_params))

    def _leaf_values(self, leaf_params) -> dict[int, dict] | None:
        """leaf_params checked: {leaf index: canonical traced values} (every index of a repeated name)."""
        if leaf_params is None:
            return None
        merged = {i for c in self._chunks for i in c.members}
        where: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            where.setdefault(name, []).append(i)
        out: dict[int, dict] = {}
        for name, given in leaf_params.items():
            if name not in where:
                raise MergeInputError(f"leaf_params: no leaf named {clip(name)!r}")
            indices = [i for i in where[name] if i in merged]
            if not indices:
                raise MergeInputError(f"leaf_params[{clip(name)!r}]: the leaf is not merged (ignored or not "
                                      f"floating), so it takes no parameters")
            if not isinstance(given, dict):
                raise MergeInputError(f"leaf_params[{clip(name)!r}]: must be a mapping of parameters to values, "
                                      f"got {type(given).__name__}")
            static, traced = split_params(self.spec, given,
                                          where=lambda n, leaf=name: f"leaf_params[{clip(leaf)!r}].{n}")
            if static:
                raise MergeInputError(f"leaf_params[{clip(name)!r}].{sorted(static)[0]}: a static (structural) "
                                      f"parameter of method {self.spec.name!r} cannot vary per leaf; give it to "
                                      f"drm_jax.prepare")
            if self.rules.whole_model_trim_param is not None and self.rules.whole_model_trim_param in traced:
                raise MergeInputError(f"leaf_params[{clip(name)!r}].{self.rules.whole_model_trim_param}: the "
                                      f"whole-model trim takes one threshold per task over every leaf, so it "
                                      f"cannot vary per leaf")
            for i in indices:
                out[i] = traced
        return out

    def _hparams(self, chunk: Chunk, values: dict, leaves: dict | None = None, traced_mode: bool = False):
        """(hparams, per_member): the method's per-layer hyperparameters shared by the chunk's layers, or,
        with per-leaf values, one row per member stacked on a leading layer axis."""
        role, shape, k = chunk.group.role, chunk.group.shape, self.num_models
        if leaves is None:
            return self.spec.layer_hparams(values, role, shape, k, self.static), False
        rows = []
        for i in chunk.members:
            own = {n: v for n, v in leaves.get(i, {}).items() if n != "coefficients"}
            rows.append(self.spec.layer_hparams({**values, **own}, role, shape, k, self.static))
        structure = jax.tree.structure(rows[0])
        if any(jax.tree.structure(r) != structure for r in rows[1:]):
            raise MergeInputError(f"leaf_params: method {self.spec.name!r} gives differently structured "
                                  f"hyperparameters to the leaves of one group")
        if traced_mode or is_traced(rows):
            return jax.tree.map(lambda *xs: jnp.stack(xs), *rows), True
        return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *rows), True

    def _leaf_coefficients(self, coeff_rows, leaves: dict | None):
        """The (num_layers, K) coefficient rows with the per-leaf coefficients of `leaves` in their rows."""
        given = {i: v["coefficients"] for i, v in (leaves or {}).items() if "coefficients" in v}
        if not given:
            return coeff_rows
        row_of = {i: int(r) for c in self._chunks for i, r in zip(c.members, c.layer_rows)}
        k = self.num_models
        if is_traced(coeff_rows, list(given.values())):
            out = jnp.asarray(coeff_rows)
            for i, v in given.items():
                out = out.at[row_of[i]].set(jnp.broadcast_to(jnp.asarray(v, out.dtype), (k,)))
            return out
        out = np.array(coeff_rows)
        for i, v in given.items():
            row = np.asarray(per_model_values(v, k, f"leaf_params[{self.names[i]!r}].coefficients"), np.float64)
            if not np.all(np.isfinite(row)):
                raise MergeInputError(f"leaf_params[{clip(self.names[i])!r}].coefficients must be finite, "
                                      f"got {row.tolist()}")
            out[row_of[i]] = row
        return out

    def _thresholds(self, values: dict, traced_mode: bool):
        """Per-task magnitude thresholds over the whole task vector (TIES' model-scope trim)."""
        name = self.rules.whole_model_trim_param
        if name is None:
            return None
        density = per_model_values(values[name], self.num_models, name)
        if not self.store and not traced_mode:
            return streamed_thresholds(self, np.asarray(density, np.float64))
        deltas = []
        for c in self._chunks:
            d = c.state
            if d is None:
                _, d, _ = run_prepare(self._rule(c), c.layout, *self._inputs(c))
            n = len(c.members)
            deltas.append(jnp.swapaxes(d[:n], 0, 1).reshape(self.num_models, -1))
        return whole_model_thresholds(tuple(deltas), jnp.asarray(density, jnp.float32) if traced_mode
                                      else np.asarray(density, np.float64))

    def _rule(self, chunk: Chunk):
        return self.rules.linear if chunk.group.role == "linear" else self.rules.other

    def _inputs(self, chunk: Chunk):
        base = tuple(to_device(self._source.get_base(i)) for i in chunk.members)
        models = tuple(tuple(to_device(self._source.get_model(t, i)) for t in range(self.num_models))
                       for i in chunk.members)
        return base, models

    def _prepare_chunk(self, c: Chunk) -> None:
        rule = self._rule(c)
        names = [self.names[i] for i in c.members]
        if self.mesh is not None:
            c.base, c.state, finite = self._prepare_sharded(rule, c)
            flags = np.ones((len(c.members), self.num_models + 1), bool)
            for r, f in shard.owned_rows(finite):
                if r < len(c.members):
                    flags[r] = np.asarray(f)
            if self.check_finite:
                raise_non_finite_inputs(flags, names)
            return
        base, models = self._inputs(c)
        c.base, c.state, finite = run_prepare(rule, c.layout, base, models, check_inputs=self.check_finite)
        if self.check_finite:
            raise_non_finite_inputs(np.asarray(finite)[: len(c.members)], names)
        if rule.shrink is not None and self.mesh is None:
            c.state = rule.shrink(c.state)
        if self._has_data(c):
            data = [self._source.get_data(i) for i in c.members]
            c.state = (c.state, tuple(jnp.stack(column) for column in zip(*data)))

    def _has_data(self, c: Chunk) -> bool:
        """Whether the chunk's rule reads per-leaf data (`MethodSpec.leaf_data`), stacked with its layers."""
        return bool(self.spec.leaf_data) and c.group.role == "linear"

    def _prepare_sharded(self, rule, c: Chunk):
        """Each process loads only the rows (layers) of its own devices."""
        n, k, shape = len(c.members), self.num_models, c.group.shape

        def canonical(x, r):
            x = np.asarray(jax.device_get(x))
            if c.layout.round_to is not None:  # mergekit's `dtype`: the input as that dtype holds it
                with np.errstate(over="ignore"):  # a value it cannot hold becomes Inf: refused by name, no warning
                    x = x.astype(jnp.dtype(c.layout.round_to))
            x = x.astype(np.float32)
            return x.T if c.layout.transposed[r] else x

        def base_row(r):
            return canonical(self._source.get_base(c.members[r]), r) if r < n else np.zeros(shape, np.float32)

        def model_row(r):
            if r >= n:
                return np.zeros((k,) + tuple(shape), np.float32)
            return np.stack([canonical(self._source.get_model(t, c.members[r]), r) for t in range(k)])

        with x64_scope(rule):
            base, state, finite = shard.prepare_chunk(self.mesh, rule, c.length, shape, k, base_row, model_row,
                                                      sanitize=self.check_finite)
        if self._has_data(c):
            def data_rows(j, entry):
                def row(r):
                    if r < n:
                        return self._source.get_data(c.members[r])[j]
                    return np.stack([entry.missing(shape)] * k)  # padding rows: a solvable merge, discarded
                return row

            state = (state, tuple(shard.stack_from_callback(self.mesh, c.length, (k,) + entry.shape(shape),
                                                            np.float32, data_rows(j, entry))
                                  for j, entry in enumerate(self.spec.leaf_data)))
        return base, state, finite

    def _run(self, coeffs, values: dict, put, on_chunk=None, leaves: dict | None = None) -> None:
        traced_mode = self.traced_inputs or is_traced(coeffs, values, leaves) or under_trace()
        k = self.num_models
        coeff_rows = self._leaf_coefficients(coefficient_matrix(coeffs, k, len(self.layer_names)), leaves)
        threshold = self._thresholds(values, traced_mode)
        for c in self._chunks:
            rule = self._rule(c)
            hparams, per_member = self._hparams(c, values, leaves, traced_mode)
            rows = coeff_rows[c.layer_rows]
            names = [self.names[i] for i in c.members]
            prepared_now = not self.fused and c.state is None
            if prepared_now:
                self._prepare_chunk(c)
            if self.mesh is not None:
                stacked, flags = shard.merge_chunk(self.mesh, rule, c.state, c.base, rows, c.keys, threshold, hparams,
                                                   per_member)
                owned = [(r, x) for r, x in shard.owned_rows(stacked) if r < len(c.members)]
                finite = np.ones(len(c.members), bool)
                for r, f in shard.owned_rows(flags):
                    if r < len(c.members):
                        finite[r] = bool(f)
                members = [c.members[r] for r, _ in owned]
                merged = [(x.T if c.layout.transposed[r] else x).astype(c.layout.round_to or c.layout.dtypes[r])
                          .astype(c.layout.dtypes[r]) for r, x in owned]
                finite_in = None
            elif self.fused:
                merged, finite_in = merge_once(rule, c.layout, *self._inputs(c), rows, c.keys, threshold,
                                               hparams,
                                               check_inputs=self.check_finite and not self.rules.linear_combination,
                                               per_member=per_member)
            elif self.rules.scaled_by is not None and self.store and not traced_mode and not per_member:
                merged = self._merge_cached(c, rule, values, coeffs, rows, threshold, hparams)
                finite_in = None
            else:
                merged = merge_layers_jit(rule, c.layout, c.state, c.base, rows, c.keys, threshold, hparams,
                                          per_member=per_member)
                finite_in = None
            if not traced_mode:
                if finite_in is not None:
                    raise_non_finite_inputs(np.asarray(finite_in), names)
                if self.mesh is None and self.check_finite:
                    finite = finite_flags(tuple(merged))
                if self.check_finite and not np.asarray(finite).all():
                    self._locate_non_finite_input(c, names)
                    self._explain_overflow(c, names, np.asarray(finite))
                    raise_non_finite_outputs(finite, names)
            for i, leaf in zip(members if self.mesh is not None else c.members, merged):
                put(i, leaf)
            if prepared_now:  # streaming: nothing is kept
                c.base = c.state = None
            if on_chunk is not None:
                on_chunk(c.group, len(c.members))

    def _merge_cached(self, c: Chunk, rule, values: dict, coeffs, rows, threshold, hparams):
        """A method whose last stage multiplies by a global scale (`Rules.scaled_by`): the unscaled merged
        delta of the last numbers is kept per chunk, so a sweep over the scale alone (lambda after a drop
        rate) is one elementwise pass per merge instead of pruning, election and recomposition again."""
        scale_name = self.rules.scaled_by
        key = (tuple(sorted((n, _hashable(v)) for n, v in values.items() if n != scale_name)), _hashable(coeffs))
        if c.delta_key != key:
            unscaled = with_number(hparams, scale_name, jnp.ones_like(number(hparams, scale_name)))
            c.delta = merge_deltas_jit(rule, c.state, rows, c.keys, threshold, unscaled, c.base)
            c.delta_key = key
        return combine_jit(c.layout, c.base, c.delta, number(hparams, scale_name))

    def _explain_overflow(self, chunk: Chunk, names: Sequence[str], finite: np.ndarray) -> None:
        """Every input finite, a merged leaf not: say where it overflowed. Raises MergeInputError naming the
        leaf when the method's decomposition (DRM's prepared state) holds Inf/NaN, or when the inputs are so
        large that a sum of their squares (a norm, a Gram matrix, an SVD) can pass the compute dtype's
        largest value; returns otherwise (the coefficients made the merged value overflow)."""
        r = int(np.flatnonzero(~finite)[0])
        base, models = self._inputs(chunk)
        values = [np.asarray(x, np.float64) for x in (base[r], *models[r])]
        largest = max([float(np.max(np.abs(x), initial=0.0)) for x in values]
                      + [float(np.max(np.abs(x - values[0]), initial=0.0)) for x in values[1:]])
        compute = np.dtype(chunk.layout.compute)
        limit = float(np.finfo(compute).max)
        state_finite = True
        if chunk.state is not None and self.mesh is None:
            state_finite = all(bool(np.all(np.isfinite(np.asarray(x[r])))) for x in jax.tree.leaves(chunk.state)
                               if jnp.issubdtype(x.dtype, jnp.inexact))
        if not state_finite:
            raise MergeInputError(f"leaf {names[r]!r}: {self.method}'s decomposition overflowed {compute.name} "
                                  f"(Inf or NaN) although every input is finite: the inputs reach |x| = "
                                  f"{largest:.3g}, too large for its Gram matrices and SVDs in {compute.name}; scale "
                                  f"the inputs down" + ("" if compute == np.float64 else
                                                        ", or decompose in float64 (precision='float64')"))
        if largest * largest * max(values[0].size, 1) > limit:
            raise MergeInputError(f"leaf {names[r]!r}: {self.method} overflowed {compute.name} (Inf or NaN) although "
                                  f"every input is finite: the inputs reach |x| = {largest:.3g}, too large for "
                                  f"{compute.name} arithmetic (their sums, norms or Gram matrices can pass its largest "
                                  f"value {limit:.3g}); scale the inputs down")

    def _locate_non_finite_input(self, chunk: Chunk, names: Sequence[str]) -> None:
        base, models = self._inputs(chunk)
        for r in range(len(chunk.members)):
            flags = [bool(np.all(np.isfinite(np.asarray(base[r]))))]
            flags += [bool(np.all(np.isfinite(np.asarray(m)))) for m in models[r]]
            raise_non_finite_inputs(np.array([flags]), [names[r]])


def _count_at_most(deltas: tuple, bits_threshold):
    """Per task, how many |delta| entries have float bits <= the threshold (K,)."""
    total = 0
    for d in deltas:
        bits = jax.lax.bitcast_convert_type(jnp.abs(d).astype(jnp.float32), jnp.int32)
        total = total + jnp.sum(bits <= bits_threshold[:, None], axis=1, dtype=jnp.int32)
    return total


@jax.jit
def _whole_model_kth(deltas: tuple, k):
    """Per task, the exact k-th smallest |delta| over all given arrays (K, N_i) (bisection on float bits)."""
    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = _count_at_most(deltas, mid) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    kk = deltas[0].shape[0]
    lo, _ = jax.lax.fori_loop(0, 31, body, (jnp.zeros(kk, jnp.int32), jnp.full(kk, 0x7F800000, jnp.int32)))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def whole_model_thresholds(deltas: tuple, density) -> jax.Array:
    """The TIES paper's per-task threshold: keep |delta| >= the k-th smallest, k = d - int(d density),
    over the whole task vector (d entries per task, all merged leaves). deltas: arrays (K, N_i)."""
    d = sum(int(x.shape[1]) for x in deltas)
    if isinstance(density, np.ndarray):
        k = d - np.floor(d * density).astype(np.int64)
        k = jnp.asarray(np.maximum(k, 1).astype(np.int32))
        nothing = jnp.asarray(d - np.floor(d * density) <= 0)
    else:
        k = jnp.maximum(d - jnp.floor(d * density), 1).astype(jnp.int32)
        nothing = d - jnp.floor(d * density) <= 0
    if d == 0:
        return jnp.zeros(k.shape, jnp.float32)
    return jnp.where(nothing, 0.0, _whole_model_kth(deltas, k))


# Float bits of a magnitude, shifted: 2**19 bins per task for the first pass of the streamed threshold.
_HIST_SHIFT = 12


def _magnitude_bits(plan: Prepared, c: Chunk, t: int, i: int) -> np.ndarray:
    base = np.asarray(plan._source.get_base(i), np.float32)
    model = np.asarray(plan._source.get_model(t, i), np.float32)
    return np.abs(model - base).reshape(-1).view(np.int32)


def streamed_thresholds(plan: Prepared, density: np.ndarray) -> jax.Array:
    """The whole-model thresholds of `whole_model_thresholds`, exact, with one tensor in memory at a time.

    Two statistics passes over the inputs: a histogram of the magnitudes' float bits (2**19 bins per task)
    finds the bin holding each task's k-th smallest magnitude; the second pass keeps only the magnitudes
    in that bin, whose k'-th smallest is the exact threshold. Then the merge itself streams.
    """
    k = plan.num_models
    members = [(c, i) for c in plan._chunks for i in c.members]
    d = sum(int(np.prod(np.shape(plan._source.get_base(i)))) for _, i in members) if members else 0
    kth = d - np.floor(d * density).astype(np.int64)  # (K,)
    if d == 0:
        return jnp.zeros((k,), jnp.float32)
    bins = (0x7F800000 >> _HIST_SHIFT) + 1
    hist = np.zeros((k, bins), np.int64)
    for c, i in members:
        for t in range(k):
            hist[t] += np.bincount(_magnitude_bits(plan, c, t, i) >> _HIST_SHIFT, minlength=bins)
    cum = np.cumsum(hist, axis=1)
    target = np.maximum(kth, 1)
    chosen = np.array([int(np.searchsorted(cum[t], target[t])) for t in range(k)])
    below = np.array([cum[t, chosen[t] - 1] if chosen[t] > 0 else 0 for t in range(k)])
    inside: list[list[np.ndarray]] = [[] for _ in range(k)]
    for c, i in members:
        for t in range(k):
            bits = _magnitude_bits(plan, c, t, i)
            inside[t].append(bits[(bits >> _HIST_SHIFT) == chosen[t]])
    out = np.zeros(k, np.float32)
    for t in range(k):
        if kth[t] <= 0:
            continue  # nothing to trim: keep everything
        values = np.concatenate(inside[t])
        out[t] = np.partition(values, target[t] - below[t] - 1)[target[t] - below[t] - 1].view(np.float32)
    return jnp.asarray(out)


def plan_roles(names, shapes, dtypes, options: MergeOptions, every_leaf: bool = False):
    """(each leaf's role, the groups of same-shaped leaves of the merged roles). every_leaf: `names` are all
    the leaves of the merge (not a streamed batch), so a given pattern that matches none of them is refused."""
    rules = roles_lib.RoleRules(include=options.include, exclude=options.exclude, ignore=options.ignore,
                                layout=options.layout)
    if every_leaf:
        rules.check_matched(names)
    leaf_roles = [rules(n, tuple(s), d) for n, s, d in zip(names, shapes, dtypes)]
    canonical = [tuple(s)[::-1] if r.transpose else tuple(s) for r, s in zip(leaf_roles, shapes)]
    groups = [g for g in group_leaves([r.role for r in leaf_roles], canonical) if g.role in ("linear", "other")]
    return leaf_roles, groups


def plan_chunks(groups, leaf_roles, names, dtypes, num_models, seed, options: MergeOptions) -> list[Chunk]:
    """Every group cut into chunks of at most `options.max_group_bytes` of stacked float32 inputs (padded
    to the device count of `options.mesh`), computed in `options.compute_dtype` (`resolve_compute_dtype`)."""
    compute, round_to = resolve_compute_dtype(options.compute_dtype)
    max_group_bytes, mesh = options.max_group_bytes, options.mesh
    out = []
    for group in groups:
        layer_bytes = (num_models + 1) * math.prod(group.shape) * 4
        length = chunk_length(len(group.members), layer_bytes, max_group_bytes)
        if mesh is not None:
            length = shard.padded_length(length, mesh)
        for members in chunks(group.members, length):
            layout = Layout(tuple(leaf_roles[i].transpose for i in members),
                            tuple(_dtype_name(dtypes[i]) for i in members),
                            compute or compute_dtype(dtypes[members[0]]), round_to)
            with jax.ensure_compile_time_eval():  # concrete keys inside the caller's jax.jit too
                keys = np.stack([np.asarray(leaf_key(seed, names[i])) for i in members])
            out.append(Chunk(group, list(members), layout, keys, length=length))
    return out


def plan_trees(base, models, options: MergeOptions, seed: int):
    """Trees checked against each other, roles given and chunks planned: (flat base as given, its leaves as
    arrays JAX reads (`host_array`: torch tensors as NumPy), model leaves likewise in the base's leaf order,
    chunks)."""
    models = tree_list(models)
    if not models:
        raise MergeInputError("no models to merge")
    flat = flatten(base)
    model_leaves = [[host_array(x, n) for n, x in zip(flat.names, leaves)] for leaves in align_models(flat, models)]
    base_leaves = [host_array(x, n) for n, x in zip(flat.names, flat.leaves)]
    shapes = [np.shape(x) for x in base_leaves]
    dtypes = [jnp.result_type(x) for x in base_leaves]
    leaf_roles, groups = plan_roles(flat.names, shapes, dtypes, options, every_leaf=True)
    return flat, base_leaves, model_leaves, plan_chunks(groups, leaf_roles, flat.names, dtypes, len(models), seed,
                                                        options)


def resolve(method, keywords: dict):
    """(spec, every static value, the given traced values) of a method in any form (`method_spec`) and the
    keywords given for it; MergeInputError naming a keyword the method does not take."""
    spec = method_spec(method)
    _, keywords = split_leaf_data(spec, keywords)  # data, not numbers: `leaf_data_reader` reads them
    static, traced = split_params(spec, method_params(spec, keywords))
    return spec, static_values(spec, static), traced


def prepare(base: Any, models: Sequence[Any], method: Any = "drm", *, options: MergeOptions | None = None,
            **keywords: Any) -> Prepared:
    """Check, group and prepare a merge once (see the module docstring); returns a `Prepared`.

    method: a registered name, a `MethodSpec` (`drm_jax.drm(direction="vertical")`) or a `MergeMethod`
    composition. Keywords are `MergeOptions` fields (layout, include, exclude, ignore, max_group_bytes,
    compute_dtype, mesh) or the method's parameters: static ones (its structure, e.g. `direction`,
    `prune_scope`, `trim_scope`, `normalize`, `svd_route`, `precision`, `seed`) are fixed here; traced
    ones (`drop_rate`, `density`, `lambda_`, `rank_rtol`, `coefficients`) may be given here as defaults and
    changed at every `Prepared.merge`. `drm-jax methods` lists which is which. A keyword that is neither
    raises MergeInputError naming it.
    """
    options, keywords = split_keywords(keywords, options)
    spec, static, traced = resolve(method, keywords)
    rules = rules_for(spec, static, resolve_compute_dtype(options.compute_dtype)[1])
    flat, base_leaves, model_leaves, plan = plan_trees(base, models, options, seed=static.get("seed", 0))
    if rules.linear is not rules.other and not any(chunk.group.role == "linear" for chunk in plan):
        warnings.warn(f"method {spec.name}: no leaf went through its decomposition (no 2-D weight outside the "
                      "embeddings and LM heads, or none left by include/exclude); every leaf took its other path",
                      UserWarning, stacklevel=2)
    data = leaf_data_reader(spec, split_leaf_data(spec, keywords)[0], flat.names, plan, len(models))
    source = Source(lambda i: base_leaves[i], lambda t, i: model_leaves[t][i], data)
    return Prepared(spec, static, traced, rules, flat.names, source, len(models), plan, flat=flat, mesh=options.mesh,
                    traced_inputs=is_traced(base_leaves, model_leaves))


def x64_scope(rule):
    """Float64 enabled while a rule that decomposes in float64 is traced and run (its outputs are float32)."""
    return jax.enable_x64(True) if rule.x64 and not jax.config.jax_enable_x64 else contextlib.nullcontext()


def run_prepare(rule, layout: Layout, base: tuple, models: tuple, check_inputs: bool = True):
    """`prepare_group`, in float64 where the rule asks for it."""
    with x64_scope(rule):
        return prepare_group(rule, layout, base, models, check_inputs=check_inputs)


__all__ = ["DEFAULT_GROUP_BYTES", "Chunk", "Prepared", "Source", "coefficient_matrix", "compute_dtype",
           "leaf_data_reader", "leaf_key", "plan_chunks", "plan_roles", "plan_trees", "prepare", "resolve", "resolve_compute_dtype", "rules_for",
           "run_prepare", "split_leaf_data", "streamed_thresholds", "whole_model_thresholds"]
