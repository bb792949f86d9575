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
