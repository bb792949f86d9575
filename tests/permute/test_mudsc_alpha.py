"""MuDSC's balance between the two similarities, against a direct computation (issue 31).

S = alpha * S_weight + (1 - alpha) * S_act (arXiv 2403.01753: alpha weights the weight-space similarity).
On a one-hidden-layer MLP the search has one group, so the merge is the Hungarian assignment on the
cross block of S, and both S_weight (Pearson correlation of each hidden unit's incoming weights, bias
and outgoing weights) and S_act (Pearson correlation of the hidden activations over the batches) can be
computed here with NumPy, independently of drm_jax.permute's similarity code. Checked at alpha = 0
(activation matching) and at an asymmetric alpha, where swapping the two similarities changes the
matching: the merged weights and the reported objective must follow the paper's direction.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from drm_jax.permute import match_units, mlp_spec, mudsc
from drm_jax.permute.models import MLP

IN, HIDDEN, OUT = 5, 6, 3


def _variables(rng) -> dict:
    return {"params": {
        "Dense_0": {"kernel": (rng.standard_normal((IN, HIDDEN)) / np.sqrt(IN)).astype(np.float32),
                    "bias": (0.3 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)},
        "Dense_1": {"kernel": (rng.standard_normal((HIDDEN, OUT)) / np.sqrt(HIDDEN)).astype(np.float32),
                    "bias": (0.1 * rng.standard_normal(OUT)).astype(np.float32)},
    }}


def _pearson(rows: np.ndarray) -> np.ndarray:
    """Correlation of the rows of (units, samples), float64."""
    x = rows - rows.mean(axis=1, keepdims=True)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def _similarities(trees, inputs):
    """(S_weight, S_act), each (2 n, 2 n) over the stacked hidden units of the two models."""
    weights, features = [], []
    for tree in trees:
        p = {name: {k: np.asarray(v, np.float64) for k, v in layer.items()} for name, layer in tree["params"].items()}
        weights.append(np.concatenate([p["Dense_0"]["kernel"].T, p["Dense_0"]["bias"][:, None],
                                       p["Dense_1"]["kernel"]], axis=1))
        hidden = np.maximum(inputs @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0.0)
        assert np.all(hidden.std(axis=0) > 1e-3), "a dead unit: its correlation would be a convention"
        features.append(hidden.T)
    return _pearson(np.concatenate(weights)), _pearson(np.concatenate(features))


def _direct_merge(trees, similarity):
    """(merged params, objective) of aligning model 1's hidden units onto model 0's by the cross block."""
    cross = similarity[:HIDDEN, HIDDEN:]
    rows, cols = linear_sum_assignment(cross, maximize=True)
    perm = cols[np.argsort(rows)]
    a, b = ({name: {k: np.asarray(v, np.float64) for k, v in layer.items()} for name, layer in t["params"].items()}
            for t in trees)
    merged = {
        "Dense_0": {"kernel": (a["Dense_0"]["kernel"] + b["Dense_0"]["kernel"][:, perm]) / 2,
                    "bias": (a["Dense_0"]["bias"] + b["Dense_0"]["bias"][perm]) / 2},
        "Dense_1": {"kernel": (a["Dense_1"]["kernel"] + b["Dense_1"]["kernel"][perm]) / 2,
                    "bias": (a["Dense_1"]["bias"] + b["Dense_1"]["bias"]) / 2},
    }
    return merged, perm, float(cross[np.arange(HIDDEN), perm].sum())


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(4)
    trees = [_variables(rng), _variables(rng)]
    inputs = rng.standard_normal((40, IN)).astype(np.float32)
    batches = [inputs[:20], inputs[20:]]
    apply = MLP(hidden=(HIDDEN,), num_classes=OUT).apply
    weight, act = _similarities(trees, inputs.astype(np.float64))
    return trees, apply, batches, weight, act


@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_mudsc_matches_on_the_blended_similarity(pair, alpha):
    trees, apply, batches, weight, act = pair
    blended = alpha * weight + (1 - alpha) * act
    want, perm, score = _direct_merge(trees, blended)
    # the case tells the two directions of the balance apart (and the two similarities apart at alpha 0)
    _, swapped, _ = _direct_merge(trees, (1 - alpha) * weight + alpha * act)
    assert not np.array_equal(perm, swapped)
    spec = mlp_spec(trees[0])
    got = mudsc(trees, spec, apply, batches, alpha=alpha, recompute_bn_stats=False)
    for layer, leaves in want.items():
        for name, value in leaves.items():
            np.testing.assert_allclose(np.asarray(got["params"][layer][name], np.float64), value, rtol=1e-6,
                                       atol=1e-6, err_msg=f"{layer}.{name}")
    result = match_units(trees, spec, apply, batches, alpha=alpha)
    assert result.score == pytest.approx(score, rel=1e-6, abs=1e-9)
