"""Linear combinations of host inputs, computed where the inputs are (NumPy, cache-sized slabs, a few threads).

XLA's CPU client reads a NumPy array in place only when its data is 64-byte aligned; NumPy's allocator
guarantees 16 bytes, so every other input is copied before a program can read it, and for a merge that
reads each input once that copy costs more than the merge itself (issue 27: linear on NumPy inputs took
2.7x mergekit's time). A rule that is a linear combination of its inputs (`Rules.linear_combination`:
linear, task arithmetic) needs no program for its arithmetic: its weight per model is the rule applied to
the unit task vectors (one small program per chunk, `combination_weights`), and the combination

    base + sum_t w_t (x_t - base)

is computed by NumPy slab by slab (`combine`), each slab of every input read once while it is in cache,
into a 64-byte aligned output that JAX then holds without a copy. The result equals the compiled program's
up to the order of float32 roundings (a few units in the last place).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.buffers import aligned_empty
from drm_jax.methods.base import LayerContext, LayerRule

# Elements per slab: a slab of the accumulator, of the scratch and of one input (3 x 256 KiB in float32)
# stay in a core's L2 cache while the K inputs are added in.
SLAB = 1 << 16
# Elements per job handed to a thread (16 slabs): enough work per job to hide the pool's overhead.
JOB = SLAB * 16
_HOST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    # NumPy's loops release the GIL: one thread per core, as XLA's CPU client uses.
    return ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 16)), thread_name_prefix="drm_jax-host")


def host_inputs(arrays: Sequence) -> bool:
    """Whether these are NumPy float32 / float64 arrays (or NumPy scalars) a host combination can read as they
    are."""
    return all(isinstance(x, (np.ndarray, np.generic)) and x.dtype in _HOST_DTYPES for x in arrays)


@functools.partial(jax.jit, static_argnames=("rule", "k", "dtype", "per_member"))
def combination_weights(rule: LayerRule, coefficients, hparams, *, k: int, dtype: str, per_member: bool):
    """(L, K) weights w with rule(deltas) = sum_t w_t deltas_t, per layer: the rule's merge of the K unit
    task vectors (the rows of the identity, a layer of K entries). Only for linear-combination rules."""
    units = jnp.eye(k, dtype=dtype)

    def one(c, h):
        return rule.merge(units, LayerContext(c, None, None, h, jnp.zeros((k,), dtype)))

    return jax.vmap(one, in_axes=(0, 0 if per_member else None))(jnp.asarray(coefficients, dtype), hparams)


def _combine_span(out: np.ndarray, base: np.ndarray, models: Sequence[np.ndarray], weights: np.ndarray,
                  compute: np.dtype, start: int, stop: int, check: bool) -> bool:
    """out[start:stop] = base + sum_t w_t (x_t - base), slab by slab in the compute dtype (inputs of another
    dtype rounded to it first, as the compiled programs round them); whether every value is finite."""
    size = min(SLAB, stop - start)
    direct = out.dtype == compute  # accumulate in the output itself
    acc, tmp = (None if direct else np.empty(size, compute)), np.empty(size, compute)
    b_cast = None if base.dtype == compute else np.empty(size, compute)
    x_cast = None if all(x.dtype == compute for x in models) else np.empty(size, compute)
    finite = True
    for s in range(start, stop, SLAB):
        e = min(s + SLAB, stop)
        a, t = (out[s:e] if direct else acc[: e - s]), tmp[: e - s]
        b = base[s:e]
        if b_cast is not None:
            b = b_cast[: e - s]
            np.copyto(b, base[s:e], casting="same_kind")
        for i, (x, w) in enumerate(zip(models, weights)):
            x = x[s:e]
            if x.dtype != compute:
                np.copyto(x_cast[: e - s], x, casting="same_kind")
                x = x_cast[: e - s]
            target = a if i == 0 else t
            np.subtract(x, b, out=target)
            np.multiply(target, w, out=target)
            if i:
                np.add(a, t, out=a)
        np.add(a, b, out=a)
        if not direct:
            np.copyto(out[s:e], a, casting="same_kind")
        if check and finite:  # the output as stored: a cast to a narrower dtype can overflow too
            finite = bool(np.isfinite(out[s:e]).all())
    return finite


def combine(base: Sequence[np.ndarray], models: Sequence[Sequence[np.ndarray]], weights: np.ndarray,
            compute: np.dtype, check: bool) -> tuple[list[jax.Array], np.ndarray | None]:
    """Per member r: base[r] + sum_t weights[r, t] (models[r][t] - base[r]), computed in `compute` and
    returned in base[r]'s dtype and shape, as JAX arrays on the CPU backend (aligned: held without a copy).
    Returns (merged members, (L,) finite flags, None when unchecked)."""
    outputs, jobs = [], []
    for r, xs in enumerate(models):
        b = np.asarray(base[r], order="C")  # (ascontiguousarray would make a 0-d leaf 1-d)
        out = aligned_empty(b.nbytes).view(b.dtype).reshape(b.shape)
        outputs.append(out)
        flat_models = [np.asarray(x, order="C").reshape(-1) for x in xs]
        w = weights[r].astype(compute)
        for start in range(0, b.size, JOB):
            jobs.append((r, out.reshape(-1), b.reshape(-1), flat_models, w, compute, start, min(start + JOB, b.size)))
    finite = np.ones(len(outputs), bool)
    for r, ok in _pool().map(lambda j: (j[0], _combine_span(*j[1:], check)), jobs):
        finite[r] &= ok
    return list(jax.device_put(outputs)), (finite if check else None)  # one batched call for the chunk


__all__ = ["combination_weights", "combine", "host_inputs"]
