"""`wudi` and `regmean` as registered methods (drm_jax/methods/wudi.py, drm_jax/methods/regmean.py;
docs/methods.md#wudi, #regmean, #regmean-plus-plus): drm_jax.merge / prepare / mesh= against the per-weight
math and the float64 references of tests/core/test_learned.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import drm_jax
from compile_count import counting_compiles
from core.test_learned import ref_regmean, ref_wudi
from drm_jax.cli.main import main
from drm_jax.errors import MergeInputError
from drm_jax.methods.registry import METHODS

# two same-shaped weights (one stacked group), one of another shape, a bias and a 1-D norm
SHAPES = {"l0.weight": (6, 4), "l1.weight": (6, 4), "up.weight": (3, 7), "l0.bias": (6,), "norm.weight": (4,)}
WEIGHTS = ("l0.weight", "l1.weight", "up.weight")
K = 3


def tiny_models(seed=0):
    rng = np.random.default_rng(seed)
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    models = [{n: v + (0.05 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in base.items()}
              for _ in range(K)]
    return base, models


def tiny_grams(seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(K):
        grams = {}
        for n in WEIGHTS:
            x = rng.standard_normal((10, SHAPES[n][1]))
            grams[n] = (x.T @ x / 10).astype(np.float32)
        out.append(grams)
    return out


def _task_vectors(base, models, name):
    return np.stack([np.asarray(m[name], np.float64) - base[name] for m in models])


# ------------------------------------------------------------------------------------ wudi

def test_wudi_merge_is_the_float64_loop_per_weight_and_the_mean_elsewhere():
    base, models = tiny_models()
    steps, lr = 12, 1e-3
    merged = drm_jax.merge(base, models, method="wudi", iter_num=steps, learning_rate=lr)
    for name in SHAPES:
        tvs = _task_vectors(base, models, name)
        want = base[name] + (ref_wudi(tvs, steps, lr) if name in WEIGHTS else tvs.mean(0))
        np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
        assert merged[name].dtype == np.float32
    moved = ref_wudi(_task_vectors(base, models, "l0.weight"), steps, lr) - \
        _task_vectors(base, models, "l0.weight").sum(0)
    assert np.abs(moved).max() > 1e-3  # Adam moved away from the start: not a comparison of sums


def test_wudi_defaults_are_fusion_benchs_and_the_listing_names_the_paper(capsys):
    spec = METHODS["wudi"]
    assert {p.name: (p.default, p.traced) for p in spec.params} == {"iter_num": (400, True),
                                                                   "learning_rate": (1e-5, True)}
    assert main(["methods", "wudi"]) == 0
    listing = capsys.readouterr().out
    assert "arXiv 2503.08099" in listing and "iter_num" in listing and "learning_rate" in listing


def test_a_sweep_over_steps_and_rate_compiles_nothing_new():
    base, models = tiny_models(2)
    prepared = drm_jax.prepare(base, models, method="wudi")
    first = prepared.merge(iter_num=3, learning_rate=1e-4)
    with counting_compiles() as count:
        swept = {(s, lr): prepared.merge(iter_num=s, learning_rate=lr) for s in (0, 5, 9) for lr in (1e-4, 1e-3)}
    assert count[0] == 0, f"{count[0]} new compilations over the sweep"
    tvs = _task_vectors(base, models, "up.weight")
    np.testing.assert_allclose(swept[(0, 1e-4)]["up.weight"], base["up.weight"] + tvs.sum(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(swept[(9, 1e-3)]["up.weight"], base["up.weight"] + ref_wudi(tvs, 9, 1e-3),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(swept[(5, 1e-3)]["l1.weight"], first["l1.weight"])


def test_wudi_over_a_mesh_equals_one_device():
    base, models = tiny_models(3)
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("layers",))
    one = drm_jax.merge(base, models, method="wudi", iter_num=7, learning_rate=1e-3)
    sharded = drm_jax.merge(base, models, method="wudi", iter_num=7, learning_rate=1e-3, mesh=mesh)
    for name in SHAPES:
        np.testing.assert_allclose(sharded[name], one[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_wudi_refuses_what_it_does_not_take():
    base, models = tiny_models()
    with pytest.raises(MergeInputError, match="unknown parameter 'coefficients' for method 'wudi'"):
        drm_jax.merge(base, models, method="wudi", coefficients=[1.0] * K)
    with pytest.raises(MergeInputError, match="iter_num"):
        drm_jax.merge(base, models, method="wudi", iter_num=2.5)


# ------------------------------------------------------------------------------------ regmean

@pytest.mark.parametrize("alpha", [0.95, 0.0])
def test_regmean_solves_each_weight_with_its_grams_and_averages_the_rest(alpha):
    base, models = tiny_models(4)
    grams = tiny_grams()
    merged = drm_jax.merge(base, models, method="regmean", grams=grams, reduce_non_diagonal_ratio=alpha)
    for name in SHAPES:
        stacked = np.stack([np.asarray(m[name], np.float64) for m in models])
        if name in WEIGHTS:  # (out, in) torch weights: the closed form on the (in, out) kernels, transposed back
            g = np.stack([gr[name] for gr in grams])
            want = ref_regmean(np.swapaxes(stacked, 1, 2), g, alpha).T
        else:
            want = stacked.mean(0)
        np.testing.assert_allclose(merged[name], want, rtol=1e-4, atol=1e-5, err_msg=name)
    plain_mean = np.mean([m["l0.weight"] for m in models], axis=0)
    assert np.abs(merged["l0.weight"] - plain_mean).max() > 1e-3  # the Grams mattered


def test_regmean_flax_kernels_equal_regmean_merge_and_a_weight_without_grams_is_the_mean():
    base, models = tiny_models(5)
    kernels = {n: v.T.copy() if n in WEIGHTS else v for n, v in base.items()}
    kernel_models = [{n: v.T.copy() if n in WEIGHTS else v for n, v in m.items()} for m in models]
    grams = [{n: g for n, g in gr.items() if n != "up.weight"} for gr in tiny_grams(6)]
    merged = drm_jax.merge(kernels, kernel_models, method="regmean", grams=grams, layout="flax",
                           reduce_non_diagonal_ratio=0.9)
    want = drm_jax.regmean_merge(kernel_models, grams, 0.9)
    for name in SHAPES:
        np.testing.assert_allclose(merged[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(merged["up.weight"], np.mean([m["up.weight"] for m in kernel_models], axis=0),
                               rtol=1e-5, atol=1e-6)


def test_a_sweep_of_the_ratio_compiles_nothing_new():
    base, models = tiny_models(7)
    prepared = drm_jax.prepare(base, models, method="regmean", grams=tiny_grams())
    prepared.merge(reduce_non_diagonal_ratio=0.5)
    with counting_compiles() as count:
        results = [prepared.merge(reduce_non_diagonal_ratio=a) for a in (0.0, 0.3, 1.0)]
    assert count[0] == 0, f"{count[0]} new compilations over the sweep"
    assert not np.allclose(results[0]["l0.weight"], results[-1]["l0.weight"])


def test_regmean_over_a_mesh_equals_one_device():
    base, models = tiny_models(8)
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("layers",))
    one = drm_jax.merge(base, models, method="regmean", grams=tiny_grams())
    sharded = drm_jax.merge(base, models, method="regmean", grams=tiny_grams(), mesh=mesh)
    for name in SHAPES:
        np.testing.assert_allclose(sharded[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_regmean_refusals_name_what_is_wrong():
    base, models = tiny_models()
    grams = tiny_grams()
    with pytest.raises(MergeInputError, match="method 'regmean': grams is required"):
        drm_jax.merge(base, models, method="regmean")
    with pytest.raises(MergeInputError, match="list of 3 dicts"):
        drm_jax.merge(base, models, method="regmean", grams=grams[:2])
    with pytest.raises(MergeInputError, match="'l0.bias', which is not a 2-D weight"):
        drm_jax.merge(base, models, method="regmean", grams=[{**g, "l0.bias": np.eye(6)} for g in grams])
    with pytest.raises(MergeInputError, match=r"grams\[1\]\['up.weight'\] has shape \(3, 3\), expected \(7, 7\)"):
        drm_jax.merge(base, models, method="regmean", grams=[g if t != 1 else {**g, "up.weight": np.eye(3)}
                                                             for t, g in enumerate(grams)])
    with pytest.raises(MergeInputError, match="unknown parameter 'grams' for method 'wudi'"):
        drm_jax.merge(base, models, method="wudi", grams=grams)
    with pytest.raises(MergeInputError, match="unknown parameter 'iter_num' for method 'regmean'"):
        drm_jax.merge(base, models, method="regmean", grams=grams, iter_num=3)
    with pytest.raises(MergeInputError, match="drm_jax.regmean_plusplus"):
        drm_jax.merge(base, models, method="regmean_plusplus")


def test_the_listing_shows_regmean_and_regmean_plusplus_with_their_papers(capsys):
    assert main(["methods", "regmean"]) == 0
    assert main(["methods", "regmean_plusplus"]) == 0
    listing = capsys.readouterr().out
    assert "arXiv 2212.09849" in listing and "arXiv 2508.03121" in listing
    assert listing.count("reduce_non_diagonal_ratio") == 2 and "grams" in listing
