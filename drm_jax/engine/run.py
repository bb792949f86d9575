"""One merge: a plan's chunks run by its executor, from a source into a sink, for one set of numbers.

`plan_executor` chooses a plan's executor once. `merge_numbers` checks the numbers of one merge against
the method and the plan: the method's traced values, the coefficients (one row per merged leaf) and the
per-leaf values of `leaf_params`. `merge_chunks` runs every chunk: its layers' hyperparameters, the
executor's `merge_chunk` (after its `prepare_chunk` where nothing was kept), the Inf/NaN checks that name
the leaf, each merged leaf handed to the sink.

`Prepared` (`engine/prepare.py`) calls it with what it prepared once and a sink per call; `merge_leaves`
(`engine/merge.py`) calls it with nothing stored: each chunk is read, prepared, merged and handed over
before the next is read, and the whole-model trim's thresholds come from streamed statistics passes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.engine.compiled import is_traced, under_trace
from drm_jax.engine.endpoints import Sink, Source, streamed_thresholds
from drm_jax.engine.executors import Executor, Stored, executor_for, raise_non_finite_inputs
from drm_jax.engine.plan import Chunk, Plan
from drm_jax.engine.stack import Group
from drm_jax.errors import MergeInputError, clip
from drm_jax.math.select import whole_model_thresholds
from drm_jax.methods.base import MethodSpec, Rules, per_model_values
from drm_jax.methods.registry import split_params, traced_values


def plan_executor(spec: MethodSpec, rules: Rules, plan: Plan, source: Source, *, mesh=None,
                  check_finite: bool = True) -> Executor:
    """The plan's executor (`executors.executor_for`), once the method is known to merge the plan's number
    of models (MergeInputError saying why not)."""
    problem = spec.count_problem(plan.num_models)
    if problem is not None:
        raise MergeInputError(problem)
    return executor_for(spec, rules, plan, source, mesh=mesh, check_finite=check_finite)


class Numbers(NamedTuple):
    """The numbers of one merge, checked (`merge_numbers`)."""

    coefficients: Any  # None (all ones), (K,) or (K, num_layers): as given
    rows: Any  # (num_layers, K): the coefficients of each merged leaf (plan order), per-leaf ones in place
    values: dict  # the method's other traced values, by canonical name
    leaves: dict[int, dict] | None  # leaf_params: {leaf index: canonical traced values}, or None


def merge_numbers(spec: MethodSpec, rules: Rules, plan: Plan, traced: dict, leaf_params=None) -> Numbers:
    """The `Numbers` of a merge from its traced keywords (the defaults given to `prepare` overridden by the
    merge's own) and its `leaf_params`; MergeInputError naming a bad value, leaf or parameter."""
    values = traced_values(spec, traced)
    coeffs = values.pop("coefficients", None)  # methods without weights (slerp, ...) have none
    if isinstance(coeffs, (int, float)):  # the default: all ones
        coeffs = None
    leaves = _leaf_values(spec, rules, plan, leaf_params)
    rows = _leaf_coefficients(plan, coefficient_matrix(coeffs, plan.num_models, len(plan.layer_names)), leaves)
    return Numbers(coeffs, rows, values, leaves)


def _leaf_values(spec: MethodSpec, rules: Rules, plan: Plan, leaf_params) -> dict[int, dict] | None:
    """leaf_params checked: {leaf index: canonical traced values} (every index of a repeated name)."""
    if leaf_params is None:
        return None
    merged = set(plan.leaves())
    where: dict[str, list[int]] = {}
    for i, name in enumerate(plan.names):
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
        static, traced = split_params(spec, given, where=lambda n, leaf=name: f"leaf_params[{clip(leaf)!r}].{n}")
        if static:
            raise MergeInputError(f"leaf_params[{clip(name)!r}].{sorted(static)[0]}: a static (structural) "
                                  f"parameter of method {spec.name!r} cannot vary per leaf; give it to "
                                  f"drm_jax.prepare")
        if rules.whole_model_trim_param is not None and rules.whole_model_trim_param in traced:
            raise MergeInputError(f"leaf_params[{clip(name)!r}].{rules.whole_model_trim_param}: the "
                                  f"whole-model trim takes one threshold per task over every leaf, so it "
                                  f"cannot vary per leaf")
        for i in indices:
            out[i] = traced
    return out


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


def merge_chunks(plan: Plan, executor: Executor, source: Source, sink: Sink, numbers: Numbers,
                 stored: Sequence[Stored | None] | None = None, *, spec: MethodSpec, static: dict, rules: Rules,
                 check_finite: bool = True, traced_inputs: bool = False,
                 on_chunk: Callable[[Group, int], None] | None = None) -> None:
    """Merge every chunk of `plan` with `executor` for `numbers` (`merge_numbers`) and put each merged leaf
    into `sink` (the leaves of the other roles are not put: the sink has them from the base).
    `on_chunk(group, n)` reports progress.

    stored: what each chunk prepared and keeps between merges (plan order; None for a chunk whose executor
      prepares nothing), or None: streaming, each chunk prepared for this merge and dropped after, the
      whole-model trim's thresholds from statistics passes over `source` (`streamed_thresholds`).
    spec, static, rules: the method, its static values and its rules (per-layer hyperparameters, the
      whole-model trim, the global scale whose unscaled delta a stored chunk keeps).
    check_finite: whether inputs and merged leaves are checked for Inf/NaN here; a source and sink that
      check each tensor themselves (the command line's slabs, whose leaves hold pieces of several tensors)
      turn it off so that the error names the tensor.
    traced_inputs: the inputs are traced by the caller's jax.jit / vmap / grad: no host check.
    """
    coeffs, coeff_rows, values, leaves = numbers
    traced_mode = traced_inputs or is_traced(coeffs, values, leaves) or under_trace()
    kept = list(stored) if stored is not None else [None] * len(plan.chunks)
    threshold = _thresholds(rules, plan, executor, source, stored, values, traced_mode)
    for c, prepared in zip(plan.chunks, kept):
        hparams, per_member = _layer_hparams(spec, static, c, plan.num_models, values, leaves, traced_mode)
        rows = coeff_rows[c.layer_rows]
        names = [plan.names[i] for i in c.members]
        if prepared is None and executor.prepares:  # streaming: prepared for this merge, then dropped
            prepared = executor.prepare_chunk(c)
        cache = rules.scaled_by is not None and stored is not None and not traced_mode and not per_member
        cache_key = (tuple(sorted((n, _hashable(v)) for n, v in values.items() if n != rules.scaled_by)),
                     _hashable(coeffs)) if cache else None
        merged = executor.merge_chunk(c, prepared, rows, threshold, hparams, per_member, check=not traced_mode,
                                      cache_key=cache_key)
        if not traced_mode:
            if merged.finite_in is not None:
                raise_non_finite_inputs(np.asarray(merged.finite_in), names)
            finite = merged.finite_out
            if check_finite and finite is not None and not np.asarray(finite).all():
                _locate_non_finite_input(executor, c, names)
                _explain_overflow(executor, spec.name, c, prepared, names, np.asarray(finite))
                raise_non_finite_outputs(finite, names)
        for i, leaf in zip(merged.members, merged.leaves):
            sink.put(i, leaf)
        if on_chunk is not None:
            on_chunk(c.group, len(c.members))


def _layer_hparams(spec: MethodSpec, static: dict, chunk: Chunk, k: int, values: dict, leaves: dict | None,
                   traced_mode: bool):
    """(hparams, per_member): the method's per-layer hyperparameters shared by the chunk's layers, or,
    with per-leaf values, one row per member stacked on a leading layer axis."""
    role, shape = chunk.group.role, chunk.group.shape
    if leaves is None:
        return spec.layer_hparams(values, role, shape, k, static), False
    rows = []
    for i in chunk.members:
        own = {n: v for n, v in leaves.get(i, {}).items() if n != "coefficients"}
        rows.append(spec.layer_hparams({**values, **own}, role, shape, k, static))
    structure = jax.tree.structure(rows[0])
    if any(jax.tree.structure(r) != structure for r in rows[1:]):
        raise MergeInputError(f"leaf_params: method {spec.name!r} gives differently structured "
                              f"hyperparameters to the leaves of one group")
    if traced_mode or is_traced(rows):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *rows), True
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *rows), True


