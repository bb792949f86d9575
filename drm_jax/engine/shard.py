"""Merging stacked layers over a device mesh: each device decomposes and merges its own layers.

The leading layer axis of every stacked group is split over all axes of a `jax.sharding.Mesh`
(`NamedSharding(mesh, P(mesh.axis_names))`), padded with zero layers to a multiple of the device count,
and the vmapped per-layer merge runs under `shard_map`: each device sees only its block of layers, so
the compiled program has no collective at all (no device ever gathers another's layers).

Arrays are built with `jax.make_array_from_callback`, which asks only for the shards of this process's
devices: in a multi-host run (after `jax.distributed.initialize()`), each process loads only the
tensors of the layers it owns, and `owned_rows` tells the writer which merged layers are local.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from drm_jax.engine.compiled import _merge_layers, _prepare_layers, _sanitize


def layer_spec(mesh: Mesh) -> P:
    """Split the leading (layer) axis over every axis of the mesh."""
    return P(tuple(mesh.axis_names))


def padded_length(length: int, mesh: Mesh) -> int:
    """Smallest multiple of the mesh's device count that holds `length` layers."""
    devices = mesh.devices.size
    return max(devices, math.ceil(length / devices) * devices)


def layer_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, layer_spec(mesh))


def stack_from_callback(
    mesh: Mesh, length: int, tail: tuple[int, ...], dtype, load_row: Callable[[int], np.ndarray]
) -> jax.Array:
    """A (length, *tail) array sharded on its layer axis, loading only the rows of local devices.

    load_row(r) returns row r as a host array (rows past the real layers are zero padding).
    """

    def shard(index) -> np.ndarray:
        rows = range(*index[0].indices(length))
        return np.stack([np.asarray(load_row(r), dtype) for r in rows]).reshape((len(rows),) + tail)

    return jax.make_array_from_callback((length,) + tail, layer_sharding(mesh), shard)


def owned_rows(array: jax.Array) -> list[tuple[int, jax.Array]]:
    """(row, value) of every layer held by this process's devices, each row once."""
    seen, rows = set(), []
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        for offset in range(shard.data.shape[0]):
            if start + offset not in seen:
                seen.add(start + offset)
                rows.append((start + offset, shard.data[offset]))
    return sorted(rows, key=lambda r: r[0])


@functools.lru_cache(maxsize=None)
def sharded_prepare_fn(mesh: Mesh, rule, sanitize: bool = True):
    """jit(shard_map(vmapped prepare)) of a registry rule: (base, models) -> (base, prepared, finite).

    sanitize: non-finite inputs are flagged and zeroed (False: left as they are, flags all true, for a
    caller that checks its inputs itself)."""
    spec = layer_spec(mesh)

    def local(base, models):
        if sanitize:
            base, models, finite = _sanitize(base, models, True)
        else:
            finite = jnp.ones((base.shape[0], models.shape[1] + 1), bool)
        return base, _prepare_layers(rule, base, models), finite

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec, spec),
                                 check_vma=False))


@functools.lru_cache(maxsize=None)
def sharded_rule_merge_fn(mesh: Mesh, rule, with_threshold: bool, per_member: bool = False):
    """jit(shard_map(vmapped merge)) of a registry rule; threshold replicated, hyperparameters replicated or,
    `per_member`, split on the layer axis with the layers."""
    spec = layer_spec(mesh)

    def local(prepared, base, coefficients, keys, hparams, *threshold):
        merged = _merge_layers(rule, prepared, base, coefficients, keys, threshold[0] if threshold else None, hparams,
                               per_member)
        return merged, jnp.all(jnp.isfinite(merged), axis=tuple(range(1, merged.ndim)))

    extra = (P(),) if with_threshold else ()
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec, spec if per_member else P())
                                 + extra, out_specs=(spec, spec), check_vma=False))


def prepare_chunk(mesh: Mesh, rule, length: int, shape: tuple[int, ...], num_models: int,
                  base_row: Callable[[int], np.ndarray], model_row: Callable[[int], np.ndarray],
                  sanitize: bool = True):
    """Stacked (length, ...) inputs built from this process's rows only, prepared on the mesh.

    base_row(r) / model_row(r) give row r in (out, in) orientation ((K, ...) for the models); rows past
    the real layers are zero padding. Returns (base, prepared, finite), all split on the layer axis.
    """
    base = stack_from_callback(mesh, length, tuple(shape), np.float32, base_row)
    models = stack_from_callback(mesh, length, (num_models,) + tuple(shape), np.float32, model_row)
    return sharded_prepare_fn(mesh, rule, sanitize)(base, models)


def merge_chunk(mesh: Mesh, rule, prepared, base, coefficients, keys, threshold, hparams, per_member: bool = False):
    """The merged layers (length, ...) and their finite flags, split on the layer axis. `per_member`: the
    hyperparameters have one row per real layer (padded here with the first row)."""
    sharding = layer_sharding(mesh)
    length = base.shape[0]
    rows = np.zeros((length,) + tuple(np.shape(coefficients)[1:]), np.float32)
    rows[: np.shape(coefficients)[0]] = np.asarray(coefficients)
    pad_keys = np.zeros((length,) + tuple(np.shape(keys)[1:]), np.uint32)
    pad_keys[: np.shape(keys)[0]] = np.asarray(keys)
    replicated = NamedSharding(mesh, P())
    extra = (jax.device_put(threshold, replicated),) if threshold is not None else ()
    fn = sharded_rule_merge_fn(mesh, rule, threshold is not None, per_member)
    if per_member:
        def padded(x):
            x = np.asarray(x)
            return np.concatenate([x, np.repeat(x[:1], length - x.shape[0], axis=0)]) if x.shape[0] < length else x

        hparams = jax.device_put(jax.tree.map(padded, hparams), sharding)
    else:
        hparams = jax.device_put(hparams, replicated)
    return fn(prepared, base, jax.device_put(rows, sharding), jax.device_put(pad_keys, sharding), hparams, *extra)


__all__ = ["merge_chunk", "owned_rows", "padded_length", "prepare_chunk", "stack_from_callback"]

