"""Checks that stand between a method and a plausible wrong answer, each against an independent reference
(issue 31): Karcher's exact number of steps and its value at a small max_iter, per-leaf numbers
(`leaf_params`) on trees whose member order is not the sorted order of the leaf names, and DELLA's keep
probabilities in magnitude-rank order (a second check beside tests/mergekit's statistical one).

Every check goes through the public API (`drm_jax.merge`, `drm_jax.prepare(...).merge`), so it keeps
holding wherever the method internals move.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

import drm_jax


# -- Karcher: exact step count and small max_iter, against a float64 reference ---------------------------
def karcher_reference(xs: list[np.ndarray], max_iter: int, tol: float) -> tuple[np.ndarray, int]:
    """(mean, steps taken): the equal-weight Karcher mean on the unit sphere, scaled by the mean norm, as
    docs/methods.md#karcher defines it; float64, written from the definition. steps counts the
    Riemannian updates actually applied (an iteration that stops on a short tangent applies none)."""
    flat = [np.asarray(x, np.float64).ravel() for x in xs]
    norms = np.array([np.linalg.norm(x) for x in flat])
    alphas = np.full(len(xs), 1.0 / len(xs))
    keep = norms > tol
    weights = alphas[keep] / alphas[keep].sum()
    units = np.stack([x / n for x, n in zip(flat, norms)])[keep]
    mean = weights @ units
    mean = units[0] if np.linalg.norm(mean) < tol else mean / np.linalg.norm(mean)
    steps = 0
    for _ in range(max_iter):
        cos = np.clip(units @ mean, -1.0, 1.0)
        theta = np.arccos(cos)
        on = theta >= tol
        factor = np.where(on, weights * theta / np.where(on, np.sin(theta), 1.0), 0.0)
        tangent = factor @ (units - cos[:, None] * mean[None])
        length = np.linalg.norm(tangent)
        if length < tol:
            break
        mean = np.cos(length) * mean + np.sin(length) * tangent / length
        mean = mean / np.linalg.norm(mean)
        steps += 1
    return (alphas @ norms) * mean.reshape(xs[0].shape), steps


def _spread_models(seed: int = 3, k: int = 3, shape=(4, 3)) -> list[np.ndarray]:
    """K tensors far apart on the sphere (angles near 90 degrees), so every step moves the mean by much
    more than float64 rounding and the iteration is far from converged after a few steps."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) * (1.0 + t) for t in range(k)]


def _karcher(models: list[np.ndarray], **params) -> np.ndarray:
    zero = {"w": np.zeros_like(models[0])}  # karcher merges the models' own weights over a zero base
    return np.asarray(drm_jax.merge(zero, [{"w": m} for m in models], method="karcher", exclude=[], **params)["w"])


def test_karcher_takes_exactly_max_iter_steps():
    """With tol 0 nothing stops early: max_iter = n gives the reference after n steps, and not after n - 1
    or n + 1 (which differ from it by far more than the tolerance)."""
    models = _spread_models()
    with jax.enable_x64(True):
        for n in (1, 2, 3):
            got = _karcher(models, max_iter=n, tol=0.0)
            want, steps = karcher_reference(models, n, 0.0)
            assert steps == n
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
            for other in (n - 1, n + 1):
                neighbour, _ = karcher_reference(models, other, 0.0)
                assert np.max(np.abs(neighbour - want)) > 1e-4, "the case cannot tell step counts apart"
                assert np.max(np.abs(got - neighbour)) > 1e-4


def test_karcher_stops_on_a_short_tangent_after_the_reference_step_count():
    """With a tolerance the loop stops early, after as many steps as the reference takes: a max_iter of
    that many steps, or far more, gives the same value; one step fewer gives another."""
    models = _spread_models(seed=5)
    tol = 1e-4
    with jax.enable_x64(True):
        converged, steps = karcher_reference(models, 100, tol)
        assert 2 <= steps < 100
        for max_iter in (steps, steps + 1, 100):
            np.testing.assert_allclose(_karcher(models, max_iter=max_iter, tol=tol), converged, rtol=1e-12,
                                       atol=1e-12)
        short, _ = karcher_reference(models, steps - 1, tol)
        got = _karcher(models, max_iter=steps - 1, tol=tol)
        np.testing.assert_allclose(got, short, rtol=1e-12, atol=1e-12)
        assert np.max(np.abs(got - converged)) > 1e-9


def test_karcher_small_max_iter_in_float32():
    """The default dtype: max_iter 1 and 2 agree with the float64 reference to float32 rounding, and the
    two differ by far more than that."""
    models = [m.astype(np.float32) for m in _spread_models(seed=7)]
    one, _ = karcher_reference(models, 1, 1e-5)
    two, _ = karcher_reference(models, 2, 1e-5)
    assert np.max(np.abs(one - two)) > 1e-3
    np.testing.assert_allclose(_karcher(models, max_iter=1), one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_karcher(models, max_iter=2), two, rtol=1e-5, atol=1e-5)