def _leaf_coefficients(plan: Plan, coeff_rows, leaves: dict | None):
    """The (num_layers, K) coefficient rows with the per-leaf coefficients of `leaves` in their rows."""
    given = {i: v["coefficients"] for i, v in (leaves or {}).items() if "coefficients" in v}
    if not given:
        return coeff_rows
    row_of = {i: int(r) for c in plan.chunks for i, r in zip(c.members, c.layer_rows)}
    k = plan.num_models
    if is_traced(coeff_rows, list(given.values())):
        out = jnp.asarray(coeff_rows)
        for i, v in given.items():
            out = out.at[row_of[i]].set(jnp.broadcast_to(jnp.asarray(v, out.dtype), (k,)))
        return out
    out = np.array(coeff_rows)
    for i, v in given.items():
        row = np.asarray(per_model_values(v, k, f"leaf_params[{plan.names[i]!r}].coefficients"), np.float64)
        if not np.all(np.isfinite(row)):
            raise MergeInputError(f"leaf_params[{clip(plan.names[i])!r}].coefficients must be finite, "
                                  f"got {row.tolist()}")
        out[row_of[i]] = row
    return out


def _thresholds(rules: Rules, plan: Plan, executor: Executor, source: Source, stored, values: dict,
                traced_mode: bool):
    """Per-task magnitude thresholds over the whole task vector (TIES' model-scope trim)."""
    name = rules.whole_model_trim_param
    if name is None:
        return None
    density = per_model_values(values[name], plan.num_models, name)
    if stored is None and not traced_mode:
        return streamed_thresholds(source, plan, np.asarray(density, np.float64))
    deltas = []
    for c, kept in zip(plan.chunks, stored if stored is not None else [None] * len(plan.chunks)):
        d = kept.state if kept is not None else None
        if d is None:
            d = executor.deltas(c)
        n = len(c.members)
        deltas.append(jnp.swapaxes(d[:n], 0, 1).reshape(plan.num_models, -1))
    return whole_model_thresholds(tuple(deltas), jnp.asarray(density, jnp.float32) if traced_mode
                                  else np.asarray(density, np.float64))


