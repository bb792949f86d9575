"""`drm_jax.merge` and `merge_leaves`: the planner of `drm_jax.engine.prepare` with its two sinks.

`merge(base, models, method=..., **params)` is `prepare(...)` then `Prepared.merge()`: a tree in memory.
`merge_leaves(names, shapes, dtypes, get_base=..., get_model=..., put=...)` is the same planner over
leaves read on demand and handed to `put` as they are merged, with nothing kept between chunks: the
command line streams checkpoints larger than memory through it into its on-disk writer.

A `MergeMethod` (a researcher's own composition of `drm_jax.math` stages with fixed numbers) runs
through the same grouping and stacking, one vmapped one-shot program per chunk.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.engine import roles as roles_lib
from drm_jax.engine.compiled import merge_transform_jit, stack_inputs, unstack_outputs
from drm_jax.engine.prepare import (DEFAULT_GROUP_BYTES, Prepared, Source, _resolve, coefficient_matrix,
                                    compute_dtype, leaf_key, plan_chunks, plan_roles, plan_trees, prepare,
                                    raise_non_finite_inputs, raise_non_finite_outputs, resolve_compute_dtype,
                                    rules_for, whole_model_thresholds)
from drm_jax.engine.stack import Group
from drm_jax.engine.tree import like_leaf, unflatten
from drm_jax.errors import MergeInputError
from drm_jax.math.state import MergeMethod
from drm_jax.methods.registry import get_method


def _method_params(method, drop_rate, seed, coefficients, params: dict) -> dict:
    params = dict(params)
    # drop_rate is a keyword of merge() itself: methods that drop nothing ignore it
    if drop_rate is not None and (not isinstance(method, str) or "drop_rate" in get_method(method).names):
        params["drop_rate"] = drop_rate
    if coefficients is not None:
        params["coefficients"] = coefficients
    if seed is not None and isinstance(method, str) and "seed" in get_method(method).names:
        params["seed"] = seed
    return params


def merge(
    base: Any,
    models: Sequence[Any],
    method: str | MergeMethod = "drm",
    layout: str = "torch",
    direction: str | None = None,
    drop_rate: float | None = None,
    coefficients: Sequence[float] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = roles_lib.DEFAULT_EXCLUDE,
    ignore: Sequence[str] | None = None,
    seed: int | None = None,
    max_group_bytes: int | None = DEFAULT_GROUP_BYTES,
    leaf_params: dict[str, dict[str, Any]] | None = None,
    compute_dtype: str | None = None,
    **method_params: Any,
) -> Any:
    """Merge K fine-tuned models that share `base` into one model (`prepare` then `Prepared.merge`).

    Args:
      base: pytree of arrays (nested dict, flat dict of dotted names, Flax params, NNX State).
      models: K pytrees with the same leaves (by name) and shapes as `base`.
      method: a registered method (`drm_jax.methods.METHODS`, listed by `drm-jax methods`: "drm" (default),
        "knots_ties", "ties", "task_arithmetic", "linear", "dare_linear", "dare_ties"), or a `MergeMethod`
        built from `drm_jax.math` stages.
      layout: "torch" (2-D weights stored (out, in)), "flax" (2-D kernels stored (in, out)), or a
        callable (name, shape) -> True for weights stored (in, out). Directions refer to (out, in).
      direction: DRM's "horizontal" (default; shared output-space basis) or "vertical".
      drop_rate: fraction dropped (DRM pruning, DARE's drop probability); TIES takes `density` (= 1 -
        drop_rate, default 0.2). Default: the method's.
      coefficients: per-model lambda_t (default all 1), shape (K,) or (K, num_layers); for `linear` the
        weights of the average.
      mesh: a `jax.sharding.Mesh`: stacked layers are split over its devices (see `drm_jax.engine.shard`).
      include / exclude: regex patterns on dotted leaf names selecting the 2-D weights that go through
        DRM (default: all 2-D weights but embeddings and LM heads, `roles.DEFAULT_EXCLUDE`).
      ignore: patterns of leaves that keep their base value.
      seed: seed of the random methods' draws (keys are per leaf name: results do not depend on grouping).
      max_group_bytes: cut stacked groups into chunks whose inputs stay under this many bytes.
      leaf_params: {leaf name: {traced parameter: value}}: values that differ per leaf (mergekit's gradients
        and filter lists); see `Prepared.run`. Static parameters cannot vary per leaf.
      compute_dtype: mergekit's `dtype`: None (float32, float64 for float64 leaves under x64), "float32",
        "float64", or "float16" / "bfloat16": inputs rounded to it and the merge rounded as mergekit's
        arithmetic in it rounds (docs/methods.md#compute-dtype); outputs keep the leaves' dtypes.
      **method_params: the method's own parameters (docs/methods.md; `drm-jax methods` lists them with
        their defaults), e.g. rank_rtol, renormalize, svd_route, precision, density, trim_scope,
        normalize, lambda_ (or lambda).

    Returns:
      A pytree with the base's structure and leaf dtypes: torch tensors (a PyTorch `state_dict()`) come
      back as torch tensors; float64 leaves are merged in float64 under jax_enable_x64, else in float32
      and cast back to float64 on the host (NumPy arrays: JAX then holds no float64). Leaves that are not
      floating (integer buffers, an NNX State's RNG keys and counters) keep the base's value.

    Raises:
      MergeInputError: mismatched structure or shapes, NaN/Inf in any input or a merged value that
        overflows, bad parameters; the error names the leaf. Inputs are never modified.
    """
    if isinstance(method, MergeMethod):
        if leaf_params is not None:
            raise MergeInputError("leaf_params need a registered method (a MergeMethod's numbers are fixed)")
        return _merge_composed(base, models, method, layout, coefficients, include=include, exclude=exclude,
                               ignore=ignore, seed=0 if seed is None else seed, max_group_bytes=max_group_bytes,
                               params=method_params, compute_dtype=compute_dtype)
    params = _method_params(method, drop_rate, seed, coefficients, method_params)
    return prepare(base, models, method, layout, direction, mesh, include=include, exclude=exclude, ignore=ignore,
                   max_group_bytes=max_group_bytes, compute_dtype=compute_dtype,
                   **params).merge(leaf_params=leaf_params)


def merge_leaves(
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[Any],
    *,
    get_base: Callable[[int], Any],
    get_model: Callable[[int, int], Any],
    put: Callable[[int, jax.Array], None],
    num_models: int,
    method: str = "drm",
    layout: str | roles_lib.Orientation = "torch",
    direction: str | None = None,
    drop_rate: float | None = None,
    coefficients: Sequence[float] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = roles_lib.DEFAULT_EXCLUDE,
    ignore: Sequence[str] | None = None,
    seed: int | None = None,
    max_group_bytes: int | None = DEFAULT_GROUP_BYTES,
    on_chunk: Callable[[Group, int], None] | None = None,
    leaf_params: dict[str, dict[str, Any]] | None = None,
    compute_dtype: str | None = None,
    check_finite: bool = True,
    **method_params: Any,
) -> dict[str, int]:
    """The streaming sink of the planner, for callers that read leaves on demand (the command line).

    Leaves are identified by index into `names`/`shapes`/`dtypes`; `get_base(i)` and `get_model(t, i)`
    load leaf i of the base and of model t on demand, `put(i, array)` receives every leaf of the result
    (the base's own value for ignored and non-floating leaves). Only one chunk is alive at a time; TIES'
    whole-model trim takes its thresholds from two statistics passes first. `check_finite=False` leaves
    the Inf/NaN checks of inputs and merged leaves to the source and the sink. Other arguments are those of `merge`.

    Returns:
      How many leaves took each path: {"linear": ..., "other": ..., "ignore": ..., "keep": ...}.
    """
    if num_models < 1:
        raise MergeInputError("no models to merge")
    params = _method_params(method, drop_rate, seed, coefficients, method_params)
    spec, static, traced = _resolve(method, params, direction)
    leaf_roles, groups = plan_roles(names, shapes, dtypes, include=include, exclude=exclude, ignore=ignore,
                                    layout=layout)
    plan = plan_chunks(groups, leaf_roles, names, dtypes, num_models, static.get("seed", 0), max_group_bytes,
                       mesh, compute_dtype)
    planner = Prepared(spec, static, traced, rules_for(spec, static, resolve_compute_dtype(compute_dtype)[1]), names,
                       Source(get_base, get_model), num_models, plan, mesh=mesh, store=False)
    if mesh is None or jax.process_index() == 0:  # one process passes through the base's own leaves
        for i, r in enumerate(leaf_roles):
            if r.role in ("ignore", "keep"):
                put(i, get_base(i))
    planner.check_finite = check_finite
    planner.run(put, on_chunk, leaf_params=leaf_params)
    counts = {"linear": 0, "other": 0, "ignore": 0, "keep": 0}
    for r in leaf_roles:
        counts[r.role] += 1
    return counts


def _merge_composed(base, models, method: MergeMethod, layout, coefficients, *, include, exclude, ignore, seed,
                    max_group_bytes, params, compute_dtype=None) -> Any:
    """A `MergeMethod` of one-shot transforms: grouped, stacked and vmapped like the registry's methods."""
    if params:
        raise MergeInputError(f"parameters {sorted(params)} given with a custom MergeMethod")
    flat, base_leaves, model_leaves, plan = plan_trees(base, models, include=include, exclude=exclude,
                                                       ignore=ignore, layout=layout, seed=seed,
                                                       max_group_bytes=max_group_bytes, compute_as=compute_dtype)
    k = len(model_leaves)
    coeff_rows = coefficient_matrix(coefficients, k, 1)[0]
    threshold = None
    if method.global_density is not None:
        per_task = []
        for c in plan:
            b, m = stack_inputs(c.layout, tuple(base_leaves[i] for i in c.members),
                                tuple(tuple(ml[i] for ml in model_leaves) for i in c.members), c.layout.compute)
            per_task.append(jnp.swapaxes(m - b[:, None], 0, 1).reshape(k, -1))
        threshold = whole_model_thresholds(tuple(per_task), np.full(k, method.global_density))
    out = list(flat.leaves)
    for c in plan:
        transform = method.linear if c.group.role == "linear" else method.other
        b, m = stack_inputs(c.layout, tuple(base_leaves[i] for i in c.members),
                            tuple(tuple(ml[i] for ml in model_leaves) for i in c.members), c.layout.compute)
        merged, finite = merge_transform_jit(transform, b, m, coeff_rows, c.keys, threshold)
        names = [flat.names[i] for i in c.members]
        raise_non_finite_inputs(np.asarray(finite), names)
        raise_non_finite_outputs(np.asarray(jnp.all(jnp.isfinite(merged.reshape(merged.shape[0], -1)), axis=1)),
                                 names)
        for i, leaf in zip(c.members, unstack_outputs(c.layout, merged)):
            out[i] = like_leaf(leaf, flat.leaves[i])
    return unflatten(flat, out)


__all__ = ["DEFAULT_GROUP_BYTES", "compute_dtype", "leaf_key", "merge", "merge_leaves", "prepare"]
