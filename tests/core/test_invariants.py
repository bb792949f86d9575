"""SPEC's invariants as property tests (hypothesis draws shapes, K, seeds and parameters)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import drm_jax
import merge_reference as ref
from drm_jax.engine.compiled import _merge_layers, _prepare_layers
from drm_jax.engine.prepare import rules_for
from drm_jax.math import decompose, elect, mean, sparsify, space
from drm_jax.math.state import chain, init_state
from drm_jax.methods.registry import get_method, static_values, traced_values

TOL = 1e-4
PROPERTY = settings(max_examples=10, deadline=None)

# a few shapes, so compiled programs are reused across examples (each new shape compiles)
shapes = st.sampled_from([(4, 6), (6, 4), (5, 5), (9, 3)])
tasks = st.integers(1, 3)
seeds = st.integers(0, 2**31 - 1)
drops = st.sampled_from([0.0, 0.5, 0.8, 0.9])


def deltas_of(seed, k, shape):
    return np.random.default_rng(seed).standard_normal((k,) + shape).astype(np.float32)


def drm_delta(d, **kw):
    base = np.zeros(d.shape[1:], np.float32)
    return np.asarray(drm_jax.merge({"w": base}, [{"w": x} for x in d], **kw)["w"], np.float64)


@PROPERTY
@given(seed=seeds, k=tasks, shape=shapes, drop=drops, direction=st.sampled_from(["horizontal", "vertical"]))
def test_result_does_not_depend_on_svd_sign_convention(seed, k, shape, drop, direction):
    d = jnp.asarray(deltas_of(seed, k, shape))
    flips = jnp.asarray(np.random.default_rng(seed + 1).choice([-1.0, 1.0], size=min(shape[0], k * shape[1])
                                                                 if direction == "horizontal" else
                                                                 min(shape[1], k * shape[0])))

    def flip(state):  # another valid SVD: U[:, j] -> -U[:, j], Vh[j] -> -Vh[j]
        return state.replace(basis=state.basis * flips[None, :], values=state.values * flips[None, :, None])

    rest = (space.renormalize(), sparsify.prune(1 - drop), elect.elect_sign(), mean.scale_by_coefficients(),
            mean.disjoint_mean(), space.recompose())
    plain = chain(space.joint_space(direction), *rest)
    flipped = chain(space.joint_space(direction), flip, *rest)
    a = jax.jit(lambda x: plain(init_state(x)).merged)(d)
    b = jax.jit(lambda x: flipped(init_state(x)).merged)(d)
    assert ref.relative_error(b, a) < TOL


@PROPERTY
@given(seed=seeds, k=st.integers(2, 3), shape=shapes, drop=drops,
       method=st.sampled_from(["drm", "knots_ties", "ties", "task_arithmetic", "linear"]))
def test_task_order_does_not_matter(seed, k, shape, drop, method):
    d = deltas_of(seed, k, shape)
    perm = np.random.default_rng(seed).permutation(k)
    given = {"drop_rate": drop} if "drop_rate" in drm_jax.methods.get_method(method).names else {}
    a = drm_delta(d, method=method, **given)
    b = drm_delta(d[perm], method=method, **given)
    assert ref.relative_error(b, a) < TOL


@PROPERTY
@given(seed=seeds, k=tasks, shape=shapes, drop=drops)
def test_horizontal_is_vertical_of_transpose(seed, k, shape, drop):
    d = deltas_of(seed, k, shape)
    h = drm_delta(d, direction="horizontal", drop_rate=drop)
    v = drm_delta(np.swapaxes(d, 1, 2), direction="vertical", drop_rate=drop)
    assert ref.relative_error(v.T, h) < TOL


@PROPERTY
@given(seed=seeds, k=tasks, shape=shapes, direction=st.sampled_from(["horizontal", "vertical"]),
       method=st.sampled_from(["drm", "knots_ties", "ties", "dare_ties"]))
def test_flax_layout_is_transpose_of_torch_layout(seed, k, shape, direction, method):
    rng = np.random.default_rng(seed)
    base = {"dense": {"w": rng.standard_normal(shape).astype(np.float32)},
            "norm": {"scale": rng.standard_normal(shape[0]).astype(np.float32)}}
    models = [{"dense": {"w": base["dense"]["w"] + x},
               "norm": {"scale": base["norm"]["scale"] + x[:, 0]}} for x in deltas_of(seed + 1, k, shape)]
    given = {"direction": direction} if "direction" in drm_jax.methods.get_method(method).names else {}
    torch_out = drm_jax.merge(base, models, method=method, layout="torch", **given)
    t = lambda tree: {"dense": {"w": tree["dense"]["w"].T}, "norm": tree["norm"]}
    flax_out = drm_jax.merge(t(base), [t(m) for m in models], method=method, layout="flax", **given)
    np.testing.assert_array_equal(np.asarray(flax_out["dense"]["w"]).T, np.asarray(torch_out["dense"]["w"]))
    np.testing.assert_array_equal(np.asarray(flax_out["norm"]["scale"]), np.asarray(torch_out["norm"]["scale"]))


@settings(max_examples=5, deadline=None)  # eager mode runs op by op: slow
@given(seed=seeds, k=tasks, layers=st.integers(1, 3), shape=shapes,
       method=st.sampled_from(["drm", "knots_ties", "ties", "dare_linear"]))
def test_jit_equals_eager_and_stacked_equals_per_layer(seed, k, layers, shape, method):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((layers,) + shape).astype(np.float32)
    models = rng.standard_normal((layers, k) + shape).astype(np.float32)
    spec = get_method(method)
    static = static_values(spec, {"precision": "float32"} if "precision" in spec.names else {})
    rule = rules_for(spec, static).linear  # the registry's rule, as the engine runs it (no rank bucket)
    hparams = spec.layer_hparams(traced_values(spec, {}), "matrix", shape, k, static)
    coeffs = jnp.ones((layers, k))
    keys = jnp.stack([jax.random.PRNGKey(i) for i in range(layers)])

    def fn(base, models, coeffs, keys, threshold):
        return _merge_layers(rule, _prepare_layers(rule, base, models), base, coeffs, keys, threshold, hparams), None

    eager, _ = fn(base, models, coeffs, keys, None)
    jitted, _ = jax.jit(fn)(base, models, coeffs, keys, None)
    assert ref.relative_error(jitted, eager) < TOL
    for i in range(layers):  # one layer at a time through the same function
        single, _ = fn(base[i:i + 1], models[i:i + 1], coeffs[i:i + 1], keys[i:i + 1], None)
        assert ref.relative_error(single[0], eager[i]) < TOL
