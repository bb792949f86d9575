"""Silent surprises (issue 23, class 8): a gradient over the layers of a model whose config.json has no
layer count, float64 leaves through the Python API, and a float32 overflow inside a decomposition. Each
now gives the right result, or an error that says what happened and names the leaf."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import drm_jax
from drm_jax.errors import MergeInputError

LAYERS = 3


# -- a gradient without num_hidden_layers ------------------------------------------------------------------
def _write_llama(directory: Path, tensors: dict[str, np.ndarray], layer_count) -> None:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4}
    if layer_count != "absent":
        config["num_hidden_layers"] = layer_count
    (directory / "config.json").write_text(json.dumps(config))


def _llama_tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"model.embed_tokens.weight": rng.normal(size=(8, 4)), "model.norm.weight": rng.normal(size=(4,)),
           "lm_head.weight": rng.normal(size=(8, 4))}
    for i in range(LAYERS):
        out[f"model.layers.{i}.mlp.up_proj.weight"] = rng.normal(size=(4, 4))
        out[f"model.layers.{i}.input_layernorm.weight"] = rng.normal(size=(4,))
    return {k: v.astype(np.float32) for k, v in out.items()}


def _gradient_merge(tmp_path: Path, layer_count, weight: str) -> tuple[dict, dict, dict]:
    """(merged, base, task) of task arithmetic, task weight `weight` (YAML), over a 3-layer Llama whose
    config.json gives `layer_count` ("absent": no key)."""
    from safetensors.numpy import load_file

    from drm_jax.cli.main import main

    base, task = _llama_tensors(0), _llama_tensors(1)
    _write_llama(tmp_path / "base", base, layer_count)
    _write_llama(tmp_path / "task", task, layer_count)
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels:\n"
                      f"  - model: {tmp_path / 'task'}\n    parameters: {{weight: {weight}}}\n")
    assert main(["merge", str(config), str(tmp_path / "out")]) == 0
    return load_file(str(tmp_path / "out" / "model.safetensors")), base, task


@pytest.mark.parametrize("layer_count", ["absent", None, "three"])
@pytest.mark.parametrize("weight, inside", [("[0.0, 1.0]", 1.0),
                                            ("[{filter: up_proj, value: [0.0, 1.0]}, {value: 0.25}]", 0.25)])
def test_gradient_without_a_layer_count_takes_it_from_the_tensor_names(tmp_path, layer_count, weight, inside):
    """Layer i of 3 takes t = i / 2 as with num_hidden_layers: 3, not t = 0 (the first value) for every layer."""
    merged, base, task = _gradient_merge(tmp_path, layer_count, weight)
    for i in range(LAYERS):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        expected = base[name] + (i / (LAYERS - 1)) * (task[name] - base[name])
        np.testing.assert_allclose(merged[name], expected, rtol=1e-6, atol=1e-6)
        norm = f"model.layers.{i}.input_layernorm.weight"
        want = inside if "filter" in weight else i / (LAYERS - 1)
        np.testing.assert_allclose(merged[norm], base[norm] + want * (task[norm] - base[norm]), rtol=1e-6, atol=1e-6)
    # outside the layers t = 0: the gradient's first value
    first = 0.25 if "filter" in weight else 0.0
    np.testing.assert_allclose(merged["lm_head.weight"],
                               base["lm_head.weight"] + first * (task["lm_head.weight"] - base["lm_head.weight"]),
                               rtol=1e-6, atol=1e-6)


def test_gradient_agrees_with_and_without_the_layer_count(tmp_path):
    with_count, _, _ = _gradient_merge(tmp_path / "with", LAYERS, "[0.2, 0.9, 0.4]")
    without, _, _ = _gradient_merge(tmp_path / "without", "absent", "[0.2, 0.9, 0.4]")
    assert sorted(with_count) == sorted(without)
    for name in with_count:
        np.testing.assert_array_equal(with_count[name], without[name])


# -- float64 leaves through the API --------------------------------------------------------------------
def _float64_trees():
    rng = np.random.default_rng(3)
    base = {"dense": {"kernel": rng.normal(size=(6, 5)), "bias": rng.normal(size=(5,))},
            "half": rng.normal(size=(3, 3)).astype(np.float16), "step": np.arange(4, dtype=np.int64)}
    models = []
    for _ in range(2):
        models.append({"dense": {"kernel": base["dense"]["kernel"] + 0.1 * rng.normal(size=(6, 5)),
                                 "bias": base["dense"]["bias"] + 0.1 * rng.normal(size=(5,))},
                       "half": (base["half"] + 0.1 * rng.normal(size=(3, 3))).astype(np.float16),
                       "step": base["step"] + 1})
    return base, models


def _dtypes(tree):
    return jax.tree.map(lambda x: np.dtype(x.dtype).name, tree)


WANT = {"dense": {"kernel": "float64", "bias": "float64"}, "half": "float16", "step": "int64"}


@pytest.mark.parametrize("method", ["drm", "task_arithmetic", "ties", "linear"])
@pytest.mark.parametrize("x64", [False, True])
def test_float64_leaves_come_back_as_float64(method, x64):
    base, models = _float64_trees()
    with jax.enable_x64(x64):
        merged = drm_jax.merge(base, models, method=method, layout="flax")
        prepared = drm_jax.prepare(base, models, method=method, layout="flax").merge()
    assert _dtypes(merged) == WANT and _dtypes(prepared) == WANT
    np.testing.assert_array_equal(merged["step"], base["step"])  # not floating: the base's own value
    if x64:  # merged in float64: test_float64_task_arithmetic_under_x64_is_exact_to_float64 checks values
        assert isinstance(merged["dense"]["kernel"], jax.Array)
        return
    # without x64 the merge runs in float32 (JAX holds no float64 array) and the host casts back to float64
    assert isinstance(merged["dense"]["kernel"], np.ndarray)
    as_float32 = [jax.tree.map(lambda x: x.astype(np.float32) if x.dtype == np.float64 else x, t)
                  for t in (base, *models)]
    in_float32 = drm_jax.merge(as_float32[0], as_float32[1:], method=method, layout="flax")
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(merged["dense"][leaf], np.asarray(in_float32["dense"][leaf], np.float64))


def test_float64_task_arithmetic_under_x64_is_exact_to_float64():
    base, models = _float64_trees()
    with jax.enable_x64(True):
        merged = drm_jax.merge(base, models, method="task_arithmetic", coefficients=[0.3, 0.7], lambda_=1.0)
    kernel = base["dense"]["kernel"]
    expected = kernel + 0.3 * (models[0]["dense"]["kernel"] - kernel) + 0.7 * (models[1]["dense"]["kernel"] - kernel)
    np.testing.assert_allclose(np.asarray(merged["dense"]["kernel"]), expected, rtol=1e-12, atol=1e-12)


# -- a float32 overflow inside the merge ---------------------------------------------------------------------
def _huge(scale: float, shape=(6, 8)):
    rng = np.random.default_rng(5)
    base = {"layer": {"w": rng.normal(size=shape).astype(np.float32)}, "b": np.zeros(shape[0], np.float32)}
    models = [{"layer": {"w": (base["layer"]["w"] + scale * rng.normal(size=shape)).astype(np.float32)},
               "b": base["b"]} for _ in range(2)]
    return base, models


@pytest.mark.parametrize("direction, scale", [("horizontal", 1e20), ("vertical", 1e30)])
def test_drm_decomposition_overflow_is_reported_as_such(direction, scale):
    base, models = _huge(scale)
    with pytest.raises(MergeInputError) as info:
        drm_jax.merge(base, models, method="drm", direction=direction, precision="float32")
    message = str(info.value)
    assert "'layer.w'" in message and "decomposition overflowed float32" in message, message
    assert "precision='float64'" in message and "lower the coefficients" not in message
    # and in float64 the same inputs merge
    merged = drm_jax.merge(base, models, method="drm", direction=direction, precision="float64")
    assert np.all(np.isfinite(np.asarray(merged["layer"]["w"])))


@pytest.mark.parametrize("method", ["karcher", "model_stock"])
def test_norms_overflowing_float32_say_the_inputs_are_too_large(method):
    base, models = _huge(1e20)
    with pytest.raises(MergeInputError) as info:
        drm_jax.merge(base, models, method=method)
    message = str(info.value)
    assert "'layer.w'" in message and "too large" in message and "lower the coefficients" not in message, message


@pytest.mark.parametrize("method", ["task_arithmetic", "drm"])
def test_huge_coefficients_on_ordinary_inputs_still_say_lower_the_coefficients(method):
    base, models = _huge(10.0)
    with pytest.raises(MergeInputError) as info:
        given = {"drop_rate": 0.0} if method == "drm" else {}
        drm_jax.merge(base, models, method=method, coefficients=[3e38, 3e38], **given)
    message = str(info.value)
    assert "'layer.w'" in message and "lower the coefficients" in message, message


def test_drm_decomposition_overflow_on_the_command_line_is_one_line(family, tmp_path, capfd):
    from safetensors.numpy import load_file, save_file

    from .conftest import refused, write_merge_config

    name = "model.layers.0.mlp.up_proj.weight"
    for task in ("task_a", "task_b"):
        path = family / task / "model.safetensors"
        tensors = load_file(str(path))
        tensors[name] = tensors[name] * np.float32(1e20)
        save_file(tensors, str(path), metadata={"format": "pt"})
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
    config.write_text(config.read_text().replace("task_arithmetic", "drm")
                      .replace("parameters: {lambda: 1.0}", "parameters: {precision: float32}"))
    line = refused(capfd, ["merge", config, tmp_path / "out", "--quiet"], tmp_path / "out", [family, config],
                   [name, "overflowed float32", "the inputs reach"])
    # DRM's decomposition or its norms (renormalization) overflowed: either way the inputs are too large
    assert "decomposition overflowed" in line or "too large" in line, line
    assert "lower the coefficients" not in line
