"""Linear combinations of host inputs, computed where the inputs are (NumPy, cache-sized slabs, a few threads).

XLA's CPU client reads a NumPy array in place only when its data is 64-byte aligned; NumPy's allocator
guarantees 16 bytes, so every other input is copied before a program can read it, and for a merge that
reads each input once that copy costs more than the merge itself (issue 27: linear on NumPy inputs took
2.7x mergekit's time). A rule that is a linear combination of its inputs (`Rules.linear_combination`:
linear, task arithmetic) needs no program for its arithmetic: its weight per model is the rule applied to
the unit task vectors (one small program per chunk, `combination_weights`), and the combination

    base + sum_t w_t (x_t - base)      (a weighted mean, `Rules.shift_equivariant`: sum_t w_t x_t)

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


def _combine_span(out: np.ndarray, base: np.ndarray | None, models: Sequence[np.ndarray], weights: np.ndarray,
                  start: int, stop: int, check: bool) -> bool:
    """out[start:stop] = base + sum_t w_t (x_t - base) (no base: sum_t w_t x_t), slab by slab; whether every
    value written is finite (True where unchecked)."""
    scratch = np.empty(min(SLAB, stop - start), out.dtype)
    finite = True
    for s in range(start, stop, SLAB):
        e = min(s + SLAB, stop)
        acc, tmp = out[s:e], scratch[: e - s]
        b = None if base is None else base[s:e]
        for t, (x, w) in enumerate(zip(models, weights)):
            if b is None:
                np.multiply(x[s:e], w, out=acc if t == 0 else tmp)
            else:
                np.subtract(x[s:e], b, out=acc if t == 0 else tmp)
                np.multiply(acc if t == 0 else tmp, w, out=acc if t == 0 else tmp)
            if t:
                np.add(acc, tmp, out=acc)
        if b is not None:
            np.add(acc, b, out=acc)
        if check and finite:
            finite = bool(np.isfinite(acc).all())
    return finite


def combine(base: Sequence[np.ndarray] | None, models: Sequence[Sequence[np.ndarray]], weights: np.ndarray,
            check: bool) -> tuple[list[jax.Array], np.ndarray | None]:
    """Per member r: base[r] + sum_t weights[r, t] (models[r][t] - base[r]) (base None: the weighted sum of
    the models), in the inputs' dtype and shape, as JAX arrays on the CPU backend (aligned: no copy).
    Returns (merged members, (L,) finite flags or None when unchecked)."""
    outputs, jobs = [], []
    for r, xs in enumerate(models):
        xs = [np.asarray(x) for x in xs]
        like = xs[0]
        out = aligned_empty(like.nbytes).view(like.dtype).reshape(like.shape)
        outputs.append(out)
        flat_out = out.reshape(-1)
        flat_base = None if base is None else np.ascontiguousarray(np.asarray(base[r])).reshape(-1)
        flat_models = [np.ascontiguousarray(x).reshape(-1) for x in xs]
        w = weights[r].astype(like.dtype)
        for start in range(0, flat_out.size, JOB):
            jobs.append((r, flat_out, flat_base, flat_models, w, start, min(start + JOB, flat_out.size)))
    results = _pool().map(lambda j: (j[0], _combine_span(*j[1:], check)), jobs)
    finite = np.ones(len(outputs), bool)
    for r, ok in results:
        finite[r] &= ok
    return [jax.device_put(x) for x in outputs], (finite if check else None)


__all__ = ["combination_weights", "combine", "host_inputs"]
