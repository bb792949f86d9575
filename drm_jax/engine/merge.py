"""`drm_jax.merge`: merge pytrees of fine-tuned weights with any named method.

The engine flattens the trees, checks they fit together, gives each leaf a role (DRM linear weight,
other leaf, ignored, kept), stacks same-shaped leaves of one role on a leading layer axis and runs each
stack through one jitted, vmapped call of the method's transform. Results are cast back to each base
leaf's dtype and layout and returned in the base's structure.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.engine import roles as roles_lib
from drm_jax.engine import shard
from drm_jax.engine.compiled import merge_layers_jit
from drm_jax.engine.stack import Group, chunk_length, chunks, group_leaves, pad_layers
from drm_jax.engine.tree import align_models, flatten, model_label, unflatten
from drm_jax.errors import MergeInputError
from drm_jax.math.select import kth_smallest
from drm_jax.math.state import MergeMethod
from drm_jax.methods.registry import resolve_method

# Stacked inputs of one call, in bytes, before a group is cut into chunks (None: no limit).
DEFAULT_GROUP_BYTES = 2 * 2**30


@functools.lru_cache(maxsize=64)
def _cached_method(method: str, direction: str, drop_rate: float, params: tuple) -> MergeMethod:
    # Same configuration -> same transform object -> jax.jit's cache hits across merge() calls.
    return resolve_method(method, direction, drop_rate, **dict(params))


def build_method(method, direction: str, drop_rate: float, params: dict) -> MergeMethod:
    if isinstance(method, MergeMethod):
        return resolve_method(method, **params)
    try:
        key = tuple(sorted(params.items()))
        hash(key)
    except TypeError:
        return resolve_method(method, direction, drop_rate, **params)
    return _cached_method(method, direction, float(drop_rate), key)


def leaf_key(seed: int, name: str) -> jax.Array:
    """PRNG key of one leaf: the seed folded with a stable hash of its name (independent of grouping)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def compute_dtype(dtype) -> jnp.dtype:
    """float32, or float64 for float64 leaves when jax_enable_x64 is on."""
    if np.dtype(dtype) == np.float64 and jax.config.jax_enable_x64:
        return jnp.float64
    return jnp.float32


def _coefficients(coefficients, k: int) -> np.ndarray:
    if coefficients is None:
        return np.ones(k, np.float32)
    c = np.asarray(coefficients, dtype=np.float64).reshape(-1)
    if c.shape[0] != k:
        raise MergeInputError(f"{c.shape[0]} coefficients given for {k} models")
    if not np.all(np.isfinite(c)):
        raise MergeInputError(f"coefficients must be finite, got {list(c)}")
    return c.astype(np.float32)


def _canonical(leaf, transpose: bool, dtype) -> jax.Array:
    x = jnp.asarray(leaf).astype(dtype)
    return x.T if transpose else x


def _global_thresholds(deltas_by_task: list[list[jax.Array]], density: float) -> jax.Array:
    """Per-task magnitude thresholds over the whole task vector (TIES paper's `topk_values_mask`).

    Keep entries >= the k-th smallest magnitude, k = d - int(d * density), d the task vector's size.
    """
    thresholds = []
    for parts in deltas_by_task:
        flat = jnp.concatenate([jnp.abs(p).reshape(-1) for p in parts]) if parts else jnp.zeros((0,))
        d = int(flat.shape[0])
        k = d - int(d * density)
        thresholds.append(kth_smallest(flat, k) if k > 0 else jnp.float32(0.0))
    return jnp.stack(thresholds).astype(jnp.float32)


def _raise_non_finite(finite: np.ndarray, names: list[str]) -> None:
    bad = np.argwhere(~finite)
    if bad.size:
        layer, column = bad[0]
        who = model_label(None if column == 0 else int(column) - 1)
        raise MergeInputError(f"leaf {names[layer]!r} of {who} contains NaN or Inf")


