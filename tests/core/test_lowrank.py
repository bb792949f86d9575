"""LoRA joint spaces in factored form against the dense stack (float64 NumPy), and merged deltas back to LoRA.

The dense reference is the thin SVD of DRM-H's M = [s_1 B_1 A_1 | ... | s_K B_K A_K] (n, K m), or of
DRM-V's vertical stack in the horizontal form of the transposed deltas (SPEC, LoRA paragraph).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from drm_jax.math.elect import elect_sign
from drm_jax.math.lowrank import joint_space_lora, lora_deltas, to_lora_factors
from drm_jax.math.mean import disjoint_mean
from drm_jax.math.space import joint_space, recompose, renormalize
from drm_jax.math.sparsify import prune
from drm_jax.math.state import MergeState, chain, init_state

PROPERTY = settings(max_examples=20, deadline=None)
RTOL = 1e-5


def lora(rng, k, n, m, r):
    b = rng.standard_normal((k, n, r))
    a = rng.standard_normal((k, r, m)) / np.sqrt(m)
    scales = rng.uniform(0.5, 2.0, k)
    return b, a, scales


def ref_deltas(b, a, scales):
    return scales[:, None, None] * np.einsum("tnr,trm->tnm", b, a)


def ref_joint(deltas, direction):
    """(U, S, P) of the dense stack, float64; P_t = U^T D_t (of D_t^T for the vertical direction)."""
    if direction == "vertical":
        deltas = np.swapaxes(deltas, 1, 2)
    k, n, m = deltas.shape
    u, s, _ = np.linalg.svd(np.hstack(list(deltas)), full_matrices=False)
    return u, s, np.einsum("nq,tnm->tqm", u, deltas)


def rel_err(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def sign_aligned(got, want):
    """got's columns with the sign that best matches want's (SVD columns are unique up to sign)."""
    got = np.asarray(got, np.float64)
    return got * np.where(np.sum(got * want, axis=0) < 0, -1.0, 1.0)


def f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
@pytest.mark.parametrize("shape", [(3, 24, 16, 2), (2, 10, 30, 3), (4, 40, 8, 1)])  # (K, n, m, r)
def test_factored_joint_space_equals_dense(direction, shape):
    k, n, m, r = shape
    b, a, scales = lora(np.random.default_rng(sum(shape)), *shape)
    space = joint_space_lora(*f32(b, a, scales), direction=direction)
    u, s, p = ref_joint(ref_deltas(b, a, scales), direction)
    q = k * r
    assert space.basis.shape == (u.shape[0], q) and space.coordinates.shape == (k, q, p.shape[2])
    np.testing.assert_allclose(np.asarray(space.singular_values), s[:q], rtol=RTOL)
    assert s[q:].max(initial=0.0) < 1e-10 * s[0]  # the dense stack has nothing past K r
    us_ref = u[:, :q] * s[:q]
    assert rel_err(sign_aligned(space.basis * space.singular_values, us_ref), us_ref) < RTOL
    # recomposed: U P_t = D_t (of D_t^T vertically), whatever the signs
    want = np.einsum("nq,tqm->tnm", u[:, :q], p[:, :q])
    assert rel_err(np.einsum("nq,tqm->tnm", space.basis, space.coordinates), want) < RTOL
    np.testing.assert_allclose(np.asarray(space.basis).T @ np.asarray(space.basis), np.eye(q), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(space.valid), s[:q] > 0.01 * s[0])


def test_same_orientation_as_the_dense_stage():
    """The vertical form matches space.joint_space("vertical"): basis (m, q), coordinates (K, q, n)."""
    b, a, scales = lora(np.random.default_rng(1), 3, 12, 9, 2)
    deltas = jnp.asarray(ref_deltas(b, a, scales), jnp.float32)
    for direction in ("horizontal", "vertical"):
        dense = jax.jit(lambda d: joint_space(direction, route="dense")(init_state(d)))(deltas)
        space = joint_space_lora(*f32(b, a, scales), direction=direction)
        q = space.basis.shape[1]
        assert space.basis.shape[0] == dense.basis.shape[0]
        assert space.coordinates.shape[2] == dense.values.shape[2]
        want = np.asarray(dense.basis[:, :q] * dense.row_scale[0, :q], np.float64)
        assert rel_err(sign_aligned(space.basis * space.singular_values, want), want) < RTOL


@PROPERTY
@given(shape=st.sampled_from([(1, 6, 5, 2), (2, 9, 4, 2), (3, 7, 11, 1), (2, 5, 5, 3)]),
       seed=st.integers(0, 2**31 - 1), direction=st.sampled_from(["horizontal", "vertical"]))
def test_factored_products_and_spectrum_equal_dense(shape, seed, direction):
    """Any seed (singular values may be close, so only sign- and rotation-free quantities are compared)."""
    b, a, scales = lora(np.random.default_rng(seed), *shape)
    space = JITTED_SPACE[direction](*f32(b, a, scales))
    u, s, p = ref_joint(ref_deltas(b, a, scales), direction)
    q = space.basis.shape[1]
    np.testing.assert_allclose(np.asarray(space.singular_values), s[:q], rtol=1e-4, atol=1e-5 * s[0])
    want = np.einsum("nq,tqm->tnm", u, p)
    assert rel_err(np.einsum("nq,tqm->tnm", space.basis, space.coordinates), want) < RTOL


JITTED_SPACE = {d: jax.jit(lambda b, a, s, d=d: joint_space_lora(b, a, s, direction=d))
                for d in ("horizontal", "vertical")}


def test_jit_and_vmap_over_layers():
    rng = np.random.default_rng(3)
    layers = [lora(rng, 3, 14, 10, 2) for _ in range(4)]
    b, a, scales = (np.stack(x) for x in zip(*layers))
    spaces = jax.jit(jax.vmap(joint_space_lora))(*f32(b, a, scales))
    for i, layer in enumerate(layers):
        u, s, p = ref_joint(ref_deltas(*layer), "horizontal")
        np.testing.assert_allclose(np.asarray(spaces.singular_values[i]), s[:6], rtol=RTOL)
        want = np.einsum("nq,tqm->tnm", u, p)
        assert rel_err(np.einsum("nq,tqm->tnm", spaces.basis[i], spaces.coordinates[i]), want) < RTOL


def test_lora_deltas_are_the_scaled_products():
    b, a, scales = lora(np.random.default_rng(4), 2, 5, 6, 3)
    assert rel_err(lora_deltas(*f32(b, a, scales)), ref_deltas(b, a, scales)) < 1e-6
    with pytest.raises(ValueError, match="LoRA factors"):
        lora_deltas(*f32(b, a[:, :2], scales))
    with pytest.raises(ValueError, match="direction"):
        joint_space_lora(*f32(b, a, scales), direction="diagonal")


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_drm_stages_run_unchanged_on_the_factored_space(direction):
    """renormalize / prune / elect / mean / recompose on the factored space give the dense merge."""
    b, a, scales = lora(np.random.default_rng(5), 3, 16, 12, 2)
    deltas = jnp.asarray(ref_deltas(b, a, scales), jnp.float32)
    drm = chain(renormalize(), prune(0.3), elect_sign(), disjoint_mean(), recompose())

    @jax.jit
    def dense_merge(d):
        return chain(joint_space(direction, route="dense"), drm)(init_state(d)).merged

    @jax.jit
    def factored_merge(b, a, scales):
        space = joint_space_lora(b, a, scales, direction=direction)
        coords = jnp.where(space.valid[None, :, None], space.coordinates, 0.0)
        state = MergeState(values=coords, coefficients=jnp.ones(3), valid=space.valid, basis=space.basis,
                           row_scale=jnp.broadcast_to(space.singular_values, coords.shape[:2]),
                           transposed=direction == "vertical")
        return drm(state).merged

    dense = dense_merge(deltas)
    factored = factored_merge(*f32(b, a, scales))
    assert factored.shape == deltas.shape[1:]
    assert rel_err(factored, np.asarray(dense, np.float64)) < RTOL


# ---------------------------------------------------------------- merged delta U X -> LoRA factors

def test_full_rank_factors_reproduce_the_delta():
    rng = np.random.default_rng(6)
    u, x = rng.standard_normal((20, 6)), rng.standard_normal((6, 15))  # U need not be orthonormal
    b, a, discarded = to_lora_factors(*f32(u, x))
    assert b.shape == (20, 6) and a.shape == (6, 15)
    assert rel_err(b @ a, u @ x) < RTOL
    assert float(discarded) == 0.0
    b, a, discarded = jax.jit(to_lora_factors, static_argnums=2)(*f32(u, x), 9)  # padded past rank 6
    assert b.shape == (20, 9) and a.shape == (9, 15)
    assert rel_err(b @ a, u @ x) < RTOL and float(discarded) == 0.0
    b, a, discarded = to_lora_factors(*f32(np.zeros((4, 2)), np.zeros((2, 3))), 1)
    assert float(discarded) == 0.0 and not np.any(np.asarray(b @ a))


@PROPERTY
@given(shape=st.sampled_from([(8, 4, 6), (5, 6, 9), (10, 3, 3)]), seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_truncated_factors_are_the_best_approximation(shape, seed, data):
    """Rank-k factors: B A is the Eckart-Young truncation of U X, discarded = sum_{j>k} S_j^2 / sum S_j^2."""
    n, q, m = shape
    rng = np.random.default_rng(seed)
    u, x = rng.standard_normal((n, q)), rng.standard_normal((q, m))
    rank = data.draw(st.integers(1, min(n, q, m)))
    wu, s, vh = np.linalg.svd(u @ x, full_matrices=False)
    b, a, discarded = TO_LORA(*f32(u, x), rank)
    np.testing.assert_allclose(float(discarded), np.sum(s[rank:] ** 2) / np.sum(s**2), rtol=1e-4, atol=1e-6)
    # the best rank-k approximation is unique where S_k > S_{k+1} clearly
    if rank == s.size or s[rank - 1] - s[rank] > 1e-2 * s[0]:
        best = (wu[:, :rank] * s[:rank]) @ vh[:rank]
        assert rel_err(b @ a, best) < 1e-4
    np.testing.assert_allclose(np.linalg.norm(np.asarray(b), axis=0), np.linalg.norm(np.asarray(a), axis=1),
                               rtol=1e-4)  # singular values split evenly between B and A


TO_LORA = jax.jit(to_lora_factors, static_argnums=2)