# -- per-leaf numbers on names whose sorted order is not the member order ---------------------------------
def _leaves(seed: int, k: int):
    """One group of three same-shaped leaves ("layers.10.w", "layers.2.w", "b.w"), base and K models."""
    rng = np.random.default_rng(seed)
    names = ["layers.10.w", "layers.2.w", "b.w"]
    base = {n: rng.standard_normal((6, 5)).astype(np.float32) for n in names}
    models = [{n: (v + 0.5 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in base.items()}
              for _ in range(k)]
    return names, base, models


def _ordered(values: dict[str, np.ndarray], layout: str):
    """The leaves in a tree whose flattening order (the engine's member order) differs from sorted names:
    an OrderedDict keeps insertion order ("layers.10.w", "layers.2.w", "b.w": sorted is "b.w" first);
    integer keys flatten numerically ("layers.2.w" before "layers.10.w": sorted is the other way)."""
    if layout == "ordered":
        return collections.OrderedDict((n, values[n]) for n in ["layers.10.w", "layers.2.w", "b.w"])
    return {"b": {"w": values["b.w"]}, "layers": {10: {"w": values["layers.10.w"]}, 2: {"w": values["layers.2.w"]}}}


def _leaf(tree, name: str, layout: str) -> np.ndarray:
    if layout == "ordered":
        return np.asarray(tree[name])
    group, *index, leaf = name.split(".")
    return np.asarray(tree[group][int(index[0])][leaf] if index else tree[group][leaf])


# method, shared numbers, per-leaf numbers (each leaf different), K
LEAF_CASES = {
    "ties": ("ties", {"density": 0.5, "coefficients": [0.6, 0.4], "lambda_": 1.0},
             {"layers.10.w": {"density": 0.2, "lambda_": 0.7}, "layers.2.w": {"density": 0.9, "lambda_": 1.3},
              "b.w": {"density": 0.5, "lambda_": 2.0}}, 2),
    "task_arithmetic": ("task_arithmetic", {"coefficients": [0.3, 0.3]},
                        {"layers.10.w": {"weight": [0.9, 0.1], "lambda_": 0.5},
                         "layers.2.w": {"weight": [0.2, 1.1], "lambda_": 1.5},
                         "b.w": {"weight": [-0.4, 0.6], "lambda_": 1.0}}, 2),
    "slerp": ("slerp", {"t": 0.5}, {"layers.10.w": {"t": 0.1}, "layers.2.w": {"t": 0.45}, "b.w": {"t": 0.9}}, 1),
}


@pytest.mark.parametrize("layout", ["ordered", "int-keys"])
@pytest.mark.parametrize("case", sorted(LEAF_CASES))
def test_leaf_params_follow_member_order_not_name_order(case, layout):
    """Each leaf merged with its own numbers equals a merge of that leaf alone with those numbers."""
    method, shared, per_leaf, k = LEAF_CASES[case]
    names, base, models = _leaves(11, k)
    tree = _ordered(base, layout)
    flat_order = [jax.tree_util.keystr(p, simple=True, separator=".")
                  for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert flat_order != sorted(flat_order), "the tree must not flatten in sorted name order"
    out = drm_jax.merge(tree, [_ordered(m, layout) for m in models], method=method, exclude=[],
                        leaf_params=per_leaf, **shared)
    numbers_of = {}
    for name in names:
        numbers = dict(shared)
        own = dict(per_leaf[name])
        if "weight" in own:  # mergekit's name of the coefficients
            numbers["coefficients"] = own.pop("weight")
        numbers_of[name] = {**numbers, **own}

    def alone(name, numbers):
        return np.asarray(drm_jax.merge({name: base[name]}, [{name: m[name]} for m in models], method=method,
                                        exclude=[], **numbers)[name])

    for i, name in enumerate(names):
        want = alone(name, numbers_of[name])
        np.testing.assert_allclose(_leaf(out, name, layout), want, rtol=1e-6, atol=1e-6, err_msg=name)
        # the case can tell the leaves' numbers apart: another leaf's numbers give another result
        other = names[(i + 1) % len(names)]
        assert np.max(np.abs(alone(name, numbers_of[other]) - want)) > 1e-3, (name, other)


# -- DELLA: keep probabilities in magnitude-rank order, a second check -------------------------------------
def della_keep_probabilities(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """mergekit's MagPrune probabilities in float64, from the definition (docs/methods.md#della): ranks of
    |delta| along axis 1 (a 1-D tensor is one row), ascending, normalised to [0, 1] by the row's smallest
    and largest rank, then density - epsilon + 2 epsilon * normalised rank."""
    rows = np.abs(delta)[None] if delta.ndim < 2 else np.abs(delta)
    ranks = np.argsort(np.argsort(rows, axis=1), axis=1).astype(np.float64) + 1
    low, high = ranks.min(axis=1, keepdims=True), ranks.max(axis=1, keepdims=True)
    return (density - epsilon + 2 * epsilon * (ranks - low) / (high - low)).reshape(delta.shape)


@pytest.mark.parametrize("shape, density, epsilon", [((5, 8), 0.5, 0.3), ((12,), 0.4, 0.35), ((3, 6, 4), 0.6, 0.2)])
def test_della_survivors_carry_their_rank_probability(shape, density, epsilon):
    """With the paper's rescale (each survivor divided by its own keep probability) and a zero base, every
    survivor reveals its probability: delta / merged. Each must be the rank probability of its entry."""
    delta = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    out = np.asarray(drm_jax.merge({"w": np.zeros(shape, np.float32)}, [{"w": delta}], method="della_linear",
                                   density=density, epsilon=epsilon, rescale_rule="inverse", seed=1, exclude=[])["w"])
    kept = out != 0
    want = della_keep_probabilities(delta.astype(np.float64), density, epsilon)
    assert len(np.unique(want[kept])) >= 3 and not kept.all(), "too few survivors to tell ranks apart"
    np.testing.assert_allclose(delta[kept] / out[kept], want[kept], rtol=1e-5)