def _explain_overflow(executor: Executor, method: str, chunk: Chunk, stored: Stored | None, names: Sequence[str],
                      finite: np.ndarray) -> None:
    """Every input finite, a merged leaf not: say where it overflowed. Raises MergeInputError naming the
    leaf when the method's decomposition (DRM's prepared state) holds Inf/NaN, or when the inputs are so
    large that a sum of their squares (a norm, a Gram matrix, an SVD) can pass the compute dtype's
    largest value; returns otherwise (the coefficients made the merged value overflow)."""
    r = int(np.flatnonzero(~finite)[0])
    base, models = executor.inputs(chunk)
    values = [np.asarray(x, np.float64) for x in (base[r], *models[r])]
    largest = max([float(np.max(np.abs(x), initial=0.0)) for x in values]
                  + [float(np.max(np.abs(x - values[0]), initial=0.0)) for x in values[1:]])
    compute = np.dtype(chunk.layout.compute)
    limit = float(np.finfo(compute).max)
    state_finite = True
    if stored is not None and stored.state is not None and not executor.sharded:
        state_finite = all(bool(np.all(np.isfinite(np.asarray(x[r])))) for x in jax.tree.leaves(stored.state)
                           if jnp.issubdtype(x.dtype, jnp.inexact))
    if not state_finite:
        raise MergeInputError(f"leaf {names[r]!r}: {method}'s decomposition overflowed {compute.name} "
                              f"(Inf or NaN) although every input is finite: the inputs reach |x| = "
                              f"{largest:.3g}, too large for its Gram matrices and SVDs in {compute.name}; scale "
                              f"the inputs down" + ("" if compute == np.float64 else
                                                    ", or decompose in float64 (precision='float64')"))
    if largest * largest * max(values[0].size, 1) > limit:
        raise MergeInputError(f"leaf {names[r]!r}: {method} overflowed {compute.name} (Inf or NaN) although "
                              f"every input is finite: the inputs reach |x| = {largest:.3g}, too large for "
                              f"{compute.name} arithmetic (their sums, norms or Gram matrices can pass its largest "
                              f"value {limit:.3g}); scale the inputs down")


def _locate_non_finite_input(executor: Executor, chunk: Chunk, names: Sequence[str]) -> None:
    base, models = executor.inputs(chunk)
    for r in range(len(chunk.members)):
        flags = [bool(np.all(np.isfinite(np.asarray(base[r]))))]
        flags += [bool(np.all(np.isfinite(np.asarray(m)))) for m in models[r]]
        raise_non_finite_inputs(np.array([flags]), [names[r]])


__all__ = ["merge_chunks", "merge_numbers", "plan_executor"]
