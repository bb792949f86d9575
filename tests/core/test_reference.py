"""Every method and both DRM directions against the float64 NumPy reference written from SPEC."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import drm_jax
import merge_reference as ref
from drm_jax.engine.merge import leaf_key

TOL = 1e-4


def make_models(seed, k=3, shape=(12, 9), scale=0.1):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    deltas = (scale * rng.standard_normal((k,) + shape)).astype(np.float32)
    return base, deltas


def merged_delta(base, deltas, **kw):
    out = drm_jax.merge({"w": base}, [{"w": base + d} for d in deltas], **kw)["w"]
    # compare the delta the method produced; base + delta - base is exact enough at these scales
    return np.asarray(out, np.float64) - base.astype(np.float64)


def _fp32_deltas(base, deltas):
    # the reference sees exactly the deltas drm_jax computes in float32
    return np.stack([(base + d) - base for d in deltas]).astype(np.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(12, 9), (7, 16), (10, 10)])
@pytest.mark.parametrize("drop_rate", [0.8, 0.5, 0.0])
def test_drm_horizontal_matches_reference(seed, shape, drop_rate):
    base, deltas = make_models(seed, shape=shape)
    coeffs = [1.0, 0.5, 2.0]
    got = merged_delta(base, deltas, method="drm", drop_rate=drop_rate, coefficients=coeffs)
    want = ref.drm_h(_fp32_deltas(base, deltas), drop_rate=drop_rate, coefficients=coeffs)
    assert ref.relative_error(got, want) < TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(12, 9), (7, 16)])
def test_drm_vertical_matches_reference(seed, shape):
    base, deltas = make_models(seed, shape=shape)
    got = merged_delta(base, deltas, method="drm", direction="vertical", drop_rate=0.7)
    want = ref.drm_v(_fp32_deltas(base, deltas), drop_rate=0.7)
    assert ref.relative_error(got, want) < TOL


@pytest.mark.parametrize("route", ["dense", "gram", "qr"])
@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_every_svd_route_matches_reference(route, direction):
    base, deltas = make_models(5, k=4, shape=(16, 6))
    got = merged_delta(base, deltas, method="drm", direction=direction, svd_route=route)
    d = _fp32_deltas(base, deltas)
    want = ref.drm_h(d) if direction == "horizontal" else ref.drm_v(d)
    assert ref.relative_error(got, want) < TOL


@pytest.mark.parametrize("seed", [0, 1])
def test_knots_ties_is_drm_without_renormalization(seed):
    base, deltas = make_models(seed)
    got = merged_delta(base, deltas, method="knots_ties", drop_rate=0.6)
    want = ref.drm_h(_fp32_deltas(base, deltas), drop_rate=0.6, renormalize=False)
    assert ref.relative_error(got, want) < TOL
    renormalized = ref.drm_h(_fp32_deltas(base, deltas), drop_rate=0.6)
    assert ref.relative_error(renormalized, want) > 1e-3  # the ablation really differs


def test_drm_per_task_pruning_ablation():
    base, deltas = make_models(3)
    got = merged_delta(base, deltas, method="drm", prune_scope="per_task")
    want = ref.drm_h(_fp32_deltas(base, deltas), per_task=True)
    assert ref.relative_error(got, want) < TOL


def test_drm_non_linear_leaves_take_ties_like_path():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(11).astype(np.float32)
    deltas = (0.1 * rng.standard_normal((3, 11))).astype(np.float32)
    coeffs = [1.0, 2.0, 0.5]
    got = merged_delta(base, deltas, method="drm", coefficients=coeffs)
    want = ref.ties_like(_fp32_deltas(base, deltas), coefficients=coeffs)
    assert ref.relative_error(got, want) < 1e-6


@pytest.mark.parametrize("shape", [(12, 9), (13,)])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_tensor_scope_matches_mergekit_semantics(shape, density):
    base, deltas = make_models(7, shape=shape)
    weights = [1.0, 0.6, 0.3]
    got = merged_delta(base, deltas, method="ties", density=density, coefficients=weights, **{"lambda": 0.9})
    want = ref.ties_mergekit(_fp32_deltas(base, deltas), density, weights, lam=0.9)
    assert ref.relative_error(got, want) < 1e-6


def test_ties_model_scope_matches_paper_over_whole_task_vector():
    rng = np.random.default_rng(11)
    base = {"a": rng.standard_normal((6, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    models = [{n: v + (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in base.items()}
              for _ in range(3)]
    out = drm_jax.merge(base, models, method="ties", density=0.3, trim_scope="model", lambda_=0.7)
    # the reference flattens each task vector over all leaves, in flattening order ("a", "b")
    tv = np.stack([np.concatenate([(m[n] - base[n]).ravel() for n in ("a", "b")]) for m in models])
    want = ref.ties_paper(tv, 0.3, lam=0.7)
    got = np.concatenate([(np.asarray(out[n], np.float64) - base[n]).ravel() for n in ("a", "b")])
    assert ref.relative_error(got, want) < 1e-6


def test_task_arithmetic_and_linear():
    base, deltas = make_models(4)
    w = [0.2, 1.0, 0.7]
    got = merged_delta(base, deltas, method="task_arithmetic", coefficients=w, **{"lambda": 0.3})
    assert ref.relative_error(got, ref.task_arithmetic(_fp32_deltas(base, deltas), w, 0.3)) < 1e-6
    got = merged_delta(base, deltas, method="linear", coefficients=w)
    assert ref.relative_error(got, ref.linear(_fp32_deltas(base, deltas), w)) < 1e-6


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drop_rescale_then_consensus(method):
    base, deltas = make_models(9, k=3, shape=(20, 10))
    p = 0.7
    got = merged_delta(base, deltas, method=method, drop_rate=p, seed=3)
    # DARE's mask is drawn from the leaf's key, one key per row of the leaf (fold_in of the row index), each
    # row drawing its (K, in) numbers: rebuild it
    keys = [jax.random.fold_in(leaf_key(3, "w"), r) for r in range(deltas.shape[1])]
    keep = np.stack([np.asarray(jax.random.uniform(key, (deltas.shape[0], deltas.shape[2]))) for key in keys],
                    axis=1) < np.float32(1 - p)
    dropped = np.where(keep, _fp32_deltas(base, deltas) / (1 - p), 0.0)
    want = ref.task_arithmetic(dropped) if method == "dare_linear" else ref.ties_mergekit(dropped, 1.0)
    assert ref.relative_error(got, want) < 1e-6
    # and about p of the entries were dropped
    assert abs(1 - keep.mean() - p) < 0.05


def test_dare_is_seeded():
    base, deltas = make_models(9)
    a = merged_delta(base, deltas, method="dare_ties", seed=1)
    b = merged_delta(base, deltas, method="dare_ties", seed=1)
    c = merged_delta(base, deltas, method="dare_ties", seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
@pytest.mark.parametrize("rank", [3, 9, 40])
def test_low_rank_deltas_take_a_truncated_joint_space(direction, rank):
    """Rank 3 and 9 run in the 8- and 32-row branches of the 40-row joint space, rank 40 in the full one."""
    rng = np.random.default_rng(rank)
    k, n, m = 4, 40, 12
    left = rng.standard_normal((n, rank)) if direction == "horizontal" else rng.standard_normal((k * n, rank))
    right = rng.standard_normal((rank, k * m)) if direction == "horizontal" else rng.standard_normal((rank, m))
    stacked = (left * np.geomspace(1.0, 0.05, rank)) @ right
    if direction == "horizontal":
        deltas = np.stack(np.split(stacked, k, axis=1)).astype(np.float32)
    else:
        deltas = np.stack(np.split(stacked, k, axis=0)).astype(np.float32)
    base = np.zeros((n, m), np.float32)
    got = merged_delta(base, deltas, method="drm", direction=direction)
    d = deltas.astype(np.float64)
    want = ref.drm_h(d) if direction == "horizontal" else ref.drm_v(d)
    assert ref.relative_error(got, want) < TOL
    # and the plain, untruncated chain of stages gives the same delta
    from drm_jax.math import chain, disjoint_mean, elect_sign, joint_space, merge_deltas, prune, recompose
    from drm_jax.math import renormalize, scale_by_coefficients

    plain = chain(joint_space(direction), renormalize(), prune(0.2), elect_sign(), scale_by_coefficients(),
                  disjoint_mean(), recompose())
    untruncated = np.asarray(jax.jit(lambda x: merge_deltas(plain, x))(jnp.asarray(deltas)), np.float64)
    assert ref.relative_error(got, untruncated) < TOL
