"""Observe Flax module calls while a model runs: activation features and BatchNorm input statistics.

Both use `flax.linen.intercept_methods`, so any linen model works without `sow` calls or a mutable
collection: the user's `apply_fn(variables, inputs)` runs unchanged, in inference mode.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.errors import MergeInputError
from drm_jax.permute.spec import ActivationSite, Path

ApplyFn = Callable[[Any, Any], Any]


def batch_inputs(batch: Any) -> Any:
    """The model input of a batch: the batch itself, or its first element for an (inputs, labels) pair."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def site_matrix(array: jnp.ndarray, axes: tuple[int, ...]) -> jnp.ndarray:
    """Move the feature `axes` last and flatten: (..., features...) -> (samples, units), float32 or wider."""
    ndim = array.ndim
    axes = tuple(a % ndim for a in axes)
    rest = tuple(a for a in range(ndim) if a not in axes)
    moved = jnp.transpose(array, rest + axes)
    units = int(np.prod([array.shape[a] for a in axes]))
    return moved.reshape(-1, units).astype(jnp.promote_types(array.dtype, jnp.float32))


def make_site_capture(apply_fn: ApplyFn, sites: tuple[ActivationSite, ...]) -> Callable[[Any, Any], dict]:
    """Jitted (variables, inputs) -> {site index: (samples, units) features}. A module called several
    times contributes every call, stacked as samples. Cached per (apply_fn, sites) so repeated merges
    of one model compile once."""
    return _cached(_build_site_capture, apply_fn, tuple(sites))


def _cached(builder: Callable, *key: Any) -> Any:
    # an unhashable apply_fn (an object with __eq__ but no __hash__) just skips the cache
    try:
        hash(key)
    except TypeError:
        return builder.__wrapped__(*key)
    return builder(*key)


@functools.lru_cache(maxsize=16)
def _build_site_capture(apply_fn: ApplyFn, sites: tuple[ActivationSite, ...]) -> Callable[[Any, Any], dict]:
    wanted: dict[Path, list[int]] = {}
    for index, site in enumerate(sites):
        wanted.setdefault(tuple(site.module), []).append(index)

    def run(variables: Any, inputs: Any) -> dict:
        seen: dict[int, list[jnp.ndarray]] = {i: [] for i in range(len(sites))}

        def interceptor(next_fun, args, kwargs, context):
            output = next_fun(*args, **kwargs)
            indices = wanted.get(tuple(context.module.path)) if context.method_name == "__call__" else None
            for index in indices or ():
                site = sites[index]
                array = args[0] if site.where == "input" else output
                seen[index].append(site_matrix(array, site.axes))
            return output

        with nn.intercept_methods(interceptor):
            apply_fn(variables, inputs)
        missing = [sites[i].module for i, arrays in seen.items() if not arrays]
        if missing:
            raise MergeInputError(f"activation sites never called by apply_fn: {['/'.join(m) for m in missing]}")
        return {i: jnp.concatenate(arrays, axis=0) for i, arrays in seen.items()}

    return jax.jit(run)


def _batch_norm_normalize(module: nn.BatchNorm, x: jnp.ndarray) -> tuple[jnp.ndarray, tuple, tuple]:
    """Training-mode BatchNorm of x with the batch's own statistics; also returns sum(x), sum(x^2)."""
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    feature_axes = tuple(a % x.ndim for a in axis)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    count = int(np.prod([x.shape[a] for a in reduce_axes]))
    total = jnp.sum(x32, axis=reduce_axes)
    total_sq = jnp.sum(jnp.square(x32), axis=reduce_axes)
    mean = total / count
    var = jnp.maximum(total_sq / count - jnp.square(mean), 0.0)
    shape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    y = (x32 - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + module.epsilon)
    params = module.variables.get("params", {})
    if module.use_scale:
        y = y * params["scale"].reshape(shape)
    if module.use_bias:
        y = y + params["bias"].reshape(shape)
    return y.astype(x.dtype), (total, total_sq), count


def make_batch_norm_probe(apply_fn: ApplyFn) -> Callable[[Any, Any], dict]:
    """Jitted (variables, inputs) -> {BatchNorm path: (count, sum, sum of squares)}.

    Every BatchNorm normalizes with its batch's statistics (training mode) so the layers after it see
    what they see while statistics are being collected, as in ZipIt's/PyTorch's BN reset with
    cumulative averaging."""
    return _cached(_build_batch_norm_probe, apply_fn)


@functools.lru_cache(maxsize=16)
def _build_batch_norm_probe(apply_fn: ApplyFn) -> Callable[[Any, Any], dict]:
    def run(variables: Any, inputs: Any) -> dict:
        stats: dict[Path, list] = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__" or not isinstance(module, nn.BatchNorm):
                return next_fun(*args, **kwargs)
            y, sums, count = _batch_norm_normalize(module, args[0])
            stats.setdefault(tuple(module.path), []).append((count, sums))
            return y

        with nn.intercept_methods(interceptor):
            apply_fn(variables, inputs)
        out = {}
        for path, calls in stats.items():
            out["/".join(path)] = (
                float(sum(c for c, _ in calls)),
                sum(s[0] for _, s in calls),
                sum(s[1] for _, s in calls),
            )
        return out

    return jax.jit(run)


def population_batch_norm_stats(
    apply_fn: ApplyFn, variables: Any, batches: Iterable[Any]
) -> dict[Path, tuple[np.ndarray, np.ndarray]]:
    """{BatchNorm module path: (mean, biased var)} over all batches, accumulated in float64."""
    probe = make_batch_norm_probe(apply_fn)
    totals: dict[str, list] = {}
    for batch in batches:
        for key, (count, s, sq) in probe(variables, batch_inputs(batch)).items():
            acc = totals.setdefault(key, [0.0, 0.0, 0.0])
            acc[0] += float(count)
            acc[1] = acc[1] + np.asarray(s, np.float64)
            acc[2] = acc[2] + np.asarray(sq, np.float64)
    result = {}
    for key, (count, s, sq) in totals.items():
        mean = s / count
        result[tuple(key.split("/")) if key else ()] = (mean, np.maximum(sq / count - mean * mean, 0.0))
    return result
