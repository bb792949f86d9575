"""TSV-M, Iso-C and Iso-CTS against float64 NumPy references written from the papers, and their invariants.

References: TSV-M, Gargiulo et al., arXiv 2412.00081; Iso-C / Iso-CTS, Marczak et al., arXiv 2502.04959
(SPEC, "The subspace family beside DRM"). The references compute polar(A) = A (A^T A)^{-1/2} by an
eigendecomposition, not by the SVD the implementation uses.

Invariants: all three are invariant to the task order (none of them is order-dependent), equivariant
under D_t -> Q D_t R for orthogonal Q and R (so the SVD's sign and basis conventions cannot matter), and
agree with a reference whose SVD signs are flipped at random.
"""

import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from drm_jax.math.mean import scale_by_coefficients
from drm_jax.math.space import joint_space
from drm_jax.math.state import chain, init_state, merge_deltas
from drm_jax.math.subspace import (iso_c, iso_c_stage, iso_cts, iso_cts_sizes, iso_cts_stage, polar, tsv_budget,
                                   tsv_m_stage, tsv_merge)

PROPERTY = settings(max_examples=20, deadline=None)
RTOL = 1e-4  # float32 implementation against float64 references, well-conditioned full-rank inputs


# ---------------------------------------------------------------- float64 references, from the papers

def ref_polar(a):
    """A (A^T A)^{-1/2} (full column rank), or its transpose form for a wide A."""
    if a.shape[0] < a.shape[1]:
        return ref_polar(a.T).T
    w, v = np.linalg.eigh(a.T @ a)
    return a @ (v / np.sqrt(w)) @ v.T


def ref_svd(d, flips=None):
    """Thin SVD with the sign of every triplet flipped where `flips` says (any sign convention is valid)."""
    u, s, vh = np.linalg.svd(d, full_matrices=False)
    if flips is not None:
        f = np.where(np.asarray(flips[: s.size]), -1.0, 1.0)
        u, vh = u * f, vh * f[:, None]
    return u, s, vh


def ref_tsv(deltas, alpha=1.0, flips=None):
    k_tasks, n, m = deltas.shape
    k = int(min(n, m) * (1 / k_tasks))
    us, ss, vs = [], [], []
    for t, d in enumerate(deltas):
        u, s, vh = ref_svd(d, None if flips is None else flips[t])
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)
    u, s, v = np.hstack(us), np.concatenate(ss), np.hstack(vs)
    return alpha * ref_polar(u) @ np.diag(s) @ ref_polar(v).T


def ref_iso_c(deltas, alpha=1.0):
    total = deltas.sum(0)
    s = np.linalg.svd(total, compute_uv=False)
    return alpha * s.mean() * ref_polar(total)  # U V^T of D_TA is its polar factor


def ref_iso_cts(deltas, alpha=1.0, f=0.8, flips=None):
    k_tasks, n, m = deltas.shape
    r = min(n, m)
    c = r - round((r - int(f * r)) / k_tasks) * k_tasks
    p = (r - c) // k_tasks
    u, s, vh = ref_svd(deltas.sum(0), None if flips is None else flips[0])
    uc, sc, vc = u[:, :c], s[:c], vh[:c].T
    us, ss, vs = [uc], [sc], [vc]
    for t, d in enumerate(deltas):
        ut, st_, vth = ref_svd(d - uc @ uc.T @ d, None if flips is None else flips[t + 1])
        us.append(ut[:, :p]), ss.append(st_[:p]), vs.append(vth[:p].T)
    sigma_bar = np.concatenate(ss).mean()
    return alpha * sigma_bar * ref_polar(np.hstack(us)) @ ref_polar(np.hstack(vs)).T


def well_conditioned(rng, k, n, m, low=1.0, high=3.0):
    """K deltas with random singular vectors and singular values spread evenly over [low, high]."""
    r = min(n, m)
    out = []
    for _ in range(k):
        u, _ = np.linalg.qr(rng.standard_normal((n, r)))
        v, _ = np.linalg.qr(rng.standard_normal((m, r)))
        out.append(u @ np.diag(np.linspace(high, low, r) * rng.uniform(0.9, 1.1)) @ v.T)
    return np.stack(out)


