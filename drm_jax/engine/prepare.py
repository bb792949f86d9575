"""`drm_jax.prepare`: prepare once, merge many.

`prepare(base, models, method=..., **structural_params)` checks the trees and makes the plan
(`engine/plan.py`: every leaf's role, same-shaped leaves of a role stacked into groups, cut into chunks
under a memory budget); the plan's executor (`engine/executors.py`) then runs each method's `prepare`
over the chunks: the work that does not depend on the numeric hyperparameters (for DRM the joint
decompositions, truncated to one rank bucket per group). `Prepared.merge(drop_rate=..., lambda_=...,
coefficients=..., density=...)` then runs only the traced part, vmapped over layers (`engine/run.py`'s
`merge_chunks` with what was prepared), and returns a tree in the base's structure (the in-memory sink,
`engine/endpoints.py`): a sweep is a loop over `merge` and compiles nothing new.

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
from typing import Any, Callable

from drm_jax.engine.compiled import is_traced
from drm_jax.engine.endpoints import CallbackSink, Sink, Source, TreeSink, leaf_data_reader, split_leaf_data
from drm_jax.engine.executors import Executor, Stored
from drm_jax.engine.options import DEFAULT_GROUP_BYTES, MergeOptions, method_params, split_keywords
from drm_jax.engine.plan import Plan, make_plan, plan_trees, resolve_compute_dtype
from drm_jax.engine.run import merge_chunks, merge_numbers, plan_executor
from drm_jax.engine.stack import Group
from drm_jax.errors import MergeInputError
from drm_jax.methods.base import MethodSpec, Rules
from drm_jax.methods.registry import method_spec, split_params, static_values

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


class Prepared:
    """A prepared merge: call `merge(**hyperparameters)` as often as needed.

    Thin: an immutable plan (`engine/plan.py`), the executor chosen for it once (`engine/executors.py`),
    what the executor prepared per chunk, and a sink per call: `merge` puts the results in a tree in memory
    (`drm_jax.merge`, `drm_jax.prepare`), `run(put, ...)` hands each merged leaf to a sink or a callback.
    Each call checks its numbers and runs the chunks (`engine/run.py`'s `merge_chunks`) with what is stored.

    Attributes:
      method: the method's registry name. static: its static parameters. defaults: the traced values
        given to `prepare` (they apply to every `merge` that does not override them).
      plan: the `Plan`. layer_names: the merged leaves (DRM linear weights and other leaves), in plan
        order: the columns of per-layer coefficients.
      num_models: K.
    """

    def __init__(self, spec: MethodSpec, static: dict, defaults: dict, rules: Rules, plan: Plan, source: Source, *,
                 flat, mesh=None, traced_inputs: bool = False):
        self.spec, self.method, self.static, self.defaults, self.rules = spec, spec.name, static, defaults, rules
        self.plan, self.names, self.num_models, self.mesh = plan, list(plan.names), plan.num_models, mesh
        self._source, self._flat = source, flat
        self.layer_names = list(plan.layer_names)
        self._executor: Executor = plan_executor(spec, rules, plan, source, mesh=mesh)
        self.fused = not self._executor.prepares
        # inputs traced by the caller's jax.jit / vmap / grad: only a fused merge reads no host value of them
        self.traced_inputs = traced_inputs
        if traced_inputs and not self.fused:
            why = "a mesh splits its layers" if mesh is not None else "its preparation reads concrete values"
            raise MergeInputError(f"method {spec.name!r} prepares on the host ({why}), so it cannot merge traced "
                                  f"models inside jax.jit: call drm_jax.prepare(base, models, ...) outside the jit "
                                  f"and prepared.merge(...) inside it")
        # what each chunk keeps between merges (plan order); None where the executor prepares nothing
        self._stored: list[Stored | None] = [self._executor.prepare_chunk(c) for c in plan.chunks]

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
        numbers = merge_numbers(self.spec, self.rules, self.plan, {**self.defaults, **self._traced(given)},
                                leaf_params)
        sink = put if hasattr(put, "put") else CallbackSink(put)
        merge_chunks(self.plan, self._executor, self._source, sink, numbers, self._stored, spec=self.spec,
                     static=self.static, rules=self.rules, traced_inputs=self.traced_inputs, on_chunk=on_chunk)

    def _traced(self, given: dict) -> dict:
        """The traced parameters of a merge's keywords; MergeInputError where one is static (structure)."""
        static, traced = split_params(self.spec, method_params(self.spec, given))
        if static:
            raise MergeInputError(f"{sorted(static)} of method {self.spec.name!r} are structure: give them to "
                                  f"drm_jax.prepare, not to merge")
        return traced


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
