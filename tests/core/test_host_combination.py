"""Linear combinations of NumPy inputs computed on the host (drm_jax/engine/host.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import drm_jax
from drm_jax.engine import host
from drm_jax.errors import MergeInputError


def _trees(k=3, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    shapes = {"a": (300, 70), "b": (7,), "c": ()}
    base = {n: np.asarray(rng.standard_normal(s), dtype) for n, s in shapes.items()}
    models = [{n: np.asarray(v + 0.1 * rng.standard_normal(np.shape(v)), dtype) for n, v in base.items()}
              for _ in range(k)]
    return base, models


CASES = [("linear", {}), ("linear", {"coefficients": [1.0, 2.0, 0.5]}),
         ("task_arithmetic", {"lambda_": 0.7}), ("task_arithmetic", {"coefficients": [0.5, -1.0, 2.0]})]


@pytest.mark.parametrize("method, params", CASES)
def test_numpy_inputs_equal_the_compiled_merge_of_jax_arrays(method, params, monkeypatch):
    base, models = _trees()
    calls = []
    combine = host.combine
    monkeypatch.setattr("drm_jax.engine.executors.combine", lambda *a, **k: calls.append(1) or combine(*a, **k))
    on_host = drm_jax.merge(base, models, method=method, **params)
    assert calls, "numpy inputs of a linear combination should be combined on the host"
    calls.clear()
    compiled = drm_jax.merge(jax.tree.map(jnp.asarray, base), [jax.tree.map(jnp.asarray, m) for m in models],
                             method=method, **params)
    assert not calls  # JAX arrays go through the compiled program
    for name in base:
        got, want = np.asarray(on_host[name]), np.asarray(compiled[name])
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_per_leaf_values_reach_the_host_weights():
    base, models = _trees()
    leaf = {"a": {"coefficients": [3.0, 0.0, 1.0]}}
    on_host = drm_jax.prepare(base, models, method="task_arithmetic").merge(leaf_params=leaf)
    want = base["a"].astype(np.float64) + sum(c * (m["a"].astype(np.float64) - base["a"])
                                              for c, m in zip([3.0, 0.0, 1.0], models))
    np.testing.assert_allclose(np.asarray(on_host["a"]), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("who", [None, 1])
def test_a_non_finite_input_is_named(who):
    base, models = _trees()
    target = base if who is None else models[who]
    target["a"] = target["a"].copy()
    target["a"][5, 3] = np.nan
    with pytest.raises(MergeInputError, match=r"'a' of " + ("the base model" if who is None else f"model {who}")):
        drm_jax.merge(base, models, method="linear")


def test_float64_leaves_without_x64_equal_the_float32_merge():
    base, models = _trees(dtype=np.float64)
    out = drm_jax.merge(base, models, method="task_arithmetic", lambda_=0.3)
    in32 = drm_jax.merge(jax.tree.map(lambda x: np.asarray(x, np.float32), base),
                         [jax.tree.map(lambda x: np.asarray(x, np.float32), m) for m in models],
                         method="task_arithmetic", lambda_=0.3)
    for name in base:
        assert np.asarray(out[name]).dtype == np.float64
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(in32[name], np.float64))


def test_a_rule_that_reads_the_base_stays_compiled(monkeypatch):
    base, models = _trees(k=1)
    monkeypatch.setattr("drm_jax.engine.executors.combine", lambda *a, **k: pytest.fail("combined on the host"))
    out = drm_jax.merge(base, models, method="passthrough", scale=0.5)
    np.testing.assert_allclose(np.asarray(out["a"]), 0.5 * models[0]["a"], rtol=1e-6, atol=1e-6)


def test_an_overflow_in_the_cast_to_the_stored_dtype_is_refused():
    # float32 leaves merged in float64 (compute_dtype): the sum fits float64 but not the stored float32
    big = np.float32(3e38)
    base = {"a": np.zeros((4, 4), np.float32)}
    models = [{"a": np.full((4, 4), big, np.float32)} for _ in range(2)]
    with jax.enable_x64(True):
        with pytest.raises(MergeInputError, match="'a'"):
            drm_jax.merge(base, models, method="task_arithmetic", compute_dtype="float64")


@pytest.mark.parametrize("as_jax", [False, True])
def test_linear_with_coefficients_summing_to_zero_keeps_the_base(as_jax):
    # the mean divides by 1 where the coefficients sum to 0 (docs/methods.md#linear): base + sum_t c_t delta_t,
    # which depends on the base (a merge of the models without it would be wrong here)
    base, models = _trees()
    coefficients = [1.0, -1.0, 0.0]
    wrap = (lambda t: jax.tree.map(jnp.asarray, t)) if as_jax else (lambda t: t)
    out = drm_jax.merge(wrap(base), [wrap(m) for m in models], method="linear", coefficients=coefficients)
    for name in base:
        b = base[name].astype(np.float64)
        want = b + sum(c * (m[name].astype(np.float64) - b) for c, m in zip(coefficients, models))
        np.testing.assert_allclose(np.asarray(out[name]), want, rtol=1e-5, atol=1e-5, err_msg=name)
