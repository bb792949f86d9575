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
