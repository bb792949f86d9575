"""The gradient of every registered method's merge in its numbers equals central finite differences
(issue 31), in float64: the coefficients (per-model weights) where the method has them, else the
interpolation factor t (slerp, nearswap) or passthrough's scale.

Masked methods (TIES, DARE with a fixed seed, breadcrumbs, DELLA, SCE, RAM, DRM, ...) are differentiable
almost everywhere: at fixed masks. The inputs here are random, so no mask or elected sign sits within
the finite-difference step of a flip, and the central difference is the derivative at the fixed masks.
A method with no differentiable number is listed in NOT_DIFFERENTIABLE with the reason, and the two
lists must together be exactly the registry, so a newly registered method is never skipped silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import drm_jax
from drm_jax.methods import METHODS

K = 3
# dyadic numbers and step: x and x +- STEP are exact in float32 too (t and scale are traced in float32)
C = [0.625, 1.125, 0.875]
STEP = 2.0 ** -20

# method -> (the number differentiated, its value, the method's other numbers)
DIFFERENTIABLE = {
    "drm": ("coefficients", C, {"drop_rate": 0.5}),
    "knots_ties": ("coefficients", C, {"drop_rate": 0.5}),
    "ties": ("coefficients", C, {"density": 0.6, "lambda_": 0.9}),
    "task_arithmetic": ("coefficients", C, {"lambda_": 0.8}),
    "linear": ("coefficients", C, {}),
    "dare_linear": ("coefficients", C, {"drop_rate": 0.5, "seed": 3}),
    "dare_ties": ("coefficients", C, {"drop_rate": 0.5, "seed": 3}),
    "tsv_m": ("coefficients", C, {}),
    "iso_c": ("coefficients", C, {}),
    "iso_cts": ("coefficients", C, {}),
    "breadcrumbs": ("coefficients", C, {"density": 0.8, "gamma": 0.1}),
    "breadcrumbs_ties": ("coefficients", C, {"density": 0.8, "gamma": 0.1}),
    "della": ("coefficients", C, {"density": 0.6, "epsilon": 0.2, "seed": 3}),
    "della_linear": ("coefficients", C, {"density": 0.6, "epsilon": 0.2, "seed": 3}),
    "sce": ("coefficients", C, {"select_topk": 0.6}),
    "ram": ("coefficients", C, {"epsilon": 0.05}),
    "ramplus_tl": ("coefficients", C, {"epsilon": 0.05, "r": 0.3}),
    "nuslerp": ("coefficients", C[:2], {}),
    "multislerp": ("coefficients", C, {}),
    "slerp": ("t", 0.375, {}),
    "nearswap": ("t", 0.1875, {}),
    "passthrough": ("scale", 0.75, {}),
}
NOT_DIFFERENTIABLE = {
    "karcher": "equal weights fixed as mergekit's; max_iter is a count and tol a threshold (piecewise constant)",
    "arcee_fusion": "no number: the mask and the merge come from the two models alone",
    "model_stock": "no number: the interpolation ratio comes from the models' angles alone",
    "wudi": "no coefficients: its numbers are an Adam loop's step count and learning rate",
    "regmean": "no coefficients: each weight is a solve with the data's Gram matrices",
    "regmean_plusplus": "not merged by leaf name: drm_jax.regmean_plusplus merges block after block",
}


def test_every_registered_method_is_checked_or_skipped_with_a_reason():
    assert not set(DIFFERENTIABLE) & set(NOT_DIFFERENTIABLE)
    assert set(DIFFERENTIABLE) | set(NOT_DIFFERENTIABLE) == set(METHODS)
    for method, (name, _, _) in DIFFERENTIABLE.items():
        assert name in METHODS[method].names, (method, name)
    for method in NOT_DIFFERENTIABLE:  # none of them has per-model weights to differentiate
        assert "coefficients" not in METHODS[method].names


def _trees(k: int):
    rng = np.random.default_rng(17)
    base = {"layers.0.w": rng.standard_normal((6, 5))}  # one leaf: one compiled program per method
    models = [{n: v + 0.3 * rng.standard_normal(v.shape) for n, v in base.items()} for _ in range(k)]
    return base, models


@pytest.mark.parametrize("method", sorted(DIFFERENTIABLE))
def test_gradient_equals_central_finite_differences(method):
    name, value, numbers = DIFFERENTIABLE[method]
    spec = METHODS[method]
    k = min(K, spec.max_models or K)
    with jax.enable_x64(True):
        base, models = _trees(k)
        prepared = drm_jax.prepare(base, models, method=method, **numbers)
        rng = np.random.default_rng(1)
        probe = {n: jnp.asarray(rng.standard_normal(v.shape)) for n, v in base.items()}

        def loss(x):
            merged = prepared.merge(**{name: x})
            return sum(jnp.sum(merged[n] * probe[n]) for n in base)

        value_and_grad = jax.jit(jax.value_and_grad(loss))
        x = jnp.asarray(value, jnp.float64)
        _, grad = value_and_grad(x)
        assert grad.dtype == jnp.float64
        central = np.zeros(x.shape)
        for index in np.ndindex(x.shape):
            up, _ = value_and_grad(x.at[index].add(STEP))
            down, _ = value_and_grad(x.at[index].add(-STEP))
            central[index] = (float(up) - float(down)) / (2 * STEP)
    assert np.max(np.abs(central)) > 1e-3, "the merge does not move with the number: the check is empty"
    np.testing.assert_allclose(np.asarray(grad), central, rtol=1e-5, atol=1e-7 * np.max(np.abs(central)))
