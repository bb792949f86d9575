"""The pytree engine: structures, roles, dtypes, robustness, errors, compilation count."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import freeze

import drm_jax
import merge_reference as ref
from drm_jax.buffers import ALIGNMENT
from drm_jax.engine.compiled import _merge_piece, aligned, fused_pieces, merge_deltas_jit
from drm_jax.errors import MergeInputError

# regmean_plusplus is listed, but it merges blocks in order (drm_jax.regmean_plusplus), not by leaf name
METHODS = sorted(m for m in drm_jax.methods.METHODS if m != "regmean_plusplus")


def data_of(method, k):
    """The per-leaf data a method requires (`MethodSpec.leaf_data`), empty: regmean's identity Grams."""
    return {d.name: [{}] * k for d in drm_jax.methods.get_method(method).leaf_data}


def fitted(method, models):
    """As many of the models as the method merges (slerp, nearswap, passthrough: one; nuslerp: two)."""
    most = drm_jax.methods.get_method(method).max_models
    return models[:most] if most else models


def tiny_tree(rng, scale=1.0):
    return {
        "encoder": {
            "layer_0": {"q": {"weight": scale * rng.standard_normal((6, 4))}, "ln": {"bias": scale * rng.standard_normal(6)}},
            "layer_1": {"q": {"weight": scale * rng.standard_normal((6, 4))}, "ln": {"bias": scale * rng.standard_normal(6)}},
        },
        "embed_tokens": {"weight": scale * rng.standard_normal((10, 4))},
        "step": np.array(3, np.int32),
    }


def as_f32(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32) if np.asarray(x).dtype.kind == "f" else x, tree)


@pytest.fixture
def trees():
    rng = np.random.default_rng(0)
    base = as_f32(tiny_tree(rng))
    models = [jax.tree_util.tree_map(lambda b, d: (b + d).astype(b.dtype) if np.asarray(b).dtype.kind == "f" else b,
                                     base, as_f32(tiny_tree(rng, 0.1))) for _ in range(3)]
    return base, models


@pytest.mark.parametrize("method", METHODS)
def test_structure_and_dtypes_follow_the_base(trees, method):
    base, models = trees
    models = fitted(method, models)
    out = drm_jax.merge(base, models, method=method, **data_of(method, len(models)))
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(base)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(base)):
        assert a.shape == np.shape(b) and a.dtype == np.asarray(b).dtype
        assert bool(jnp.all(jnp.isfinite(a))) if a.dtype.kind == "f" else True
    assert int(out["step"]) == 3  # integer leaves keep the base's value


def test_flat_dotted_frozen_and_nnx_trees_give_the_same_result(trees):
    base, models = trees
    nested = drm_jax.merge(base, models)
    flat = lambda t: {".".join(p): v for p, v in _walk(t)}
    dotted = drm_jax.merge(flat(base), [flat(m) for m in models])
    frozen = drm_jax.merge(freeze(base), [freeze(m) for m in models])
    for path, v in _walk(nested):
        np.testing.assert_array_equal(np.asarray(dotted[".".join(path)]), np.asarray(v))
    np.testing.assert_array_equal(np.asarray(frozen["encoder"]["layer_1"]["q"]["weight"]),
                                  np.asarray(nested["encoder"]["layer_1"]["q"]["weight"]))


