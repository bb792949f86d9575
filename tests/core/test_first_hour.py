"""What a new user meets in the first hour (issue 27): silent choices refused or made visible, the merge
inside the user's own jax.jit, errors that say what is wrong."""

import jax
import numpy as np
import pytest

import drm_jax
from drm_jax.errors import MergeInputError


def _trees(k: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = {"layers": {"0": {"proj": {"weight": rng.normal(size=(6, 4)).astype(np.float32)},
                             "norm": rng.normal(size=(4,)).astype(np.float32)}}}
    models = [jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), base) for _ in range(k)]
    return base, models


# -- errors that mislead (point 5) ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ties", "drm"])
def test_density_and_drop_rate_together_are_one_parameter(method):
    base, models = _trees()
    with pytest.raises(MergeInputError) as err:
        drm_jax.merge(base, models, method=method, density=0.5, drop_rate=0.5)
    assert "density and drop_rate are the same parameter (density = 1 - drop_rate); give one" in str(err.value)


def test_one_tree_in_place_of_models_is_named():
    base, models = _trees()
    with pytest.raises(MergeInputError, match=r"^models must be a list of trees, got a dict"):
        drm_jax.merge(base, models[0], method="task_arithmetic")
    # a list (or tuple) of dict trees is the right form
    out = drm_jax.merge(base, tuple(models), method="task_arithmetic")
    np.testing.assert_allclose(out["layers"]["0"]["norm"], models[0]["layers"]["0"]["norm"]
                               + models[1]["layers"]["0"]["norm"] - base["layers"]["0"]["norm"], rtol=1e-5)


# -- inside the user's program (point 4) ----------------------------------------------------------------
@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("dare_ties", {"density": 0.5, "seed": 3})])
def test_fused_merge_inside_users_jit_equals_eager(method, params):
    base, models = _trees(3)
    eager = drm_jax.merge(base, models, method=method, **params)
    jitted = jax.jit(lambda b, ms: drm_jax.merge(b, ms, method=method, **params))(base, models)
    for want, got in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_drm_inside_users_jit_says_prepare_outside():
    base, models = _trees(3)
    with pytest.raises(MergeInputError, match=r"call drm_jax\.prepare\(base, models, \.\.\.\) outside the jit and "
                                              r"prepared\.merge\(\.\.\.\) inside it"):
        jax.jit(lambda b, ms: drm_jax.merge(b, ms, method="drm"))(base, models)
    # what the message says works: prepared outside, merged inside (numbers concrete or traced)
    prepared = drm_jax.prepare(base, models, method="drm")
    eager = prepared.merge(drop_rate=0.3)
    for jitted in (jax.jit(lambda: prepared.merge(drop_rate=0.3))(),
                   jax.jit(lambda c: prepared.merge(coefficients=c, drop_rate=0.3))(np.ones(3, np.float32))):
        for want, got in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


# -- silent choices (point 3) ---------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["include", "exclude", "ignore"])
def test_a_pattern_that_matches_no_leaf_is_named(option):
    base, models = _trees()
    with pytest.raises(MergeInputError, match=rf"^{option} pattern 'layer_0' matches no leaf name"):
        drm_jax.merge(base, models, method="drm", **{option: ["layer_0"]})  # the leaves are `layers.0...`


def test_default_exclusions_need_not_match():
    """The default exclusions name many architectures' embeddings: a tree without them merges, and a
    user's list that keeps them (plus a pattern that does match) is checked on its own pattern only."""
    base, models = _trees()
    plain = drm_jax.merge(base, models, method="drm")  # no embedding, no head: nothing matches the defaults
    extended = drm_jax.merge(base, models, method="drm", exclude=list(drm_jax.engine.DEFAULT_EXCLUDE) + ["norm"])
    for want, got in zip(jax.tree.leaves(plain), jax.tree.leaves(extended)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(MergeInputError, match="'typo'"):
        drm_jax.merge(base, models, method="drm", exclude=list(drm_jax.engine.DEFAULT_EXCLUDE) + ["typo"])


@pytest.mark.parametrize("extra, message", [("", None), ("parameters: {exclude: [typo_proj]}\n", "parameters.exclude"),
                                            ("parameters: {include: [down_proj], ignore: [nonorm]}\n",
                                             "parameters.ignore")])
def test_config_pattern_that_matches_no_tensor_is_refused(tmp_path, capsys, extra, message):
    from safetensors.numpy import save_file

    from drm_jax.cli.main import main

    rng = np.random.default_rng(0)
    base = {"model.layers.0.mlp.down_proj.weight": rng.normal(size=(6, 4)).astype(np.float32),
            "model.layers.0.input_layernorm.weight": rng.normal(size=(4,)).astype(np.float32)}
    for i, name in enumerate(("base", "a", "b")):
        (tmp_path / name).mkdir()
        save_file({n: x + 0.1 * i for n, x in base.items()}, str(tmp_path / name / "model.safetensors"),
                  metadata={"format": "pt"})
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: drm\nbase_model: {tmp_path / 'base'}\nmodels: [{{model: {tmp_path / 'a'}}}, "
                      f"{{model: {tmp_path / 'b'}}}]\n" + extra)
    code = main(["merge", str(config), str(tmp_path / "out"), "--quiet"])
    if message is None:  # the default exclusions match nothing here: no error
        assert code == 0 and (tmp_path / "out" / "model.safetensors").is_file()
    else:
        err = capsys.readouterr().err
        assert code == 2 and f"{message} pattern" in err and "matches no tensor" in err, err
        assert not (tmp_path / "out").exists()


def test_flax_kernels_take_flax_layout_when_none_is_given():
    """Leaves named `kernel` are Flax's (in, out) unless the caller says otherwise; `weight`s stay (out, in)."""
    rng = np.random.default_rng(1)
    base = {"Dense_0": {"kernel": rng.normal(size=(6, 4)).astype(np.float32),
                        "bias": rng.normal(size=(4,)).astype(np.float32)}}
    models = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), base) for _ in range(3)]
    merge = lambda **kw: np.asarray(drm_jax.merge(base, models, method="drm", drop_rate=0.5, **kw)["Dense_0"]["kernel"])
    inferred, flax, torch = merge(), merge(layout="flax"), merge(layout="torch")
    np.testing.assert_array_equal(inferred, flax)
    assert np.max(np.abs(flax - torch)) > 1e-3  # the choice matters here, so the test can fail
    # the same weights under a PyTorch name keep the (out, in) reading
    as_torch = lambda t: {"Dense_0": {"weight": t["Dense_0"]["kernel"], "bias": t["Dense_0"]["bias"]}}
    torch_named = drm_jax.merge(as_torch(base), [as_torch(m) for m in models], method="drm", drop_rate=0.5)
    np.testing.assert_array_equal(np.asarray(torch_named["Dense_0"]["weight"]), torch)
