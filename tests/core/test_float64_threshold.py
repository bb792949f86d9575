"""Pruning's threshold in float64: the k-th magnitude is found among the float64 values themselves.

It used to be rounded to float32 and compared in float64, so with float64 leaves under x64 the entry at
the threshold (and every entry that rounds to it) was dropped: small DRM merges disagreed with the
float64 reference by up to 17%.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import drm_jax
from drm_jax.engine.merge import merge_leaves
from drm_jax.math.select import keep_at_least_kth, kth_smallest, whole_model_thresholds
from merge_reference import drm_h, relative_error


def test_kth_smallest_of_float64_is_exact():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = np.abs(rng.standard_normal(257))
        for k in (1, 2, 100, 257):
            got = kth_smallest(jnp.asarray(x), k)
            assert got.dtype == jnp.float64
            assert float(got) == np.sort(x)[k - 1]
        # values that float32 cannot tell apart: the k-th is still the exact float64 value
        close = 1.0 + np.arange(8) * 1e-12
        mask = keep_at_least_kth(jnp.asarray(close), 5)
        assert np.array_equal(np.asarray(mask), np.arange(8) >= 4)


@pytest.mark.parametrize("seed", range(20))
def test_float64_drm_merge_equals_the_float64_reference(seed):
    rng = np.random.default_rng(seed)
    deltas = rng.standard_normal((3, 12, 8))
    with jax.enable_x64(True):
        base = {"w": np.zeros((12, 8))}
        models = [{"w": d} for d in deltas]
        merged = drm_jax.merge(base, models, method="drm", drop_rate=0.5, exclude=())
        got = np.asarray(merged["w"])
    assert got.dtype == np.float64
    assert relative_error(got, drm_h(deltas, drop_rate=0.5)) < 1e-9


def test_whole_model_threshold_of_float64_is_exact():
    # TIES' whole-model trim (math.select.whole_model_thresholds): one k-th magnitude per task over several
    # leaves, found among the float64 magnitudes themselves (not rounded to float32 first)
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        parts = [rng.standard_normal((2, 40)), 1.0 + rng.integers(0, 8, (2, 24)) * 1e-12]
        density = np.array([0.5, 0.25])
        got = np.asarray(whole_model_thresholds(tuple(jnp.asarray(p) for p in parts), density))
        assert got.dtype == np.float64
        values = np.abs(np.concatenate(parts, axis=1))
        d = values.shape[1]
        for t in range(2):
            k = d - int(np.floor(d * density[t]))
            assert got[t] == np.sort(values[t])[k - 1]


def _streamed_and_in_memory(base, models, **keywords):
    names, shapes = list(base), [v.shape for v in base.values()]
    out = {}
    merge_leaves(names, shapes, [v.dtype for v in base.values()], get_base=lambda i: base[names[i]],
                 get_model=lambda t, i: models[t][names[i]], put=lambda i, a: out.__setitem__(names[i], np.asarray(a)),
                 num_models=len(models), method="ties", trim_scope="model", **keywords)
    want = drm_jax.merge(base, models, method="ties", trim_scope="model", **keywords)
    return out, {n: np.asarray(v) for n, v in want.items()}


def test_streamed_whole_model_threshold_of_float64_is_exact():
    # merge_leaves (nothing stored: `endpoints.streamed_thresholds`) used to find the threshold among the
    # magnitudes rounded to float32: with float64 leaves under x64 the deltas 1 + j 1e-12 all became 1.0, the
    # threshold 1.0, and every one of them was kept where the in-memory merge keeps those >= the exact k-th
    rng = np.random.default_rng(2)
    shapes = {"l0.w": (8, 6), "l1.w": (8, 6), "b": (6,)}
    base = {n: rng.standard_normal(s) for n, s in shapes.items()}
    models = [{n: b + rng.choice([-1.0, 1.0], b.shape) * (1.0 + rng.integers(0, 40, b.shape) * 1e-12)
               for n, b in base.items()} for _ in range(3)]
    with jax.enable_x64(True):
        got, want = _streamed_and_in_memory(base, models, density=[0.5, 0.3, 0.7])
    for name in shapes:
        assert got[name].dtype == np.float64
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("compute_dtype", ["float64", "float16"])
def test_streamed_whole_model_threshold_in_the_compute_dtype(compute_dtype):
    # float32 leaves computed in float64 (their deltas not rounded to float32) or rounded to float16 first:
    # the streamed statistics take each delta as the merge's programs compute it (models far from the base:
    # their float32 differences round; here the one at a threshold rounds up, so float32 statistics dropped it)
    rng = np.random.default_rng(0)
    shapes = {"l0.w": (8, 6), "l1.w": (8, 6), "b": (6,)}
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    models = [{n: 4 * rng.standard_normal(b.shape).astype(np.float32) for n, b in base.items()} for _ in range(3)]
    with jax.enable_x64(True):
        got, want = _streamed_and_in_memory(base, models, density=0.4, compute_dtype=compute_dtype)
    for name in shapes:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
