"""`drm_jax.prepare`: prepare once, merge many.

`prepare(base, models, method=..., **structural_params)` checks the trees and makes the plan
(`engine/plan.py`: every leaf's role, same-shaped leaves of a role stacked into groups, cut into chunks
under a memory budget); the plan's executor (`engine/executors.py`) then runs each method's `prepare`
over the chunks: the work that does not depend on the numeric hyperparameters (for DRM the joint
decompositions, truncated to one rank bucket per group). `Prepared.merge(drop_rate=..., lambda_=...,
coefficients=..., density=...)` then runs only the traced part, vmapped over layers, and returns a tree in
the base's structure (the in-memory sink, `engine/endpoints.py`): a sweep is a loop over `merge` and
compiles nothing new.

`merge` is differentiable in its coefficients (shape (K,), or (K, num_layers) for one coefficient per
model and merged leaf, in the order of `Prepared.layer_names`): under `jax.grad` the host-side checks are
skipped and the result is the tree of traced arrays. For the masked methods the gradient is the
derivative at fixed masks.

Methods whose rules prepare nothing (the elementwise ones) keep references to the input leaves and run
one fused program per chunk at each merge: their deltas are never stored.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.engine.compiled import is_traced, under_trace
from drm_jax.engine.endpoints import (CallbackSink, Sink, Source, TreeSink, leaf_data_reader, split_leaf_data,
                                      streamed_thresholds)
from drm_jax.engine.executors import Executor, Stored, executor_for, raise_non_finite_inputs
from drm_jax.engine.options import DEFAULT_GROUP_BYTES, MergeOptions, method_params, split_keywords
from drm_jax.engine.plan import Chunk, Plan, make_plan, plan_trees, resolve_compute_dtype
from drm_jax.engine.stack import Group
from drm_jax.errors import MergeInputError, clip
from drm_jax.math.select import whole_model_thresholds
from drm_jax.methods.base import MethodSpec, Rules, per_model_values
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


def _hashable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    array = np.asarray(value)
    return (array.shape, array.dtype.str, array.tobytes())


def raise_non_finite_outputs(finite: np.ndarray, names: Sequence[str]) -> None:
    bad = np.flatnonzero(~finite)
    if bad.size:
        raise MergeInputError(f"leaf {names[bad[0]]!r}: the merged value overflows (Inf or NaN) although every "
                              f"input is finite; lower the coefficients or lambda")


class Prepared:
    """A prepared merge: call `merge(**hyperparameters)` as often as needed.

    Thin: an immutable plan (`engine/plan.py`), the executor chosen for it once (`engine/executors.py`),
    what the executor prepared per chunk (kept with `store=True`), and a sink per call: `merge` puts the
    results in a tree in memory (`drm_jax.merge`, `drm_jax.prepare`), `run(put, ...)` hands each merged leaf
    to a callback (the command line's on-disk writer). With `store=False` (streaming) nothing is kept
    between chunks: each chunk is read, prepared, merged and handed over before the next is read.

    Attributes:
      method: the method's registry name. static: its static parameters. defaults: the traced values
        given to `prepare` (they apply to every `merge` that does not override them).
      plan: the `Plan`. layer_names: the merged leaves (DRM linear weights and other leaves), in plan
        order: the columns of per-layer coefficients.
      num_models: K.
      check_finite: whether inputs and merged leaves are checked for Inf/NaN here; a source and sink that
        check each tensor themselves (the command line's slabs, whose leaves hold pieces of several tensors)
        turn it off so that the error names the tensor.
    """

    def __init__(self, spec: MethodSpec, static: dict, defaults: dict, rules: Rules, plan: Plan, source: Source, *,
                 flat=None, mesh=None, store: bool = True, traced_inputs: bool = False, check_finite: bool = True):
        self.spec, self.method, self.static, self.defaults, self.rules = spec, spec.name, static, defaults, rules
        self.plan, self.names, self.num_models = plan, list(plan.names), plan.num_models
        self.mesh, self.store, self.check_finite = mesh, store, check_finite
        self._source, self._flat = source, flat
        problem = spec.count_problem(plan.num_models)
        if problem is not None:
            raise MergeInputError(problem)
        self.layer_names = list(plan.layer_names)
        self._executor: Executor = executor_for(spec, rules, plan, source, mesh=mesh, check_finite=check_finite)
        self.fused = not self._executor.prepares
        # inputs traced by the caller's jax.jit / vmap / grad: only a fused merge reads no host value of them
        self.traced_inputs = traced_inputs
        if traced_inputs and not self.fused:
            why = "a mesh splits its layers" if mesh is not None else "its preparation reads concrete values"
            raise MergeInputError(f"method {spec.name!r} prepares on the host ({why}), so it cannot merge traced "
                                  f"models inside jax.jit: call drm_jax.prepare(base, models, ...) outside the jit "
                                  f"and prepared.merge(...) inside it")
        # what each chunk keeps between merges (plan order); None: prepared at each merge, not kept
        self._stored: list[Stored | None] = [None] * len(plan.chunks)
        if store and not self.fused:
            self._stored = [self._executor.prepare_chunk(c) for c in plan.chunks]

    # -- the traced part -----------------------------------------------------------------------------
    def merge(self, coefficients=None, leaf_params=None, **hyperparameters) -> Any:
        """The merged tree for these numbers (any traced parameter of the method; see `drm-jax methods`).

        coefficients: (K,) or (K, num_layers); default: the ones given to `prepare`, else all 1.
        leaf_params: {leaf name: {traced parameter: value}}, values that replace the others for that leaf
          (mergekit's gradients and filter lists; see `run`).
        """
        given = dict(hyperparameters)
        if coefficients is not None:
            given["coefficients"] = coefficients
        self._traced(given)
        if self._flat is None:
            raise MergeInputError("this plan streams to a sink: call run(put=...)")
        sink = TreeSink(self._flat)
        self.run(sink, leaf_params=leaf_params, **given)
        return sink.result()

    def run(self, put: Sink | Callable[[int, Any], None], on_chunk: Callable[[Group, int], None] | None = None,
            leaf_params=None, **given) -> None:
        """Merge every chunk and hand each merged leaf to the sink: a `Sink`, or a callback `put(i, array)`
        (the leaves of the other roles are not put: the sink has them from the base). `on_chunk(group, n)`
        reports progress.

        leaf_params: None, or {leaf name: {parameter: value}} for traced parameters (names or aliases;
        `coefficients` / `weight` a scalar or one per model) that take another value on that leaf. The
        method's per-layer hyperparameters are then computed per member and stacked on the layer axis, so a
        group whose layers have different values is still one vmapped program, and new values (or new
        leaves given values) compile nothing new. Static parameters cannot vary per leaf (MergeInputError).
        """
        values = traced_values(self.spec, {**self.defaults, **self._traced(given)})
        coeffs = values.pop("coefficients", None)  # methods without weights (slerp, ...) have none
        if isinstance(coeffs, (int, float)):  # the default: all ones
            coeffs = None
        sink = put if hasattr(put, "put") else CallbackSink(put)
        self._run(coeffs, values, sink, on_chunk, self._leaf_values(leaf_params))

    def _traced(self, given: dict) -> dict:
        """The traced parameters of a merge's keywords; MergeInputError where one is static (structure)."""
        static, traced = split_params(self.spec, method_params(self.spec, given))
        if static:
            raise MergeInputError(f"{sorted(static)} of method {self.spec.name!r} are structure: give them to "
                                  f"drm_jax.prepare, not to merge")
        return traced

    def _leaf_values(self, leaf_params) -> dict[int, dict] | None:
        """leaf_params checked: {leaf index: canonical traced values} (every index of a repeated name)."""
        if leaf_params is None:
            return None
        merged = set(self.plan.leaves())
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
        row_of = {i: int(r) for c in self.plan.chunks for i, r in zip(c.members, c.layer_rows)}
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
            return streamed_thresholds(self._source, self.plan, np.asarray(density, np.float64))
        deltas = []
        for c, stored in zip(self.plan.chunks, self._stored):
            d = stored.state if stored is not None else None
            if d is None:
                d = self._executor.deltas(c)
            n = len(c.members)
            deltas.append(jnp.swapaxes(d[:n], 0, 1).reshape(self.num_models, -1))
        return whole_model_thresholds(tuple(deltas), jnp.asarray(density, jnp.float32) if traced_mode
                                      else np.asarray(density, np.float64))

    def _run(self, coeffs, values: dict, sink: Sink, on_chunk=None, leaves: dict | None = None) -> None:
        traced_mode = self.traced_inputs or is_traced(coeffs, values, leaves) or under_trace()
        k = self.num_models
        coeff_rows = self._leaf_coefficients(coefficient_matrix(coeffs, k, len(self.layer_names)), leaves)
        threshold = self._thresholds(values, traced_mode)
        executor = self._executor
        for c, stored in zip(self.plan.chunks, self._stored):
            hparams, per_member = self._hparams(c, values, leaves, traced_mode)
            rows = coeff_rows[c.layer_rows]
            names = [self.names[i] for i in c.members]
            if stored is None and executor.prepares:  # streaming: prepared for this merge, then dropped
                stored = executor.prepare_chunk(c)
            cache = self.rules.scaled_by is not None and self.store and not traced_mode and not per_member
            cache_key = (tuple(sorted((n, _hashable(v)) for n, v in values.items() if n != self.rules.scaled_by)),
                         _hashable(coeffs)) if cache else None
            merged = executor.merge_chunk(c, stored, rows, threshold, hparams, per_member, check=not traced_mode,
                                          cache_key=cache_key)
            if not traced_mode:
                if merged.finite_in is not None:
                    raise_non_finite_inputs(np.asarray(merged.finite_in), names)
                finite = merged.finite_out
                if self.check_finite and finite is not None and not np.asarray(finite).all():
                    self._locate_non_finite_input(c, names)
                    self._explain_overflow(c, stored, names, np.asarray(finite))
                    raise_non_finite_outputs(finite, names)
            for i, leaf in zip(merged.members, merged.leaves):
                sink.put(i, leaf)
            if on_chunk is not None:
                on_chunk(c.group, len(c.members))

    def _explain_overflow(self, chunk: Chunk, stored: Stored | None, names: Sequence[str], finite: np.ndarray) -> None:
        """Every input finite, a merged leaf not: say where it overflowed. Raises MergeInputError naming the
        leaf when the method's decomposition (DRM's prepared state) holds Inf/NaN, or when the inputs are so
        large that a sum of their squares (a norm, a Gram matrix, an SVD) can pass the compute dtype's
        largest value; returns otherwise (the coefficients made the merged value overflow)."""
        r = int(np.flatnonzero(~finite)[0])
        base, models = self._executor.inputs(chunk)
        values = [np.asarray(x, np.float64) for x in (base[r], *models[r])]
        largest = max([float(np.max(np.abs(x), initial=0.0)) for x in values]
                      + [float(np.max(np.abs(x - values[0]), initial=0.0)) for x in values[1:]])
        compute = np.dtype(chunk.layout.compute)
        limit = float(np.finfo(compute).max)
        state_finite = True
        if stored is not None and stored.state is not None and not self._executor.sharded:
            state_finite = all(bool(np.all(np.isfinite(np.asarray(x[r])))) for x in jax.tree.leaves(stored.state)
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
        base, models = self._executor.inputs(chunk)
        for r in range(len(chunk.members)):
            flags = [bool(np.all(np.isfinite(np.asarray(base[r]))))]
            flags += [bool(np.all(np.isfinite(np.asarray(m)))) for m in models[r]]
            raise_non_finite_inputs(np.array([flags]), [names[r]])


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
    flat, base_leaves, model_leaves, chunks_ = plan_trees(base, models, options, seed=static.get("seed", 0))
    if rules.linear is not rules.other and not any(chunk.group.role == "matrix" for chunk in chunks_):
        warnings.warn(f"method {spec.name}: no leaf went through its decomposition (no 2-D weight outside the "
                      "embeddings and LM heads, or none left by include/exclude); every leaf took its other path",
                      UserWarning, stacklevel=2)
    data = leaf_data_reader(spec, split_leaf_data(spec, keywords)[0], flat.names, chunks_, len(models))
    source = Source(lambda i: base_leaves[i], lambda t, i: model_leaves[t][i], data)
    return Prepared(spec, static, traced, rules, make_plan(flat.names, chunks_, len(models)), source, flat=flat,
                    mesh=options.mesh, traced_inputs=is_traced(base_leaves, model_leaves))


__all__ = ["DEFAULT_GROUP_BYTES", "MergeOptions", "Prepared", "prepare", "resolve", "rules_for"]
