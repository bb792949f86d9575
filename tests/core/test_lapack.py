"""drm_jax.math.lapack: jnp.linalg's values, no batched LAPACK call on CPU (but DRM's one `batched_svd`), the
hang that prevents, and the QR-iteration fallback where divide and conquer fails."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drm_jax.math import decompose, lapack, subspace


def _batch(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (3, 7, 5), (2, 3, 5, 7)])
def test_svd_and_qr_equal_jnp_linalg(shape, jit):
    a = _batch(shape)
    svd = jax.jit(lapack.svd) if jit else lapack.svd
    qr = jax.jit(lapack.qr) if jit else lapack.qr
    u, s, vh = svd(a)
    assert [x.shape for x in (u, s, vh)] == [x.shape for x in jnp.linalg.svd(a, full_matrices=False)]
    np.testing.assert_allclose(s, jnp.linalg.svd(a, compute_uv=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose((u * s[..., None, :]) @ vh, a, atol=1e-5)
    q, r = qr(a)
    q2, r2 = jnp.linalg.qr(a)
    assert q.shape == q2.shape and r.shape == r2.shape
    np.testing.assert_allclose(q @ r, a, atol=1e-5)
    np.testing.assert_allclose(jnp.abs(r), jnp.abs(r2), atol=1e-5)


def test_under_vmap_and_jvp():
    a = _batch((4, 3, 6, 5))
    s = jax.jit(jax.vmap(jax.vmap(lambda x: lapack.svd(x)[1])))(a)
    np.testing.assert_allclose(s, jnp.linalg.svd(a, compute_uv=False), rtol=1e-5, atol=1e-5)
    da = _batch(a.shape, 1)
    (_, ours), (_, theirs) = (jax.jvp(lambda x: f(x)[1], (a,), (da,))
                              for f in (lapack.svd, lambda x: jnp.linalg.svd(x, full_matrices=False)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def _lapack_operand_shapes(hlo: str, target: str) -> list[str]:
    """The operand shapes of every LAPACK custom call to `target` in an HLO text."""
    lines = [line for line in hlo.splitlines() if "custom_call_target" in line and target in line]
    return [line.split("operand_layout_constraints={")[1].split("}")[0] for line in lines]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the one-matrix loop is CPU only")
def test_on_cpu_every_lapack_call_gets_one_matrix():
    a = _batch((6, 4, 24, 16))
    hlo = jax.jit(jax.vmap(lambda x: (lapack.svd(x)[0], lapack.qr(x)[0]))).lower(a).as_text(dialect="hlo")
    for target in ("gesdd", "geqrf"):
        operands = _lapack_operand_shapes(hlo, target)
        assert operands, f"no {target} call in the lowered program"
        assert all("[24,16]" in o or "[16,24]" in o for o in operands), operands  # no batch axis
    batched = jax.jit(jax.vmap(lambda x: jnp.linalg.svd(x)[0])).lower(a).as_text(dialect="hlo")
    assert any("[6,4,24,16]" in o for o in _lapack_operand_shapes(batched, "gesdd"))  # what jnp.linalg does


_HANG = textwrap.dedent("""
    import numpy as np, jax, drm_jax
    rng = np.random.default_rng(0)
    base = {f"l{i}": {"a": {"kernel": rng.standard_normal((256, 512)).astype(np.float32)},
                      "b": {"kernel": rng.standard_normal((512, 256)).astype(np.float32)}} for i in range(4)}
    models = [jax.tree.map(lambda b: b + 0.01 * rng.standard_normal(b.shape).astype(np.float32), base)
              for _ in range(4)]
    jax.block_until_ready(drm_jax.merge(base, models, method="iso_cts", layout="flax"))
    print("merged")
