"""Sign election when an entry's task sum is exactly zero: the two tie rules, on hand-built cases.

SPEC step 7 ("majority", DRM and the TIES paper): an entry whose summed mass is 0 gets the sign of the
sum of the elected signs over the whole tensor. mergekit ("positive"): it gets +1. Random deltas never
sum to exactly 0, so only hand-built cases tell the two rules apart.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import drm_jax
import merge_reference as ref
from drm_jax.math import elected_sign

# Three entries, two tasks. Entry 0 ties (1 - 1 = 0); entries 1 and 2 are negative, so the sum of the
# elected signs is -2 and the majority rule gives entry 0 the sign -1 (task 1's -1 survives), while
# mergekit's rule gives it +1 (task 0's +1 survives).
TASK_0 = np.array([1.0, -2.0, -1.0], np.float32)
TASK_1 = np.array([-1.0, -1.0, -1.0], np.float32)
MAJORITY = np.array([-1.0, -1.5, -1.0])
POSITIVE = np.array([1.0, -1.5, -1.0])


def test_elected_sign_tie_rules():
    values = jnp.asarray(np.stack([TASK_0, TASK_1]))
    np.testing.assert_array_equal(np.asarray(elected_sign(values, "majority")), [-1.0, -1.0, -1.0])
    np.testing.assert_array_equal(np.asarray(elected_sign(values, "positive")), [1.0, -1.0, -1.0])
    # the other entries decide: with positive neighbours the same tie goes to +
    positive = -values
    np.testing.assert_array_equal(np.asarray(elected_sign(positive, "majority")), [1.0, 1.0, 1.0])


@pytest.mark.parametrize("method, kwargs, want", [
    ("drm", {}, MAJORITY),                                   # non-linear leaves: SPEC's TIES-like path
    ("knots_ties", {}, MAJORITY),
    ("ties", {"density": 1.0, "trim_scope": "model"}, MAJORITY),  # the TIES paper
    ("ties", {"density": 1.0}, POSITIVE),                    # mergekit's ties to the tensor
    ("dare_ties", {"drop_rate": 0.0}, POSITIVE),             # mergekit's dare_ties (nothing dropped)
])
def test_a_tied_entry_follows_each_methods_rule(method, kwargs, want):
    base = {"bias": np.zeros(3, np.float32)}
    out = drm_jax.merge(base, [{"bias": TASK_0}, {"bias": TASK_1}], method=method, **kwargs)
    np.testing.assert_allclose(np.asarray(out["bias"]), want, rtol=0, atol=1e-7)


def test_reference_elects_with_the_majority_rule():
    got = ref.ties_like(np.stack([TASK_0, TASK_1]))
    np.testing.assert_allclose(got, MAJORITY)


@pytest.mark.parametrize("method", ["drm", "knots_ties"])
@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_opposite_tasks_tie_everywhere_in_the_joint_space(method, direction):
    """D_2 = -D_1: every joint-space coordinate sums to exactly 0 and so do the elected signs, so the
    majority rule elects 0 and the merge is the base; the "+" rule would keep task 0's coordinates.

    The Gram route projects M = [D, -D] onto U as one matmul, so task 1's coordinates are exactly the
    negation of task 0's and the sums are exactly 0 (a dense SVD's V blocks are negations only up to
    rounding, which is why the float64 reference cannot be used here: it elects by rounding noise)."""
    rng = np.random.default_rng(0)
    d = rng.standard_normal((6, 5)).astype(np.float32)
    base = {"w": np.zeros((6, 5), np.float32)}
    out = np.asarray(drm_jax.merge(base, [{"w": d}, {"w": -d}], method=method, direction=direction,
                                   drop_rate=0.5, svd_route="gram")["w"])
    np.testing.assert_array_equal(out, np.zeros((6, 5), np.float32))