def merge(
    base: Any,
    models: Sequence[Any],
    method: str | MergeMethod = "drm",
    layout: str = "torch",
    direction: str = "horizontal",
    drop_rate: float = 0.8,
    coefficients: Sequence[float] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = roles_lib.DEFAULT_EXCLUDE,
    ignore: Sequence[str] | None = None,
    seed: int = 0,
    max_group_bytes: int | None = DEFAULT_GROUP_BYTES,
    **method_params: Any,
) -> Any:
    """Merge K fine-tuned models that share `base` into one model.

    Args:
      base: pytree of arrays (nested dict, flat dict of dotted names, Flax params, NNX State).
      models: K pytrees with the same leaves (by name) and shapes as `base`.
      method: "drm" (default), "knots_ties", "ties", "task_arithmetic", "linear", "dare_linear",
        "dare_ties", or a `MergeMethod` built from `drm_jax.math` stages.
      layout: "torch" (2-D weights stored (out, in)), "flax" (2-D kernels stored (in, out)), or a
        callable (name, shape) -> True for weights stored (in, out). Directions refer to (out, in).
      direction: DRM's "horizontal" (shared output-space basis) or "vertical" (shared input space).
      drop_rate: fraction dropped (DRM pruning, DARE drop; TIES density defaults to 1 - drop_rate).
      coefficients: per-model lambda_t (default all 1); for `linear` the weights of the average.
      mesh: a `jax.sharding.Mesh`: stacked layers are split over its devices (see `drm_jax.engine.shard`).
      include / exclude: regex patterns on dotted leaf names selecting the 2-D weights that go through
        DRM (default: all 2-D weights but embeddings and LM heads, `roles.DEFAULT_EXCLUDE`).
      ignore: patterns of leaves that keep their base value.
      seed: seed of DARE's random drop (keys are per leaf name, so results do not depend on grouping).
      max_group_bytes: cut stacked groups into chunks whose inputs stay under this many bytes.
      **method_params: the method's own parameters, e.g. rank_rtol, renormalize, svd_route, density,
        trim_scope, normalize, lambda (see `drm_jax.methods.registry.METHODS`).

    Returns:
      A pytree with the base's structure and leaf dtypes.

    Raises:
      MergeInputError: mismatched structure or shapes, NaN/Inf in any input, bad parameters; the error
        names the leaf. Inputs are never modified.
    """
    models = list(models)
    if not models:
        raise MergeInputError("no models to merge")
    flat = flatten(base)
    model_leaves = align_models(flat, models)
    out = list(flat.leaves)

    def put(i, merged):
        out[i] = merged

    merge_leaves(
        flat.names, [np.shape(x) for x in flat.leaves], [jnp.result_type(x) for x in flat.leaves],
        get_base=lambda i: flat.leaves[i], get_model=lambda t, i: model_leaves[t][i], put=put,
        num_models=len(models), method=method, layout=layout, direction=direction, drop_rate=drop_rate,
        coefficients=coefficients, mesh=mesh, include=include, exclude=exclude, ignore=ignore, seed=seed,
        max_group_bytes=max_group_bytes, **method_params,
    )
    return unflatten(flat, out)


def merge_leaves(
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[Any],
    *,
    get_base: Callable[[int], Any],
    get_model: Callable[[int, int], Any],
    put: Callable[[int, jax.Array], None],
    num_models: int,
    method: str | MergeMethod = "drm",
    layout: str | roles_lib.Orientation = "torch",
    direction: str = "horizontal",
    drop_rate: float = 0.8,
    coefficients: Sequence[float] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = roles_lib.DEFAULT_EXCLUDE,
    ignore: Sequence[str] | None = None,
    seed: int = 0,
    max_group_bytes: int | None = DEFAULT_GROUP_BYTES,
    on_chunk: Callable[[Group, int], None] | None = None,
    **method_params: Any,
) -> dict[str, int]:
    """The name-based core of `merge`, for callers that stream leaves (the command line).

    Leaves are identified by index into `names`/`shapes`/`dtypes`; `get_base(i)` and `get_model(t, i)`
    load leaf i of the base and of model t on demand, `put(i, array)` receives every leaf of the result
    (the base's own value for ignored and non-floating leaves). Arguments are those of `merge`.

    Returns:
      How many leaves took each path: {"linear": ..., "other": ..., "ignore": ..., "keep": ...}.
    """
    if num_models < 1:
        raise MergeInputError("no models to merge")
    if method in ("dare_linear", "dare_ties"):
        method_params.setdefault("seed", seed)
    merge_method = build_method(method, direction, drop_rate, method_params)
    k = num_models
    coeffs = jnp.asarray(_coefficients(coefficients, k))
    rules = roles_lib.RoleRules(include=include, exclude=exclude, ignore=ignore, layout=layout)
    leaf_roles = [rules(n, tuple(s), d) for n, s, d in zip(names, shapes, dtypes)]
    canonical_shapes = [tuple(s)[::-1] if r.transpose else tuple(s) for r, s in zip(leaf_roles, shapes)]
    groups = [g for g in group_leaves([r.role for r in leaf_roles], canonical_shapes)
              if g.role in ("linear", "other")]

    threshold = None
    if merge_method.global_density is not None:
        # The TIES paper trims over the whole task vector: one pass over every merged leaf first.
        per_task = [[] for _ in range(k)]
        for g in groups:
            for i in g.members:
                b = jnp.asarray(get_base(i), jnp.float32)
                for t in range(k):
                    per_task[t].append(jnp.asarray(get_model(t, i), jnp.float32) - b)
        threshold = _global_thresholds(per_task, merge_method.global_density)

    if mesh is None or jax.process_index() == 0:  # one process passes through the base's own leaves
        for i, r in enumerate(leaf_roles):
            if r.role in ("ignore", "keep"):
                put(i, get_base(i))
    run_groups(
        groups, merge_method, names, dtypes, leaf_roles, get_base=get_base, get_model=get_model, put=put,
        num_models=k, coefficients=coeffs, threshold=threshold, seed=seed, max_group_bytes=max_group_bytes,
        mesh=mesh, on_chunk=on_chunk,
    )
    counts = {"linear": 0, "other": 0, "ignore": 0, "keep": 0}
    for r in leaf_roles:
        counts[r.role] += 1
    return counts