""")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="jaxlib's CPU LAPACK kernels")
def test_iso_cts_on_stacked_layers_finishes():
    """With jnp.linalg's batched SVD this merge hung in most runs on 2 cores (Iso-CTS's two polar factors
    waiting on the pool at once); it takes about 10 s."""
    done = subprocess.run([sys.executable, "-c", _HANG], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0 and "merged" in done.stdout, done.stderr[-2000:]


@pytest.fixture
def gesdd_fails(monkeypatch):
    """Make `jnp.linalg.svd` (LAPACK's gesdd on CPU) return what jaxlib returns where gesdd does not
    converge: NaN in every output. The QR iteration (`jax.lax.linalg.svd(..., algorithm=QR)`) still works."""
    original = jnp.linalg.svd

    def failing(a, *args, **kwargs):
        out = original(a, *args, **kwargs)
        return type(out)(*(jnp.full_like(x, jnp.nan) for x in out)) if isinstance(out, tuple) else out * jnp.nan

    monkeypatch.setattr(jnp.linalg, "svd", failing)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fallback is part of the CPU loop")
@pytest.mark.parametrize("jit", [False, True])
def test_svd_falls_back_to_the_qr_iteration_where_divide_and_conquer_fails(jit, request):
    a = _batch((3, 12, 9), seed=2)
    request.getfixturevalue("gesdd_fails")
    svd = jax.jit(lambda x: lapack.svd(x)) if jit else lapack.svd
    u, s, vh = svd(a)
    assert all(bool(jnp.isfinite(x).all()) for x in (u, s, vh))
    np.testing.assert_allclose(s, np.linalg.svd(np.asarray(a), compute_uv=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose((u * s[..., None, :]) @ vh, a, atol=1e-5)
    np.testing.assert_allclose(np.swapaxes(u, -1, -2) @ u, np.broadcast_to(np.eye(9), (3, 9, 9)), atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fallback is part of the CPU loop")
def test_iso_cts_is_finite_where_divide_and_conquer_fails(request):
    # the full text-tasks profile's seed 1 hit this: gesdd failed on Iso-CTS's U* (384 x 384, float32)
    # inside the jitted merge, and the merge was refused as non-finite
    deltas = _batch((4, 16, 12), seed=3)
    expected = subspace.iso_cts(deltas, 1.5, 0.5)
    request.getfixturevalue("gesdd_fails")
    merged = jax.jit(lambda d: subspace.iso_cts(d, 1.5, 0.5))(deltas)
    np.testing.assert_allclose(merged, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_batched_svd_equals_jnp_linalg_under_vmap_and_jvp(jit):
    a = _batch((3, 4, 10, 7), seed=4)
    svd = jax.jit(jax.vmap(lapack.batched_svd)) if jit else jax.vmap(lapack.batched_svd)
    u, s, vh = svd(a)
    np.testing.assert_allclose(s, jnp.linalg.svd(a, compute_uv=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose((u * s[..., None, :]) @ vh, a, atol=1e-5)
    da = _batch(a.shape, 5)
    (_, ours), (_, theirs) = (jax.jvp(lambda x: f(x)[1], (a,), (da,))
                              for f in (lapack.batched_svd, lambda x: jnp.linalg.svd(x, full_matrices=False)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fallback is CPU only")
def test_batched_svd_stays_one_batched_call_and_falls_back_as_a_batch(request):
    a = _batch((6, 4, 24, 16), seed=6)
    hlo = jax.jit(jax.vmap(lapack.batched_svd)).lower(a).as_text(dialect="hlo")
    operands = _lapack_operand_shapes(hlo, "gesdd")
    assert operands and all("[6,4,24,16]" in o for o in operands), operands  # batched, not a loop
    expected = jnp.linalg.svd(a, compute_uv=False)
    request.getfixturevalue("gesdd_fails")
    u, s, vh = jax.jit(jax.vmap(jax.vmap(lapack.batched_svd)))(a)
    np.testing.assert_allclose(s, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose((u * s[..., None, :]) @ vh, a, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fallback is CPU only")
@pytest.mark.parametrize("route", ["dense", "qr"])
def test_drm_joint_space_is_finite_where_divide_and_conquer_fails(route, request):
    layers = _batch((2, 3, 12, 8), seed=7)  # two stacked layers of three tasks' (12, 8) deltas
    space = jax.jit(jax.vmap(lambda d: decompose.joint_space(d, 0.01, route)))
    expected = space(layers)
    request.getfixturevalue("gesdd_fails")
    got = jax.jit(jax.vmap(lambda d: decompose.joint_space(d, 0.01, route)))(layers)
    np.testing.assert_allclose(got.singular_values, expected.singular_values, rtol=1e-5, atol=1e-6)
    rebuilt = jnp.einsum("lnq,lkqm->lknm", got.basis, got.coordinates)
    np.testing.assert_allclose(rebuilt, layers, atol=1e-5)
