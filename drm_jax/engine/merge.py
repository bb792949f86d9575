"""`drm_jax.merge` and `merge_leaves`: the two sinks of a merge (`engine/endpoints.py`).

`merge(base, models, method=..., **keywords)` is `prepare(...)` then `Prepared.merge()`: a tree in memory.
`merge_leaves(names, shapes, dtypes, get_base=..., get_model=..., put=...)` runs the same plan, executor
and chunk loop (`engine/run.py`'s `merge_chunks`) over leaves read on demand (its `Source`) and handed to
`put` as they are merged (a `CallbackSink`), with nothing kept between chunks: the command line streams
checkpoints larger than memory through it into its on-disk writer.

Every form of a method (a registered name, a `MethodSpec` with bound parameters, a `MergeMethod`
composition of stages) runs through the same plan, executors and programs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from drm_jax.engine.endpoints import CallbackSink, Source, leaf_data_reader, split_leaf_data
from drm_jax.engine.options import DEFAULT_GROUP_BYTES, MergeOptions, split_keywords
from drm_jax.engine.plan import compute_dtype, leaf_key, make_plan, plan_chunks, plan_roles, resolve_compute_dtype
from drm_jax.engine.prepare import prepare, resolve, rules_for
from drm_jax.engine.run import merge_chunks, merge_numbers, plan_executor
from drm_jax.engine.stack import Group
from drm_jax.errors import MergeInputError


def merge(base: Any, models: Sequence[Any], method: Any = "drm", *, options: MergeOptions | None = None,
          leaf_params: dict[str, dict[str, Any]] | None = None, **keywords: Any) -> Any:
    """Merge K fine-tuned models that share `base` into one model (`prepare` then `Prepared.merge`).

    Args:
      base: pytree of arrays (nested dict, flat dict of dotted names, Flax params, NNX State).
      models: K pytrees with the same leaves (by name) and shapes as `base`.
      method: a registered method (`drm_jax.methods.METHODS`, listed by `drm-jax methods`: "drm" (default),
        "knots_ties", "ties", "task_arithmetic", "linear", "dare_linear", "dare_ties", ...), a `MethodSpec`
        (`drm_jax.drm(direction="vertical")`: a method with parameters bound), or a `MergeMethod` built
        from `drm_jax.math` stages (its traced numbers are those its stages read).
      options: a `MergeOptions` (layout, include, exclude, ignore, max_group_bytes, compute_dtype, mesh);
        each of its fields may also be given as a keyword.
      layout: None (default: inferred per leaf from its name: `...kernel` is a Flax kernel stored (in, out),
        any other 2-D weight (out, in)), "torch" (2-D weights stored (out, in)), "flax" (2-D kernels stored
        (in, out)), or a callable (name, shape) -> True for weights stored (in, out). Directions refer to
        (out, in).
      direction: DRM's "horizontal" (default; shared output-space basis) or "vertical" (a method parameter).
      drop_rate: fraction dropped (DRM pruning, DARE's drop probability); TIES takes `density` (= 1 -
        drop_rate, default 0.2). Default: the method's.
      coefficients: per-model lambda_t (default all 1), shape (K,) or (K, num_layers); for `linear` the
        weights of the average.
      mesh: a `jax.sharding.Mesh`: stacked layers are split over its devices (see `drm_jax.engine.shard`).
      include / exclude: regex patterns on dotted leaf names selecting the 2-D weights that go through
        DRM (default: all 2-D weights but embeddings and LM heads, `roles.DEFAULT_EXCLUDE`).
      ignore: patterns of leaves that keep their base value. A given include / exclude / ignore pattern that
        matches no leaf name raises MergeInputError naming it (`DEFAULT_EXCLUDE`'s patterns excepted).
      seed: seed of the random methods' draws (keys are per leaf name: results do not depend on grouping).
      max_group_bytes: cut stacked groups into chunks whose inputs stay under this many bytes.
      leaf_params: {leaf name: {traced parameter: value}}: values that differ per leaf (mergekit's gradients
        and filter lists); see `Prepared.run`. Static parameters cannot vary per leaf.
      compute_dtype: mergekit's `dtype`: None (float32, float64 for float64 leaves under x64), "float32",
        "float64", or "float16" / "bfloat16": inputs rounded to it and the merge rounded as mergekit's
        arithmetic in it rounds (docs/methods.md#compute-dtype); outputs keep the leaves' dtypes.
      **keywords: the `MergeOptions` fields above, or the method's own parameters (docs/methods.md;
        `drm-jax methods` lists them with their defaults), e.g. direction, drop_rate, coefficients, seed,
        rank_rtol, renormalize, svd_route, precision, density, trim_scope, normalize, lambda_ (or lambda).
        A keyword that is neither (`drop_rate` for `linear`) raises MergeInputError naming it.

    Returns:
      A pytree with the base's structure and leaf dtypes: torch tensors (a PyTorch `state_dict()`) come
      back as torch tensors; float64 leaves are merged in float64 under jax_enable_x64, else in float32
      and cast back to float64 on the host (NumPy arrays: JAX then holds no float64). Leaves that are not
      floating (integer buffers, an NNX State's RNG keys and counters) keep the base's value.

    Inside the caller's `jax.jit` (traced models) the methods that prepare nothing (task arithmetic, linear,
    TIES, DARE, ...) merge as they do eagerly, without the Inf/NaN checks; the others (DRM) raise
    MergeInputError: call `drm_jax.prepare` outside the jit and `Prepared.merge` inside it.

    Raises:
      MergeInputError: mismatched structure or shapes, NaN/Inf in any input or a merged value that
        overflows, bad parameters; the error names the leaf. Inputs are never modified.
    """
    options, keywords = split_keywords(keywords, options)
    return prepare(base, models, method, options=options, **keywords).merge(leaf_params=leaf_params)


def merge_leaves(
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[Any],
    *,
    get_base: Callable[[int], Any],
    get_model: Callable[[int, int], Any],
    put: Callable[[int, jax.Array], None],
    num_models: int,
    method: Any = "drm",
    options: MergeOptions | None = None,
    on_chunk: Callable[[Group, int], None] | None = None,
    leaf_params: dict[str, dict[str, Any]] | None = None,
    check_finite: bool = True,
    **keywords: Any,
) -> dict[str, int]:
    """The streaming sink of the planner, for callers that read leaves on demand (the command line).

    Leaves are identified by index into `names`/`shapes`/`dtypes`; `get_base(i)` and `get_model(t, i)`
    load leaf i of the base and of model t on demand, `put(i, array)` receives every leaf of the result
    (the base's own value for ignored and non-floating leaves). Only one chunk is alive at a time; TIES'
    whole-model trim takes its thresholds from two statistics passes first. `check_finite=False` leaves
    the Inf/NaN checks of inputs and merged leaves to the source and the sink. Other arguments are those of `merge`,
    except that a pattern matching none of `names` is not refused here: a streaming caller passes one batch
    of the model's leaves at a time and checks its patterns against all of them (`RoleRules.check_matched`).

    Returns:
      How many leaves took each path: {"matrix": ..., "other": ..., "ignore": ..., "not_floating": ...}.
    """
    if num_models < 1:
        raise MergeInputError("no models to merge")
    options, keywords = split_keywords(keywords, options)
    spec, static, traced = resolve(method, keywords)
    leaf_roles, groups = plan_roles(names, shapes, dtypes, options)
    chunks_ = plan_chunks(groups, leaf_roles, names, dtypes, num_models, static.get("seed", 0), options)
    data = leaf_data_reader(spec, split_leaf_data(spec, keywords)[0], names, chunks_, num_models)
    mesh = options.mesh
    rules = rules_for(spec, static, resolve_compute_dtype(options.compute_dtype)[1])
    plan = make_plan(names, chunks_, num_models)
    source = Source(get_base, get_model, data)
    executor = plan_executor(spec, rules, plan, source, mesh=mesh, check_finite=check_finite)
    numbers = merge_numbers(spec, rules, plan, traced, leaf_params)  # checked before anything is put
    sink = CallbackSink(put)
    if mesh is None or jax.process_index() == 0:  # one process passes through the base's own leaves
        for i, r in enumerate(leaf_roles):
            if r.role in ("ignore", "not_floating"):
                sink.put(i, get_base(i))
    # streaming: nothing stored, each chunk read, prepared, merged and handed over before the next
    merge_chunks(plan, executor, source, sink, numbers, None, spec=spec, static=static, rules=rules,
                 check_finite=check_finite, on_chunk=on_chunk)
    counts = {"matrix": 0, "other": 0, "ignore": 0, "not_floating": 0}
    for r in leaf_roles:
        counts[r.role] += 1
    return counts


__all__ = ["DEFAULT_GROUP_BYTES", "MergeOptions", "compute_dtype", "leaf_key", "merge", "merge_leaves", "prepare"]
