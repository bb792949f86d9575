"""Order statistics and the decomposition routes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import drm_jax
from drm_jax.math import decompose
from drm_jax.math.select import keep_at_least_kth, kth_smallest, pruning_counts


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300), data=st.data())
def test_kth_smallest_equals_sort(seed, n, data):
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_normal(n)).astype(np.float32)
    x[rng.random(n) < 0.2] = 0.0  # zeros and repeated values
    valid = rng.random(n) < 0.8
    valid[0] = True
    k = data.draw(st.integers(1, int(valid.sum())))
    got = float(kth_smallest(jnp.asarray(x), k, jnp.asarray(valid)))
    assert got == np.sort(x[valid])[k - 1]


def test_kth_smallest_under_jit_and_vmap_with_traced_k():
    x = jnp.asarray(np.random.default_rng(0).random((4, 50)), jnp.float32)
    ks = jnp.array([1, 10, 25, 50])
    got = jax.jit(jax.vmap(kth_smallest))(x, ks)
    want = [np.sort(np.asarray(x[i]))[int(ks[i]) - 1] for i in range(4)]
    np.testing.assert_array_equal(np.asarray(got), want)


def test_kth_smallest_is_exact_in_float64():
    """float64 magnitudes (x64): the k-th value itself, not its float32 rounding, which lies above it about
    half the time and then drops the entry at the threshold from a `>=` mask."""
    rng = np.random.default_rng(5)
    x = rng.random(40)
    valid = rng.random(40) < 0.7
    with jax.enable_x64(True):
        kth, keep = jax.jit(kth_smallest), jax.jit(keep_at_least_kth)  # k traced: one program each
        for k in (1, 9, int(valid.sum())):
            got = kth(jnp.asarray(x), k, jnp.asarray(valid))
            assert got.dtype == jnp.float64 and float(got) == np.sort(x[valid])[k - 1]
            assert int(keep(jnp.asarray(x), k, jnp.asarray(valid)).sum()) == valid.sum() - k + 1


def test_float64_ties_trim_keeps_the_largest_floor_density_n_entries():
    """TIES in float64 keeps exactly the floor(density N) largest deltas (one model: the merge is its trim)."""
    with jax.enable_x64(True):
        for seed in range(6):
            delta = np.random.default_rng(seed).standard_normal((6, 5))
            out = np.asarray(drm_jax.merge({"w": np.zeros((6, 5))}, [{"w": delta}], method="ties", density=0.5)["w"])
            largest = np.abs(delta) >= np.sort(np.abs(delta).ravel())[-15]
            np.testing.assert_array_equal(out != 0, largest)


def test_keep_at_least_kth_reference_rule_keeps_n_minus_k_plus_1():
    x = jnp.arange(1.0, 11.0)  # 10 distinct magnitudes
    mask = keep_at_least_kth(x, 8)  # k = N - round(N * 0.2) = 8: the reference keeps 3 entries
    assert int(mask.sum()) == 3
    assert bool(keep_at_least_kth(x, 0).all())


def test_pruning_counts_are_exact_python_rounding():
    counts = pruning_counts(0.3, 8, 7, "kthvalue")  # one count per number of valid rows 0..8
    for rows in range(0, 9):
        n = rows * 7
        assert int(counts[rows]) == n - round(n * 0.3)
    # large N where float32 would round: computed on the host in float64
    assert int(pruning_counts(0.2, 3, 10_000_019, "kthvalue")[3]) == 30_000_057 - round(30_000_057 * 0.2)


def _spectrum_matrix(rng, n, c, singular_values):
    u, _ = np.linalg.qr(rng.standard_normal((n, len(singular_values))))
    v, _ = np.linalg.qr(rng.standard_normal((c, len(singular_values))))
    return (u * singular_values) @ v.T


def _product(route_out):
    u, s, p = route_out
    return np.asarray(u, np.float64) @ np.asarray(p, np.float64)


@pytest.mark.parametrize("shape", [(24, 96), (96, 24), (40, 48)])
@pytest.mark.parametrize("conditioning", ["well", "ill"])
@pytest.mark.parametrize("route", ["gram", "qr"])
def test_routes_match_dense_svd(shape, conditioning, route):
    rng = np.random.default_rng(0)
    q = min(shape)
    if conditioning == "well":
        sv = np.linspace(1.0, 0.5, q)
    else:  # spans 1e-7: far below the rank cut, where the Gram route cannot resolve
        sv = np.geomspace(1.0, 1e-7, q)
    m = jnp.asarray(_spectrum_matrix(rng, *shape, sv), jnp.float32)
    fn = {"gram": decompose.svd_gram, "qr": decompose.svd_qr}[route]
    u, s, p = jax.jit(fn)(m)
    ud, sd, pd = decompose.svd_dense(m)
    # singular values above the 1% cut agree to float32 accuracy
    keep = np.asarray(sd) > 0.01 * float(sd.max())
    np.testing.assert_allclose(np.sort(np.asarray(s))[::-1][: keep.sum()], np.asarray(sd)[keep], rtol=2e-4)
    # the retained subspace reproduces M
    mask = np.asarray(s) > 0.01 * float(np.max(s))
    approx = np.asarray(u, np.float64)[:, mask] @ np.asarray(p, np.float64)[mask]
    dense = np.asarray(ud, np.float64)[:, keep] @ np.asarray(pd, np.float64)[keep]
    assert np.linalg.norm(approx - dense) / np.linalg.norm(dense) < 1e-4
    # basis columns above the cut are orthonormal
    ub = np.asarray(u, np.float64)[:, mask]
    np.testing.assert_allclose(ub.T @ ub, np.eye(ub.shape[1]), atol=1e-4)


def test_auto_route_choice():
    assert decompose.choose_route((512, 3072), 0.01) == "gram"
    assert decompose.choose_route((3072, 512), 0.01) == "gram"
    assert decompose.choose_route((512, 512), 0.01) == "dense"
    assert decompose.choose_route((512, 3072), 1e-5) == "dense"  # Gram cannot resolve such a cut
    with pytest.raises(ValueError, match="unknown SVD route"):
        decompose.choose_route((2, 3), 0.01, "lanczos")


def test_zero_matrix_has_empty_rank():
    space = decompose.joint_space(jnp.zeros((3, 5, 4)))
    assert not bool(space.valid.any())
    assert bool(jnp.all(jnp.isfinite(space.coordinates)))
