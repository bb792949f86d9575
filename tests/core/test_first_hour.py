"""What a new user meets in the first hour (issue 27): silent choices refused or made visible, the merge
inside the user's own jax.jit, errors that say what is wrong."""

import jax
import numpy as np
import pytest

import drm_jax
from drm_jax.errors import MergeInputError


def _trees(k: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = {"layers": {"0": {"proj": {"weight": rng.normal(size=(6, 4)).astype(np.float32)},
                             "norm": rng.normal(size=(4,)).astype(np.float32)}}}
    models = [jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), base) for _ in range(k)]
    return base, models


# -- errors that mislead (point 5) ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ties", "drm"])
def test_density_and_drop_rate_together_are_one_parameter(method):
    base, models = _trees()
    with pytest.raises(MergeInputError) as err:
        drm_jax.merge(base, models, method=method, density=0.5, drop_rate=0.5)
    assert "density and drop_rate are the same parameter (density = 1 - drop_rate); give one" in str(err.value)


def test_one_tree_in_place_of_models_is_named():
    base, models = _trees()
    with pytest.raises(MergeInputError, match=r"^models must be a list of trees, got a dict"):
        drm_jax.merge(base, models[0], method="task_arithmetic")
    # a list (or tuple) of dict trees is the right form
    out = drm_jax.merge(base, tuple(models), method="task_arithmetic")
    np.testing.assert_allclose(out["layers"]["0"]["norm"], models[0]["layers"]["0"]["norm"]
                               + models[1]["layers"]["0"]["norm"] - base["layers"]["0"]["norm"], rtol=1e-5)


# -- inside the user's program (point 4) ----------------------------------------------------------------
@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("dare_ties", {"density": 0.5, "seed": 3})])
def test_fused_merge_inside_users_jit_equals_eager(method, params):
    base, models = _trees(3)
    eager = drm_jax.merge(base, models, method=method, **params)
    jitted = jax.jit(lambda b, ms: drm_jax.merge(b, ms, method=method, **params))(base, models)
    for want, got in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_drm_inside_users_jit_says_prepare_outside():
    base, models = _trees(3)
    with pytest.raises(MergeInputError, match=r"call drm_jax\.prepare\(base, models, \.\.\.\) outside the jit and "
                                              r"prepared\.merge\(\.\.\.\) inside it"):
        jax.jit(lambda b, ms: drm_jax.merge(b, ms, method="drm"))(base, models)
    # what the message says works: prepared outside, merged inside (numbers concrete or traced)
    prepared = drm_jax.prepare(base, models, method="drm")
    eager = prepared.merge(drop_rate=0.3)
    for jitted in (jax.jit(lambda: prepared.merge(drop_rate=0.3))(),
                   jax.jit(lambda c: prepared.merge(coefficients=c, drop_rate=0.3))(np.ones(3, np.float32))):
        for want, got in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