def run_groups(
    groups: Sequence[Group],
    merge_method: MergeMethod,
    names: Sequence[str],
    dtypes: Sequence[Any],
    leaf_roles: Sequence[roles_lib.LeafRole],
    *,
    get_base: Callable[[int], Any],
    get_model: Callable[[int, int], Any],
    put: Callable[[int, jax.Array], None],
    num_models: int,
    coefficients: jax.Array,
    threshold: jax.Array | None = None,
    seed: int = 0,
    max_group_bytes: int | None = DEFAULT_GROUP_BYTES,
    mesh: jax.sharding.Mesh | None = None,
    on_chunk: Callable[[Group, int], None] | None = None,
) -> None:
    """Merge every group, chunk by chunk, reading leaves on demand and handing results to `put`.

    The in-memory `merge` and the streaming command line share this loop: `get_base(i)` and
    `get_model(t, i)` return leaf i of the base and of model t (arrays in their stored layout and dtype),
    `put(i, array)` receives the merged leaf in the base's layout and dtype. Only one chunk of one group
    is alive at a time. `on_chunk(group, n_layers)` is called after each chunk (progress reporting).
    With a mesh, each process loads and receives only the layers its own devices hold.
    """
    for group in groups:
        transform = merge_method.linear if group.role == "linear" else merge_method.other
        dtype = compute_dtype(dtypes[group.members[0]])
        # 4 bytes an entry (float32 compute) for the base and the K models
        layer_bytes = (num_models + 1) * math.prod(group.shape) * 4
        length = chunk_length(len(group.members), layer_bytes, max_group_bytes)
        if mesh is not None:
            length = shard.padded_length(length, mesh)
        for members in chunks(group.members, length):
            chunk_names = [names[i] for i in members]
            transposed = [leaf_roles[i].transpose for i in members]
            key_stack = pad_layers(jnp.stack([leaf_key(seed, n) for n in chunk_names]), length)
            if mesh is None:
                base_stack = pad_layers(jnp.stack([_canonical(get_base(i), tr, dtype)
                                                   for i, tr in zip(members, transposed)]), length)
                model_stack = pad_layers(jnp.stack([
                    jnp.stack([_canonical(get_model(t, i), tr, dtype) for t in range(num_models)])
                    for i, tr in zip(members, transposed)]), length)
                merged, finite = merge_layers_jit(transform, base_stack, model_stack, coefficients, key_stack,
                                                  threshold)
                rows = [(r, merged[r]) for r in range(len(members))]
                finite_rows = np.asarray(finite)[: len(members)]
            else:
                merged, finite = _merge_chunk_sharded(mesh, transform, group.shape, dtype, members, transposed,
                                                      length, get_base, get_model, num_models, coefficients,
                                                      key_stack, threshold)
                rows = [(r, x) for r, x in shard.owned_rows(merged) if r < len(members)]
                finite_rows = np.ones((len(members), num_models + 1), bool)
                for r, f in shard.owned_rows(finite):
                    if r < len(members):
                        finite_rows[r] = np.asarray(f)
            _raise_non_finite(finite_rows, chunk_names)
            for r, leaf in rows:
                i = members[r]
                if leaf_roles[i].transpose:
                    leaf = leaf.T
                put(i, leaf.astype(dtypes[i]))
            if on_chunk is not None:
                on_chunk(group, len(members))


def _merge_chunk_sharded(mesh, transform, shape, dtype, members, transposed, length, get_base, get_model,
                         num_models, coefficients, key_stack, threshold):
    """One chunk over the mesh: each process loads only the layers of its own devices."""
    k = num_models

    def host(x, tr):
        x = np.asarray(jax.device_get(x))
        return x.T if tr else x

    def base_row(r):
        return host(get_base(members[r]), transposed[r]) if r < len(members) else np.zeros(shape)

    def models_row(r):
        if r >= len(members):
            return np.zeros((k,) + tuple(shape))
        return np.stack([host(get_model(t, members[r]), transposed[r]) for t in range(k)])

    base_stack = shard.stack_from_callback(mesh, length, tuple(shape), dtype, base_row)
    model_stack = shard.stack_from_callback(mesh, length, (k,) + tuple(shape), dtype, models_row)
    return shard.merge_layers_sharded(mesh, transform, base_stack, model_stack, coefficients,
                                      np.asarray(key_stack), threshold)


__all__ = ["DEFAULT_GROUP_BYTES", "build_method", "compute_dtype", "leaf_key", "merge", "merge_leaves", "run_groups"]