def rel_err(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def f32(x):
    return jnp.asarray(x, jnp.float32)


METHODS = {
    "tsv_m": (tsv_merge, ref_tsv),
    "iso_c": (iso_c, ref_iso_c),
    "iso_cts": (iso_cts, ref_iso_cts),
}
# property tests call the compiled functions on a few shapes, so each shape compiles once
JITTED = {name: jax.jit(fn) for name, (fn, _) in METHODS.items()}
# (K, n, m): tall, wide, square; K = 4 does not divide r = 10 (TSV-M drops the leftover directions)
SHAPES = [(3, 12, 9), (2, 8, 14), (4, 10, 10)]


# ---------------------------------------------------------------- agreement with the references

@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference_jitted_and_not(name, shape):
    fn, ref = METHODS[name]
    deltas = well_conditioned(np.random.default_rng(sum(shape)), *shape)
    want = ref(deltas, 0.7)
    assert rel_err(fn(f32(deltas), 0.7), want) < RTOL
    assert rel_err(jax.jit(fn)(f32(deltas), jnp.float32(0.7)), want) < RTOL  # alpha traced


@pytest.mark.parametrize("name", sorted(METHODS))
def test_vmapped_over_layers_matches_reference(name):
    fn, ref = METHODS[name]
    rng = np.random.default_rng(7)
    layers = np.stack([well_conditioned(rng, 3, 9, 12) for _ in range(4)])  # (L, K, n, m)
    got = jax.jit(jax.vmap(fn, in_axes=(0, None)))(f32(layers), jnp.float32(1.3))
    for layer, out in zip(layers, np.asarray(got)):
        assert rel_err(out, ref(layer, 1.3)) < RTOL


def test_iso_cts_other_common_fractions_match_reference():
    deltas = well_conditioned(np.random.default_rng(3), 3, 16, 12)
    for f in (0.0, 0.5):
        assert rel_err(iso_cts(f32(deltas), 1.0, f), ref_iso_cts(deltas, 1.0, f)) < RTOL, f


def test_polar_is_the_nearest_orthonormal_matrix():
    a = np.random.default_rng(0).standard_normal((7, 4))
    got = np.asarray(polar(f32(a)), np.float64)
    np.testing.assert_allclose(got.T @ got, np.eye(4), atol=1e-5)
    assert rel_err(got, ref_polar(a)) < 1e-5
    wide = np.asarray(polar(f32(a.T)), np.float64)
    np.testing.assert_allclose(wide @ wide.T, np.eye(4), atol=1e-5)


# ---------------------------------------------------------------- sizes, as fusion-bench rounds them

def test_sizes_follow_the_reference_rounding():
    assert iso_cts_sizes(768, 8, 0.8) == (616, 19)  # ViT-B/32 width, 8 tasks: int(614.4) = 614, 19.25 -> 19
    assert iso_cts_sizes(50, 4, 0.8) == (42, 2)  # 10 / 4 = 2.5 rounds half to even: 2
    assert iso_cts_sizes(10, 4, 0.8) == (10, 0)  # 2 / 4 = 0.5 -> 0: no task-specific part
    assert iso_cts_sizes(12, 3, 0.0) == (0, 4)
    assert tsv_budget(768, 8) == 96 and tsv_budget(10, 3) == 3
    assert tsv_budget(49, 49) == 0  # int(49 * (1/49)) = int(0.999...) in the reference, not 49 // 49
    with pytest.raises(ValueError, match="common_fraction"):
        iso_cts_stage(common_fraction=1.5)
    with pytest.raises(ValueError, match="negative common"):
        iso_cts_sizes(3, 2, 0.0)  # round(1.5) * 2 = 4 > 3


def test_tsv_with_more_tasks_than_rank_is_zero():
    deltas = well_conditioned(np.random.default_rng(0), 5, 4, 3)  # r = 3 < K: k = 0
    np.testing.assert_array_equal(np.asarray(tsv_merge(f32(deltas))), 0.0)


# ---------------------------------------------------------------- invariants (property tests)

# (K, n, m), tiny: one task, tall, wide, square, K not dividing r; few shapes, so compiles are reused
shapes = st.sampled_from([(1, 4, 3), (2, 5, 7), (3, 7, 5), (4, 6, 6), (3, 8, 8)])


@PROPERTY
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_task_order_does_not_matter(shape, seed, data):
    deltas = well_conditioned(np.random.default_rng(seed), *shape)
    perm = np.asarray(data.draw(st.permutations(range(shape[0]))))
    for name, fn in JITTED.items():
        assert rel_err(fn(f32(deltas[perm])), np.asarray(fn(f32(deltas)), np.float64)) < 1e-4, name


@PROPERTY
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_orthogonal_equivariance(shape, seed):
    """f(Q D_t R) = Q f(D) R: rotating the inputs changes every SVD the solver returns, never the merge."""
    rng = np.random.default_rng(seed)
    k, n, m = shape
    deltas = well_conditioned(rng, k, n, m)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    r, _ = np.linalg.qr(rng.standard_normal((m, m)))
    for name, fn in JITTED.items():
        merged = np.asarray(fn(f32(deltas)), np.float64)
        assert rel_err(fn(f32(q @ deltas @ r)), q @ merged @ r) < 1e-4, name
        assert rel_err(fn(f32(-deltas)), -merged) < 1e-5, name  # Q = -I: every singular vector flips


@PROPERTY
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_any_svd_sign_convention_gives_the_same_merge(shape, seed, data):
    k, n, m = shape
    deltas = well_conditioned(np.random.default_rng(seed), k, n, m)
    flips = data.draw(st.lists(st.lists(st.booleans(), min_size=min(n, m), max_size=min(n, m)),
                               min_size=k + 1, max_size=k + 1))
    assert rel_err(JITTED["tsv_m"](f32(deltas)), ref_tsv(deltas, flips=flips)) < RTOL
    assert rel_err(JITTED["iso_cts"](f32(deltas)), ref_iso_cts(deltas, flips=flips)) < RTOL


@PROPERTY
@given(nm=st.sampled_from([(1, 1), (6, 1), (4, 4), (3, 8)]), seed=st.integers(0, 2**31 - 1),
       alpha=st.floats(0.1, 3.0))
def test_single_task(nm, seed, alpha):
    """K = 1: TSV-M returns alpha D; Iso-C and Iso-CTS both flatten D's own spectrum."""
    d = well_conditioned(np.random.default_rng(seed), 1, *nm)
    alpha32 = jnp.float32(alpha)
    assert rel_err(JITTED["tsv_m"](f32(d), alpha32), alpha * d[0]) < RTOL
    want = alpha * np.linalg.svd(d[0], compute_uv=False).mean() * ref_polar(d[0])
    assert rel_err(JITTED["iso_c"](f32(d), alpha32), want) < RTOL
    assert rel_err(JITTED["iso_cts"](f32(d), alpha32), want) < RTOL


ISO_CTS_FULL_COMMON = jax.jit(lambda d: iso_cts(d, common_fraction=1.0))


@PROPERTY
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_iso_cts_without_task_part_is_iso_c(shape, seed):
    deltas = f32(well_conditioned(np.random.default_rng(seed), *shape))
    want = np.asarray(JITTED["iso_c"](deltas), np.float64)
    assert rel_err(ISO_CTS_FULL_COMMON(deltas), want) < 1e-5  # p = 0
    k, n, m = shape
    if iso_cts_sizes(min(n, m), k, 0.8)[1] == 0:  # the rounding alone can leave p = 0 as well
        assert rel_err(JITTED["iso_cts"](deltas), want) < 1e-5


# ---------------------------------------------------------------- rank-deficient inputs

def low_rank(rng, k, n, m, rank):
    return np.stack([well_conditioned(rng, 1, n, rank)[0] @ np.linalg.qr(rng.standard_normal((m, rank)))[0].T
                     for _ in range(k)])


def test_rank_deficient_tsv_uses_the_nonzero_triplets_only():
    rng = np.random.default_rng(5)
    deltas = low_rank(rng, 2, 12, 10, 2)  # k = 5 per task, but each task has rank 2
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = np.linalg.svd(d)
        us.append(u[:, :2]), ss.append(s[:2]), vs.append(vh[:2].T)
    want = ref_polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ ref_polar(np.hstack(vs)).T
    assert rel_err(tsv_merge(f32(deltas)), want) < RTOL
    assert rel_err(tsv_merge(f32(deltas[:1])), deltas[0]) < RTOL  # K = 1 still returns D


def test_rank_deficient_iso_keeps_the_span_of_the_sum():
    rng = np.random.default_rng(6)
    deltas = low_rank(rng, 3, 12, 10, 2)  # D_TA has rank 6 < r = 10
    u, s, vh = np.linalg.svd(deltas.sum(0))
    want = s.mean() * u[:, :6] @ vh[:6]  # mean over all r values, U V^T on the nonzero part only
    got = np.asarray(iso_c(f32(deltas)), np.float64)
    assert rel_err(got, want) < RTOL
    assert np.linalg.matrix_rank(got, tol=1e-4 * np.abs(got).max()) == 6
    np.testing.assert_array_equal(np.asarray(iso_c(f32(deltas - deltas[::-1]))), 0.0)  # D_TA = 0


def test_rank_deficient_iso_cts_drops_the_empty_residuals():
    rng = np.random.default_rng(8)
    deltas = low_rank(rng, 2, 12, 12, 3)  # D_TA has rank 6 = c: each residual D_t - U_c U_c^T D_t is 0
    assert iso_cts_sizes(12, 2, 0.5) == (6, 3)
    u, s, vh = np.linalg.svd(deltas.sum(0))
    want = s[:6].sum() / 12 * u[:, :6] @ vh[:6]  # sigma_bar over all r = 12 kept values, 6 of them 0
    got = np.asarray(iso_cts(f32(deltas), common_fraction=0.5), np.float64)
    assert rel_err(got, want) < RTOL


# ---------------------------------------------------------------- merge stages

def test_stages_compose_with_chain():
    rng = np.random.default_rng(11)
    deltas = well_conditioned(rng, 3, 9, 8)
    coefficients = np.array([0.5, 1.0, 2.0])
    for stage, ref in ((tsv_m_stage(0.8), ref_tsv), (iso_c_stage(0.8), ref_iso_c), (iso_cts_stage(0.8), ref_iso_cts)):
        assert rel_err(merge_deltas(stage, f32(deltas)), ref(deltas, 0.8)) < RTOL
        # per-task coefficients scale each D_t before its SVD (fusion-bench's alpha list)
        scaled = merge_deltas(chain(scale_by_coefficients(), stage), f32(deltas), f32(coefficients))
        assert rel_err(scaled, ref(deltas * coefficients[:, None, None], 0.8)) < RTOL
    with pytest.raises(ValueError, match="weight-space"):
        chain(joint_space(), tsv_m_stage())(init_state(f32(deltas)))


def test_stage_with_traced_alpha_under_jit_and_vmap():
    rng = np.random.default_rng(12)
    layers = np.stack([well_conditioned(rng, 2, 6, 6) for _ in range(3)])
    alphas = np.array([0.5, 1.0, 1.5])
    run = jax.jit(jax.vmap(lambda d, a: merge_deltas(iso_cts_stage(a, 0.5), d)))
    for layer, alpha, out in zip(layers, alphas, np.asarray(run(f32(layers), f32(alphas)))):
        assert rel_err(out, ref_iso_cts(layer, alpha, 0.5)) < RTOL


# ---------------------------------------------------------------- derivatives (docs/methods.md#polar-gradient)

def with_spectrum(rng, n, m, spectrum):
    """U diag(spectrum) V^T with random orthonormal U (n, r) and V (m, r)."""
    r = len(spectrum)
    u, _ = np.linalg.qr(rng.standard_normal((n, r)))
    v, _ = np.linalg.qr(rng.standard_normal((m, r)))
    return u @ np.diag(spectrum) @ v.T


def repeated_inputs(rng):
    """(method, deltas, kwargs) whose singular values repeat where the merge is still smooth: TSV-M's kept
    top 3 of each task all equal (a gap below them), Iso-C's summed spectrum in equal pairs, Iso-CTS's
    common top 2 equal (a gap at c = 2)."""
    tsv = np.stack([with_spectrum(rng, 7, 6, [3.0, 3.0, 3.0, 1.0, 1.0, 0.6]) for _ in range(2)])
    u, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    v, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    iso = np.stack([u @ np.diag(s) @ v.T for s in ([2.0, 2.0, 1.0, 1.0, 0.7, 0.7], [1.0, 1.0, 0.5, 0.5, 0.4, 0.4])])
    cts = np.stack([u @ np.diag([4.0, 4.0, 1.2, 0.9, 0.5, 0.3]) @ v.T,
                    with_spectrum(rng, 6, 6, [0.3, 0.25, 0.2, 0.15, 0.1, 0.05])])
    return [("tsv_m", tsv, {}), ("iso_c", iso, {}), ("iso_cts", cts, {"common_fraction": 0.5})]


def _fd_directional(f, x, dx, eps=1e-6):
    return (f(x + eps * dx) - f(x - eps * dx)) / (2 * eps)


def test_plain_svd_derivatives_blow_up_on_these_inputs():
    """The inputs below really are the hard case: jax's own SVD derivative divides by differences of equal
    singular values there (NaN, or ~1e14 where rounding separates them)."""
    with jax.enable_x64(True):
        for _, deltas, _ in repeated_inputs(np.random.default_rng(31)):
            d = jnp.asarray(deltas)
            u_dot = jax.jvp(lambda a: jnp.linalg.svd(a, full_matrices=False)[0], (d,), (jnp.ones_like(d),))[1]
            assert not bool(jnp.all(jnp.isfinite(u_dot))) or float(jnp.max(jnp.abs(u_dot))) > 1e8


@pytest.mark.parametrize("index", [0, 1, 2])
def test_derivatives_are_exact_at_repeated_singular_values(index):
    """float64: the derivative along a random direction of the deltas (which splits the repeated values)
    and the gradient in per-task coefficients equal central finite differences."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(31)
        name, deltas, kwargs = repeated_inputs(rng)[index]
        fn = METHODS[name][0]
        d = jnp.asarray(deltas)
        direction = jnp.asarray(rng.standard_normal(deltas.shape))
        merge = jax.jit(lambda x: fn(x, 1.0, **kwargs))  # jitted: eager dispatch of each stage is slow
        tangent = jax.jit(lambda x, v: jax.jvp(merge, (x,), (v,))[1])(d, direction)
        np.testing.assert_allclose(np.asarray(tangent), np.asarray(_fd_directional(merge, d, direction)),
                                   rtol=1e-6, atol=1e-7)
        weights = jnp.asarray(rng.standard_normal(deltas.shape[1:]))

        @jax.jit
        def loss(c):
            return jnp.sum(weights * fn(d * c[:, None, None], 1.0, **kwargs))

        c = jnp.array([0.8, 1.3])
        grad = np.asarray(jax.jit(jax.grad(loss))(c))
        fd = np.array([_fd_directional(loss, c, jnp.eye(2)[t]) for t in range(2)])
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_gradients_are_finite_on_low_rank_and_orthogonal_deltas(name):
    """Low-rank deltas (many zero singular values, as LoRA's) and orthogonal ones (all equal), float32,
    under jit: finite gradients in the coefficients and in the deltas."""
    rng = np.random.default_rng(32)
    low = np.stack([rng.standard_normal((10, 2)) @ rng.standard_normal((2, 8)) for _ in range(3)])
    ortho = np.stack([np.linalg.qr(rng.standard_normal((8, 8)))[0] for _ in range(3)])
    fn = METHODS[name][0]
    for deltas in (low, ortho):
        d = f32(deltas)
        w = f32(rng.standard_normal(deltas.shape[1:]))
        grad_c = jax.jit(jax.grad(lambda c: jnp.sum(w * fn(d * c[:, None, None]))))(f32([0.5, 1.0, 1.5]))
        grad_d = jax.jit(jax.grad(lambda x: jnp.sum(w * fn(x))))(d)
        assert bool(jnp.all(jnp.isfinite(grad_c))) and bool(jnp.all(jnp.isfinite(grad_d)))
        assert float(jnp.max(jnp.abs(grad_c))) > 0


def test_polar_derivative_is_exact_and_finite():
    from drm_jax.math.linalg import polar

    polar_fn = jax.jit(polar)
    with jax.enable_x64(True):
        rng = np.random.default_rng(33)
        for shape in [(7, 4), (4, 7), (5, 5), (2, 6, 3)]:
            a, da = jnp.asarray(rng.standard_normal(shape)), jnp.asarray(rng.standard_normal(shape))
            np.testing.assert_allclose(np.asarray(jax.jvp(polar_fn, (a,), (da,))[1]),
                                       np.asarray(_fd_directional(polar_fn, a, da)), rtol=1e-6, atol=1e-8)
        # orthonormal columns times 2: every singular value equal, still exact
        a = jnp.asarray(2.0 * np.linalg.qr(rng.standard_normal((6, 3)))[0])
        da = jnp.asarray(rng.standard_normal((6, 3)))
        np.testing.assert_allclose(np.asarray(jax.jvp(polar_fn, (a,), (da,))[1]),
                                   np.asarray(_fd_directional(polar_fn, a, da)), rtol=1e-6, atol=1e-8)
        # [A_1 | 0]: the first block's derivative is polar(A_1)'s
        a1 = jnp.asarray(rng.standard_normal((6, 2)))
        block = jnp.concatenate([a1, jnp.zeros((6, 2))], axis=1)
        d1 = jnp.asarray(rng.standard_normal((6, 2)))
        got = jax.jvp(polar_fn, (block,), (jnp.concatenate([d1, jnp.zeros((6, 2))], axis=1),))[1]
        np.testing.assert_allclose(np.asarray(got[:, :2]), np.asarray(jax.jvp(polar_fn, (a1,), (d1,))[1]),
                                   rtol=1e-8, atol=1e-10)
        assert bool(jnp.all(jnp.isfinite(got)))


# ---------------------------------------------------------------- fusion-bench 0.2.33, where importable

@pytest.fixture(scope="module")
def fusion_bench():
    """fusion-bench's TSV-M and Iso-C/CTS modules, loaded from their files.

    fusion_bench/__init__ imports omegaconf, lightning and more; the two files need only torch and
    fusion_bench.utils (lazy), so the package is entered without running its top-level __init__.
    """
    torch = pytest.importorskip("torch", reason="torch")
    spec = importlib.util.find_spec("fusion_bench")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fusion-bench")
    root = spec.submodule_search_locations[0]
    saved = {k: v for k, v in sys.modules.items() if k == "fusion_bench" or k.startswith("fusion_bench.")}
    package = types.ModuleType("fusion_bench")
    package.__path__ = [root]
    sys.modules["fusion_bench"] = package
    modules = {}
    try:
        for name, rel in (("iso", "method/isotropic_merging/iso_utils.py"),
                          ("tsvm", "method/task_singular_vector/utils/TSVM_utils.py")):
            file_spec = importlib.util.spec_from_file_location(f"_fusion_bench_{name}", f"{root}/{rel}")
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
            modules[name] = module
    except ImportError as err:
        pytest.skip(err.name or str(err))
    finally:
        for k in [k for k in sys.modules if k == "fusion_bench" or k.startswith("fusion_bench.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return torch, modules


@pytest.mark.parametrize("shape", [(3, 12, 9), (4, 8, 14)])
def test_agrees_with_fusion_bench(fusion_bench, shape):
    torch, fb = fusion_bench
    deltas = well_conditioned(np.random.default_rng(21), *shape)
    task_vectors = [{"w": torch.from_numpy(d.copy()), "b": torch.from_numpy(d[:, 0].copy())} for d in deltas]
    want_tsv = fb["tsvm"].compute_and_sum_svd_mem_reduction(task_vectors, accelerator="cpu")
    want_c = fb["iso"].iso_c(task_vectors, accelerator="cpu")
    want_cts = fb["iso"].iso_cts(task_vectors, common_space_fraction=0.8, accelerator="cpu")
    assert rel_err(tsv_merge(f32(deltas)), want_tsv["w"].numpy()) < RTOL
    assert rel_err(iso_c(f32(deltas)), want_c["w"].numpy()) < RTOL
    assert rel_err(iso_cts(f32(deltas)), want_cts["w"].numpy()) < RTOL
    # and the references here agree with fusion-bench to float64 accuracy
    assert rel_err(ref_tsv(deltas), want_tsv["w"].numpy()) < 1e-10
    assert rel_err(ref_iso_cts(deltas), want_cts["w"].numpy()) < 1e-10
    np.testing.assert_allclose(want_tsv["b"].numpy(), deltas[:, :, 0].mean(0), atol=1e-12)  # 1-D: the mean
