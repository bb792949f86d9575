"""Per-leaf traced hyperparameters (`leaf_params`) and mergekit's compute dtype (`compute_dtype`) in the
engine: per-leaf values give what separate merges with those values give, stacked layers with different
values stay one vmapped program and new values compile nothing, static parameters refuse to vary, and a
float16 / bfloat16 compute dtype reproduces mergekit's arithmetic in that dtype."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import drm_jax
from compile_count import counting_compiles
from drm_jax.engine import executors
from drm_jax.errors import MergeInputError

LAYERS = 4


def trees(seed=0, k=2, scale=0.1):
    rng = np.random.default_rng(seed)
    base = {f"layers.{i}.{w}": (0.05 * rng.standard_normal(s)).astype(np.float32)
            for i in range(LAYERS) for w, s in (("mlp.weight", (12, 8)), ("attn.weight", (8, 8)), ("norm", (8,)))}
    models = [{n: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for n, v in base.items()}
              for _ in range(k)]
    return base, models


# method, shared values, per-leaf values (mergekit's gradient / filter list, resolved per tensor)
CASES = {
    "ties-density-gradient": ("ties", {"density": 0.5, "coefficients": [0.6, 0.4]},
                              {f"layers.{i}.mlp.weight": {"density": [1 - 0.25 * i, 0.5]} for i in range(LAYERS)}),
    "task_arithmetic-weight-filter": ("task_arithmetic", {"coefficients": [0.3, 0.3], "lambda_": 0.9},
                                      {f"layers.{i}.mlp.weight": {"weight": [0.5, 0.1 * i]} for i in range(LAYERS)}),
    "drm-drop-rate": ("drm", {"drop_rate": 0.6}, {"layers.1.attn.weight": {"drop_rate": 0.2, "lambda_": 1.5},
                                                  "layers.3.norm": {"density": 0.9}}),
    "slerp-t-gradient": ("slerp", {"t": 0.5}, {f"layers.{i}.{w}": {"t": i / (LAYERS - 1)}
                                               for i in range(LAYERS) for w in ("mlp.weight", "attn.weight")}),
}


def _models_for(method, models):
    if method not in drm_jax.methods.METHODS:  # slerp comes with the weight-space methods (another change)
        pytest.xfail(f"method {method!r} is not registered in this tree yet")
    return models[:1] if method == "slerp" else models


@pytest.mark.parametrize("case", sorted(CASES))
def test_leaf_values_equal_separate_merges(case):
    method, shared, per_leaf = CASES[case]
    base, models = trees()
    models = _models_for(method, models)
    out = drm_jax.merge(base, models, method=method, leaf_params=per_leaf, **shared)
    prepared = drm_jax.prepare(base, models, method=method)
    reference = prepared.merge(**shared)
    for name in base:
        if name in per_leaf:
            values = dict(shared)
            for k, v in per_leaf[name].items():  # the per-leaf name replaces the shared one it aliases
                values.pop({"weight": "coefficients", "density": "drop_rate"}.get(k, k) if method == "drm" or
                           k == "weight" else k, None)
                values[k] = v
            want = prepared.merge(**values)[name]
        else:
            want = reference[name]
        np.testing.assert_allclose(np.asarray(out[name]), np.asarray(want), rtol=1e-6, atol=1e-7, err_msg=name)
    # the per-leaf values did something: the leaves differ from the shared merge
    assert any(not np.allclose(np.asarray(out[n]), np.asarray(reference[n])) for n in per_leaf)


@pytest.mark.parametrize("case", ["ties-density-gradient", "slerp-t-gradient"])
def test_traced_leaf_values_inside_jit(case):
    """Every per-leaf number traced (the caller's jit): the same result as concrete values."""
    method, shared, per_leaf = CASES[case]
    base, models = trees(1)
    models = _models_for(method, models)
    prepared = drm_jax.prepare(base, models, method=method)
    concrete = prepared.merge(leaf_params=per_leaf, **shared)
    leaves = {n: {k: jnp.asarray(v, jnp.float32) for k, v in vals.items()} for n, vals in per_leaf.items()}

    @jax.jit
    def run(leaves):
        return prepared.merge(leaf_params=leaves, **shared)

    traced = run(leaves)
    for name in base:
        np.testing.assert_allclose(np.asarray(traced[name]), np.asarray(concrete[name]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "drm", "slerp"])
def test_new_leaf_values_compile_nothing(method):
    base, models = trees(2)
    models = _models_for(method, models)
    name = {"ties": "density", "task_arithmetic": "coefficients", "drm": "drop_rate", "slerp": "t"}[method]
    grid = [[0.2, 0.5, 0.7, 0.9], [0.9, 0.1, 0.4, 0.6], [0.3, 0.3, 0.8, 0.5]]
    prepared = drm_jax.prepare(base, models, method=method)

    def leaf(values):  # one value per layer: the layers of one group take four different values
        out = {}
        for i, v in enumerate(values):
            for w in ("mlp.weight", "attn.weight", "norm"):
                out[f"layers.{i}.{w}"] = {name: [v, 1 - v] if name == "coefficients" else v}
        return out

    first = prepared.merge(leaf_params=leaf(grid[0]))
    with counting_compiles() as count:
        later = [prepared.merge(leaf_params=leaf(g)) for g in grid[1:]]
        prepared.merge(leaf_params={"layers.0.norm": {name: [0.5, 0.5] if name == "coefficients" else 0.5}})
    assert count[0] == 0, f"{count[0]} compilations for new per-leaf values"
    assert not np.allclose(np.asarray(first["layers.1.mlp.weight"]), np.asarray(later[0]["layers.1.mlp.weight"]))


def test_one_program_per_group_with_different_values():
    """Four layers of one group, four different densities: still one merge program for the group (the values
    are stacked on the layer axis and vmapped with the layers)."""
    base = {f"layers.{i}.w": np.random.default_rng(i).standard_normal((6, 5)).astype(np.float32) for i in range(4)}
    models = [{n: v + 0.1 for n, v in base.items()}, {n: v - 0.2 * (i + 1) for i, (n, v) in enumerate(base.items())}]
    prepared = drm_jax.prepare(base, models, method="drm", drop_rate=0.5)
    calls = []
    original = executors.merge_layers_jit

    def spy(*args, **kwargs):
        calls.append(kwargs.get("per_member"))
        return original(*args, **kwargs)

    executors.merge_layers_jit, saved = spy, executors.merge_layers_jit
    try:
        prepared.merge(leaf_params={f"layers.{i}.w": {"drop_rate": 0.2 * i} for i in range(4)})
    finally:
        executors.merge_layers_jit = saved
    assert calls == [True]


def test_leaf_values_over_a_mesh_equal_one_device():
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("layers",))
    method, shared, per_leaf = CASES["ties-density-gradient"]
    base, models = trees(3)
    one = drm_jax.merge(base, models, method=method, leaf_params=per_leaf, **shared)
    split = drm_jax.merge(base, models, method=method, leaf_params=per_leaf, mesh=mesh, **shared)
    for name in base:
        np.testing.assert_allclose(np.asarray(split[name]), np.asarray(one[name]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("leaf_params, message", [
    ({"layers.0.norm": {"normalize": False}}, r"leaf_params\['layers.0.norm'\].normalize: a static"),
    ({"layers.0.norm": {"trim_scope": "model"}}, r"leaf_params\['layers.0.norm'\].trim_scope: a static"),
    ({"layers.9.norm": {"density": 0.5}}, r"leaf_params: no leaf named 'layers.9.norm'"),
    ({"layers.0.norm": {"density": 1.5}}, r"leaf_params\['layers.0.norm'\].density: must be in \[0, 1\]"),
    ({"layers.0.norm": {"bogus": 1}}, r"unknown parameter 'bogus'"),
])
def test_bad_leaf_values_name_the_leaf_and_key(leaf_params, message):
    base, models = trees()
    with pytest.raises(MergeInputError, match=message):
        drm_jax.merge(base, models, method="ties", leaf_params=leaf_params)


def test_whole_model_trim_takes_one_density():
    base, models = trees()
    with pytest.raises(MergeInputError, match=r"density: the whole-model trim takes one threshold"):
        drm_jax.merge(base, models, method="ties", trim_scope="model", leaf_params={"layers.0.norm": {"density": 0.3}})


def test_ignored_leaf_takes_no_values():
    base, models = trees()
    with pytest.raises(MergeInputError, match=r"the leaf is not merged"):
        drm_jax.merge(base, models, method="ties", ignore=["norm"], leaf_params={"layers.0.norm": {"density": 0.3}})


# -- compute dtype: mergekit's `dtype` --------------------------------------------------------------------
def _mergekit(base, models, name, method, parameters, dtype):
    torch = pytest.importorskip("torch")
    api = pytest.importorskip("mergekit.merge_methods.api")
    ids = ["base"] + [f"m{t}" for t in range(len(models))]
    tensors = [torch.from_numpy(base[name])] + [torch.from_numpy(m[name]) for m in models]
    out = api.merge_tensors(tensors, method, parameters=parameters, base_index=0, ids=ids, dtype=dtype)
    return out.float().numpy()


def _rounded(x, dtype):
    import ml_dtypes

    return np.asarray(x).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16).astype(np.float32)


def _trim_ties(base, model, name, density, dtype):
    """Entries at a model's k-th largest rounded magnitude when it is tied (mergekit keeps one of them)."""
    mag = np.abs(_rounded(_rounded(model[name], dtype) - _rounded(base[name], dtype), dtype)).ravel()
    k = max(1, int(density * mag.size))
    kth = np.sort(mag)[::-1][k - 1]
    return (mag == kth).reshape(base[name].shape) if np.sum(mag >= kth) > k else np.zeros(base[name].shape, bool)


@pytest.mark.optional
@pytest.mark.parametrize("method, normalize, dtype", [("ties", True, "float16"), ("ties", False, "bfloat16"),
                                                      ("task_arithmetic", True, "bfloat16"),
                                                      ("task_arithmetic", False, "float16")])
def test_half_compute_dtype_is_mergekits_arithmetic(method, normalize, dtype):
    """mergekit casts inputs to its `dtype` and runs task arithmetic and TIES in it, rounding every
    operation: the same numbers, bit for bit (but for ties at TIES' k-th magnitude)."""
    torch = pytest.importorskip("torch")
    base, models = trees(4, k=3, scale=0.05)
    weights, densities = [0.3, 0.7, 0.45], [0.5, 0.3, 0.8]
    extra = {"density": densities} if method == "ties" else {}
    ours = drm_jax.merge(base, models, method=method, coefficients=weights, lambda_=0.9, normalize=normalize,
                         compute_dtype=dtype, **extra)
    for name in base:
        theirs = _mergekit(base, models, name, method, {"weight": weights, "normalize": normalize, "lambda": 0.9,
                                                        **extra}, getattr(torch, dtype))
        allowed = np.zeros(base[name].shape, bool)
        if method == "ties":
            for m, d in zip(models, densities):
                allowed |= _trim_ties(base, m, name, d, dtype)
        got = np.asarray(ours[name])
        assert got.dtype == np.float32  # the leaves' own dtype; the values are the half dtype's
        assert np.array_equal(got, _rounded(got, dtype))
        assert np.all((got == theirs) | allowed), f"{name}: {int(np.sum((got != theirs) & ~allowed))} differ"


def test_half_compute_dtype_differs_from_one_final_rounding():
    """Rounding each operation matters: a float32 merge of the rounded inputs, rounded once, is another
    result (the reason the bio-merge config differed from mergekit)."""
    base, models = trees(5, k=3, scale=0.05)
    kwargs = dict(method="task_arithmetic", coefficients=[0.3, 0.7, 0.45], lambda_=0.9)
    half = drm_jax.merge(base, models, compute_dtype="float16", **kwargs)
    once = drm_jax.merge({n: _rounded(v, "float16") for n, v in base.items()},
                         [{n: _rounded(v, "float16") for n, v in m.items()} for m in models], **kwargs)
    differ = sum(int(np.sum(np.asarray(half[n]) != _rounded(once[n], "float16"))) for n in base)
    assert differ > 0


def test_compute_dtype_float32_is_the_default_for_float32_leaves():
    base, models = trees(6)
    a = drm_jax.merge(base, models, method="ties", density=0.5)
    b = drm_jax.merge(base, models, method="ties", density=0.5, compute_dtype="float32")
    for n in base:
        assert np.array_equal(np.asarray(a[n]), np.asarray(b[n]))
    with pytest.raises(MergeInputError, match="compute_dtype must be one of"):
        drm_jax.merge(base, models, method="ties", compute_dtype="float8")