def _walk(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _walk(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_nnx_state_merges_kernels_in_flax_layout():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(4, 6, rngs=rngs)
            self.b = nnx.Linear(6, 3, rngs=rngs)

    states = [nnx.split(Net(nnx.Rngs(i)))[1] for i in range(4)]
    out = drm_jax.merge(states[0], states[1:], layout="flax")
    assert isinstance(out, nnx.State)
    # the same weights as (out, in) torch matrices give the transposed result
    torch_base = {"a": np.asarray(states[0]["a"]["kernel"][...]).T}
    torch_models = [{"a": np.asarray(s["a"]["kernel"][...]).T} for s in states[1:]]
    want = drm_jax.merge(torch_base, torch_models)["a"]
    np.testing.assert_array_equal(np.asarray(out["a"]["kernel"][...]).T, np.asarray(want))


def test_default_roles_keep_embeddings_out_of_drm(trees):
    base, models = trees
    out = drm_jax.merge(base, models, method="drm")
    # the embedding took the TIES-like path: elect + disjoint mean of the raw deltas
    d = np.stack([m["embed_tokens"]["weight"] - base["embed_tokens"]["weight"] for m in models])
    want = ref.ties_like(d)
    got = np.asarray(out["embed_tokens"]["weight"], np.float64) - base["embed_tokens"]["weight"]
    assert ref.relative_error(got, want) < 1e-6
    # include/exclude override the defaults: with no exclusion the embedding goes through DRM
    out2 = drm_jax.merge(base, models, method="drm", exclude=[])
    assert not np.allclose(np.asarray(out2["embed_tokens"]["weight"]), np.asarray(out["embed_tokens"]["weight"]))


def test_ignore_keeps_base_values(trees):
    base, models = trees
    out = drm_jax.merge(base, models, ignore=[r"layer_1\."])
    np.testing.assert_array_equal(np.asarray(out["encoder"]["layer_1"]["q"]["weight"]),
                                  base["encoder"]["layer_1"]["q"]["weight"])
    assert not np.array_equal(np.asarray(out["encoder"]["layer_0"]["q"]["weight"]),
                              base["encoder"]["layer_0"]["q"]["weight"])


@pytest.mark.parametrize("method", METHODS)
def test_inputs_are_never_modified(trees, method):
    base, models = trees
    models = fitted(method, models)
    before = copy.deepcopy((base, models))
    drm_jax.merge(base, models, method=method, **data_of(method, len(models)))
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves((base, models))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
def test_zero_delta_task_and_all_zero_layer(method, direction):
    rng = np.random.default_rng(1)
    base = {"w": rng.standard_normal((5, 7)).astype(np.float32), "z": np.zeros((4, 4), np.float32)}
    models = [
        {"w": base["w"] + rng.standard_normal((5, 7)).astype(np.float32), "z": base["z"]},
        {"w": base["w"].copy(), "z": base["z"]},  # zero-delta task
    ]
    models = fitted(method, models)
    given = {"direction": direction} if "direction" in drm_jax.methods.get_method(method).names else {}
    out = drm_jax.merge(base, models, method=method, **data_of(method, len(models)), **given)
    assert bool(jnp.all(jnp.isfinite(out["w"])))
    np.testing.assert_array_equal(np.asarray(out["z"]), base["z"])  # all-zero layer stays put
    if method in ("drm", "knots_ties"):
        # the zero task's block is all zeros (no division by its zero norm) and SPEC still counts it in N
        d = np.stack([m["w"] - base["w"] for m in models]).astype(np.float64)
        renorm = method == "drm"
        want = ref.drm_h(d, renormalize=renorm) if direction == "horizontal" else ref.drm_v(d, renormalize=renorm)
        assert ref.relative_error(np.asarray(out["w"], np.float64) - base["w"], want) < 1e-4


def test_single_model_drm_keeps_the_top_of_its_own_spectrum():
    rng = np.random.default_rng(2)
    base = {"w": np.zeros((8, 6), np.float32)}
    d = rng.standard_normal((8, 6)).astype(np.float32)
    out = drm_jax.merge(base, [{"w": d}], drop_rate=0.0)
    # K = 1, nothing pruned: U diag(S) Vh over the rank cut reproduces the delta
    u, s, vh = np.linalg.svd(d.astype(np.float64), full_matrices=False)
    keep = s > 0.01 * s.max()
    np.testing.assert_allclose(np.asarray(out["w"]), (u[:, keep] * s[keep]) @ vh[keep], atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_compute_in_float32(dtype):
    rng = np.random.default_rng(3)
    base32 = rng.standard_normal((6, 5)).astype(np.float32)
    models32 = [base32 + 0.1 * rng.standard_normal((6, 5)).astype(np.float32) for _ in range(3)]
    base = {"w": jnp.asarray(base32, dtype), "b": jnp.asarray(base32[0], dtype)}
    models = [{"w": jnp.asarray(m, dtype), "b": jnp.asarray(m[0], dtype)} for m in models32]
    out = drm_jax.merge(base, models)
    assert out["w"].dtype == dtype and out["b"].dtype == dtype
    # same as merging the upcast values in float32, then casting
    up = lambda t: {k: np.asarray(v, np.float32) for k, v in t.items()}
    want = drm_jax.merge(up(base), [up(m) for m in models])
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(jnp.asarray(want["w"]).astype(dtype)))


@pytest.mark.parametrize("who", [0, 2, None])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_names_the_leaf_and_model(trees, who, bad):
    base, models = copy.deepcopy(trees)
    target = base if who is None else models[who]
    target["encoder"]["layer_1"]["q"]["weight"][2, 1] = bad
    with pytest.raises(MergeInputError, match=r"encoder\.layer_1\.q\.weight.*" +
                       ("the base model" if who is None else f"model {who}")):
        drm_jax.merge(base, models)


def test_mismatched_structures_and_shapes_name_the_leaf(trees):
    base, models = copy.deepcopy(trees)
    del models[1]["encoder"]["layer_0"]["ln"]
    with pytest.raises(MergeInputError, match=r"model 1 has no leaf 'encoder\.layer_0\.ln\.bias'"):
        drm_jax.merge(base, models)
    base, models = copy.deepcopy(trees)
    models[0]["extra"] = np.zeros(3, np.float32)
    with pytest.raises(MergeInputError, match=r"model 0 has a leaf 'extra'"):
        drm_jax.merge(base, models)
    base, models = copy.deepcopy(trees)
    models[2]["encoder"]["layer_1"]["q"]["weight"] = np.zeros((4, 6), np.float32)
    with pytest.raises(MergeInputError, match=r"encoder\.layer_1\.q\.weight.*\(4, 6\).*\(6, 4\)"):
        drm_jax.merge(base, models)


def test_bad_parameters_are_named(trees):
    base, models = trees
    with pytest.raises(MergeInputError, match="unknown merge method 'tie'"):
        drm_jax.merge(base, models, method="tie")
    with pytest.raises(MergeInputError, match="unknown parameter 'densty'"):
        drm_jax.merge(base, models, method="ties", densty=0.3)
    with pytest.raises(MergeInputError, match="drop_rate"):
        drm_jax.merge(base, models, drop_rate=1.5)
    with pytest.raises(MergeInputError, match="2 coefficients given for 3 models"):
        drm_jax.merge(base, models, coefficients=[1.0, 2.0])
    with pytest.raises(MergeInputError, match="direction"):
        drm_jax.merge(base, models, direction="diagonal")


def test_same_shaped_layers_compile_once_per_group():
    rng = np.random.default_rng(4)
    layers = 12
    base = {f"layers.{i}.{name}": rng.standard_normal(shape).astype(np.float32)
            for i in range(layers) for name, shape in [("q", (8, 8)), ("up", (16, 8)), ("down", (8, 16)),
                                                      ("norm", (8,))]}
    models = [{k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
              for _ in range(2)]
    jax.clear_caches()
    drm_jax.merge(base, models, method="drm")
    # 4 groups (q, up, down: DRM; norm: other) -> 4 programs, not 48
    assert merge_deltas_jit._cache_size() == 4
    drm_jax.merge(base, models, method="drm")  # a second merge reuses them
    assert merge_deltas_jit._cache_size() == 4


def test_aligned_copies_only_misaligned_numpy_buffers():
    """XLA's CPU client reads a 64-byte-aligned NumPy buffer in place and copies any other one (slowly):
    `aligned` hands it an aligned copy of the same values, and everything else as it is."""
    buffer = np.arange(2**16 + 64, dtype=np.float32)
    start = (-buffer.ctypes.data % ALIGNMENT) // 4
    misaligned = buffer[start + 4:start + 4 + 2**16].reshape(256, 256)  # 16 bytes past an aligned address
    assert misaligned.ctypes.data % ALIGNMENT == 16
    copy = aligned(misaligned)
    assert copy.ctypes.data % ALIGNMENT == 0 and not np.shares_memory(copy, misaligned)
    np.testing.assert_array_equal(copy, misaligned)
    assert copy.dtype == misaligned.dtype and copy.shape == misaligned.shape
    in_place = buffer[start:start + 2**16]
    assert aligned(in_place) is in_place
    small, device = misaligned[:2, :2], jnp.ones(3)
    assert aligned(small) is small and aligned(device) is device


def test_fused_pieces_are_equal_but_the_last():
    assert fused_pieces(4) == [(0, 4)]
    assert fused_pieces(9) == [(0, 3), (3, 6), (6, 9)]
    assert fused_pieces(10) == [(0, 4), (4, 8), (8, 10)]
    assert fused_pieces(16) == [(0, 4), (4, 8), (8, 12), (12, 16)]


@pytest.mark.parametrize("method, params", [("ties", dict(density=0.3, trim_scope="tensor")),
                                            ("dare_ties", dict(density=0.3, seed=3))])
def test_fused_chunk_merges_in_pieces_sharing_one_program(method, params):
    """16 same-shaped layers: one chunk, merged by one 4-member program called four times (its compile time
    grows with the members), each layer (its own coefficients, its own random key) as it merges alone."""
    rng = np.random.default_rng(6)
    base = {f"layers.{i:02d}.q": rng.standard_normal((8, 8)).astype(np.float32) for i in range(16)}
    models = [{k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
              for _ in range(3)]
    coefficients = rng.uniform(0.5, 2.0, (3, 16)).astype(np.float32)  # (K, layers): per-layer values
    jax.clear_caches()
    merged = drm_jax.merge(base, models, method=method, coefficients=coefficients, **params)
    assert _merge_piece._cache_size() == 1
    for j, name in enumerate(base):
        alone = drm_jax.merge({name: base[name]}, [{name: m[name]} for m in models], method=method,
                              coefficients=coefficients[:, j], **params)
        np.testing.assert_array_equal(np.asarray(merged[name]), np.asarray(alone[name]))


def test_chunked_groups_equal_one_stacked_call():
    rng = np.random.default_rng(5)
    base = {f"l{i}": rng.standard_normal((6, 5)).astype(np.float32) for i in range(7)}
    models = [{k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()} for _ in range(3)]
    whole = drm_jax.merge(base, models)
    # a budget of ~2 layers per call: chunks of 2, the last one padded
    chunked = drm_jax.merge(base, models, max_group_bytes=2 * 4 * 4 * 30)
    for k in base:
        assert ref.relative_error(chunked[k], whole[k]) < 1e-5
