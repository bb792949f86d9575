"""Weight matching against a direct Hungarian solution written here (not through mudsc).

One hidden layer gives one permutation group, so Git Re-Basin's coordinate ascent is a single linear
assignment: match model B's hidden units to model A's by the Pearson correlation of each unit's weights
(its input-kernel column, its bias, its output-kernel row), then average A with the permuted B.
"""

import numpy as np
from scipy.optimize import linear_sum_assignment

from drm_jax.permute import mlp_spec, weight_matching

D_IN, HIDDEN, D_OUT = 5, 7, 3


def mlp_variables(seed):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return {"params": {"Dense_0": {"kernel": f32(D_IN, HIDDEN), "bias": f32(HIDDEN)},
                       "Dense_1": {"kernel": f32(HIDDEN, D_OUT), "bias": f32(D_OUT)}}}


def unit_vectors(variables):
    p = variables["params"]
    return np.concatenate([p["Dense_0"]["kernel"].T, p["Dense_0"]["bias"][:, None], p["Dense_1"]["kernel"]],
                          axis=1).astype(np.float64)


def test_weight_matching_is_the_hungarian_average():
    a, b = mlp_variables(0), mlp_variables(1)
    corr = np.corrcoef(unit_vectors(a), unit_vectors(b))[:HIDDEN, HIDDEN:]  # rows: A's units, columns: B's
    rows, cols = linear_sum_assignment(corr, maximize=True)
    perm = cols[np.argsort(rows)]  # A's unit i is matched with B's unit perm[i]
    assert not np.array_equal(perm, np.arange(HIDDEN))  # the solution is not the identity
    assert not np.array_equal(np.argsort(perm), perm)  # nor its own inverse: a swapped mapping would show
    pa, pb = a["params"], b["params"]
    want = {
        ("Dense_0", "kernel"): (pa["Dense_0"]["kernel"] + pb["Dense_0"]["kernel"][:, perm]) / 2,
        ("Dense_0", "bias"): (pa["Dense_0"]["bias"] + pb["Dense_0"]["bias"][perm]) / 2,
        ("Dense_1", "kernel"): (pa["Dense_1"]["kernel"] + pb["Dense_1"]["kernel"][perm, :]) / 2,
        ("Dense_1", "bias"): (pa["Dense_1"]["bias"] + pb["Dense_1"]["bias"]) / 2,
    }
    merged = weight_matching([a, b], mlp_spec(a))
    for (layer, leaf), value in want.items():
        np.testing.assert_allclose(np.asarray(merged["params"][layer][leaf]), value, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{layer}.{leaf}")
