"""Checks independent of the compiled path: a stacked group of layers against an uncompiled float64 NumPy
loop over its layers (tests/merge_reference.py, one layer at a time), and DRM-V on square matrices
against the reference that decomposes the vertical stack [D_1; ...; D_K] itself.

The invariant tests compare jit with eager and H with V of the transpose; both sides of those run the
same code, so a bug shared by both (layers paired with the wrong fine-tuned weights, a transpose lost
on square shapes) passes them. These cannot.
"""

import numpy as np
import pytest

import drm_jax
import merge_reference as ref

TOL = 1e-4
LAYERS, K, SHAPE = 5, 3, (8, 6)
COEFFICIENTS = [1.0, 0.5, 2.0]


def stacked_models(seed):
    """LAYERS same-shaped weights and biases (one stacked group each); each layer's deltas have their
    own scale, so mixing layers up changes the result."""
    rng = np.random.default_rng(seed)
    base, models = {}, [{} for _ in range(K)]
    for i in range(LAYERS):
        for leaf, shape in (("weight", SHAPE), ("bias", SHAPE[:1])):
            name = f"layers.{i}.proj.{leaf}"
            base[name] = rng.standard_normal(shape).astype(np.float32)
            scale = 0.05 * (i + 1)
            for t in range(K):
                models[t][name] = base[name] + (scale * rng.standard_normal(shape)).astype(np.float32)
    return base, models


def layer_deltas(base, models, name):
    # the reference sees exactly the float32 deltas the engine computes
    return np.stack([m[name] - base[name] for m in models]).astype(np.float64)


@pytest.mark.parametrize("method, kwargs", [
    ("drm", {"direction": "horizontal", "drop_rate": 0.7}),
    ("drm", {"direction": "vertical", "drop_rate": 0.7}),
    ("ties", {"density": 0.4}),
])
def test_stacked_group_equals_a_numpy_loop_over_its_layers(method, kwargs):
    base, models = stacked_models(0)
    out = drm_jax.merge(base, models, method=method, coefficients=COEFFICIENTS, **kwargs)
    for i in range(LAYERS):
        for leaf in ("weight", "bias"):
            name = f"layers.{i}.proj.{leaf}"
            d = layer_deltas(base, models, name)
            if method == "ties":
                want = ref.ties_mergekit(d, kwargs["density"], COEFFICIENTS)
            elif leaf == "bias":
                want = ref.ties_like(d, coefficients=COEFFICIENTS)
            elif kwargs["direction"] == "horizontal":
                want = ref.drm_h(d, drop_rate=kwargs["drop_rate"], coefficients=COEFFICIENTS)
            else:
                want = ref.drm_v(d, drop_rate=kwargs["drop_rate"], coefficients=COEFFICIENTS)
            got = np.asarray(out[name], np.float64) - base[name]
            assert ref.relative_error(got, want) < TOL, name


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_drm_vertical_on_square_matrices_matches_the_direct_reference(renormalize, seed):
    """Square deltas: a lost or doubled transpose keeps the shape, only the reference can see it."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((7, 7)).astype(np.float32)
    deltas = (0.1 * rng.standard_normal((K, 7, 7))).astype(np.float32)
    models = [{"w": base + d} for d in deltas]
    kw = dict(drop_rate=0.6, coefficients=COEFFICIENTS, renormalize=renormalize)
    got = np.asarray(drm_jax.merge({"w": base}, models, method="drm", direction="vertical", **kw)["w"],
                     np.float64) - base
    d = np.stack([m["w"] - base for m in models]).astype(np.float64)
    want = ref.drm_v(d, **kw)
    assert ref.relative_error(got, want) < TOL
    # and the vertical reference is not the horizontal one on these inputs (the check is decisive)
    assert ref.relative_error(want, ref.drm_h(d, **kw)) > 100 * TOL
    assert ref.relative_error(want, ref.drm_h(d, **kw).T) > 100 * TOL
