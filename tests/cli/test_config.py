"""Config schema and recipe: mergekit's keys, defaults and semantics; every bad config names its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from drm_jax.config.schema import CONFIG, MAX_MODELS, MAX_PAD_TO_MULTIPLE_OF, METHOD_PARAMS, load_config, parse_config
from drm_jax.config.merge import parse_size
from drm_jax.config.recipe import build_recipe
from drm_jax.errors import ConfigError
from drm_jax.math.state import MergeMethod
from drm_jax.methods.registry import get_method

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


def _config(method="ties", models=None, **top):
    raw = {"merge_method": method, "base_model": "base",
           "models": models or [{"model": "a", "parameters": {"weight": 0.6}},
                                {"model": "b", "parameters": {"weight": 0.4}}]}
    raw.update(top)
    return parse_config(raw)


# methods a YAML config cannot run: regmean needs each model's Gram matrices (no YAML form yet),
# regmean_plusplus merges block after block (drm_jax.regmean_plusplus)
NO_YAML_FORM = {"regmean", "regmean_plusplus"}


def test_every_method_has_an_example_config_that_parses():
    assert {p.stem for p in EXAMPLES.glob("*.yaml")} == set(METHOD_PARAMS) - NO_YAML_FORM
    for path in EXAMPLES.glob("*.yaml"):
        config = load_config(path)
        recipe = build_recipe(config)
        assert config.merge_method == path.stem
        one = get_method(config.merge_method).max_models == 1  # slerp, nearswap, ...: one model (over the base)
        assert len(recipe.models) == (1 if one else 2) and recipe.warnings == ()


def test_mergekit_schema_is_read():
    config = _config("ties", parameters={"lambda": 0.9, "normalize": False}, dtype="bfloat16",
                     tokenizer_source="base",
                     models=[{"model": "a", "parameters": {"weight": 0.6, "density": 0.5}},
                             {"model": "base"}, {"model": "b", "parameters": {"weight": 0.4, "density": 0.5}}])
    assert config.dtype == "bfloat16" and config.tokenizer_source == "base"
    recipe = build_recipe(config)
    # the base listed under models is not a task vector (mergekit)
    assert [m.model for m in recipe.models] == ["a", "b"]
    assert recipe.coefficients == (0.6, 0.4)
    assert recipe.engine_kwargs["density"] == (0.5, 0.5)  # per model, trimmed by the engine per tensor
    assert recipe.method == "ties" and recipe.engine_kwargs["normalize"] is False


def test_mergekit_defaults():
    # ties: density defaults to 1 (no trim) in mergekit, weight to 1 here
    recipe = build_recipe(_config("ties", models=["a", "b"]))
    assert recipe.coefficients == (1.0, 1.0)
    assert recipe.engine_kwargs["density"] == 1.0
    # differing per-model densities reach the engine as one value per model
    recipe = build_recipe(_config("ties", models=[{"model": "a", "parameters": {"density": 0.3}},
                                                  {"model": "b", "parameters": {"density": 0.6}}]))
    assert recipe.engine_kwargs["density"] == (0.3, 0.6)
    # linear averages full weights: no base needed, zero base in the engine
    recipe = build_recipe(parse_config({"merge_method": "linear", "models": ["a", "b"]}))
    assert recipe.zero_base and recipe.reference.model == "a"
    # shared parameters give per-model defaults
    recipe = build_recipe(_config("task_arithmetic", models=["a", "b"], parameters={"weight": 0.3}))
    assert recipe.coefficients == (0.3, 0.3)


def test_drm_parameters_reach_the_engine():
    config = _config("drm", parameters={"drop_rate": 0.7, "direction": "vertical", "rank_rtol": 0.05,
                                        "renormalize": False, "include": "mlp", "exclude": ["lm_head"]})
    recipe = build_recipe(config)
    assert recipe.method == "drm"
    kw = recipe.engine_kwargs
    assert kw["drop_rate"] == 0.7 and kw["direction"] == "vertical" and kw["rank_rtol"] == 0.05
    assert kw["renormalize"] is False
    assert recipe.role_kwargs["include"] == ["mlp"] and recipe.role_kwargs["exclude"] == ["lm_head"]
    assert kw["coefficients"] == [0.6, 0.4]
    # a density shared by all models is 1 - drop_rate
    recipe = build_recipe(_config("drm", parameters={"density": 0.25}))
    assert recipe.engine_kwargs["drop_rate"] == pytest.approx(0.75)


@pytest.mark.parametrize("raw, key", [
    ({"merge_method": "magic", "base_model": "b", "models": ["a"]}, "merge_method"),
    ({"base_model": "b", "models": ["a"]}, "merge_method"),
    ({"merge_method": "ties", "base_model": "b"}, "models"),
    ({"merge_method": "ties", "models": ["a"]}, "base_model"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "parameters": {"bogus": 1}}, "parameters.bogus"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"wieght": 1}}]},
     "models[0].parameters.wieght"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"density": 1.5}}]},
     "models[0].parameters.density"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": "x"}}]},
     "models[0].parameters.weight"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": [0, "x"]}}]},
     "models[0].parameters.weight[1]"),  # a gradient (tests/cli/test_config_settings.py) of numbers only
    ({"merge_method": "drm", "base_model": "b", "models": ["a"], "parameters": {"direction": "diagonal"}},
     "parameters.direction"),
    ({"merge_method": "drm", "base_model": "b", "models": ["a"], "parameters": {"rescale": True}}, "parameters.rescale"),
    ({"merge_method": "drm", "base_model": "b", "models": ["a"], "parameters": {"lambda": "x"}}, "parameters.lambda"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "slices": []}, "slices"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "dtype": "float8"}, "dtype"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "wat": 1}, "wat"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "tokenizer_source": "union",
      "tokenizer": {"source": "base"}}, "tokenizer"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer_source": "base"}, "tokenizer_source"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "chat_template": "nonsense"}, "chat_template"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"path": "a"}]}, "models[0].path"),
    ({"merge_method": "ties", "base_model": "b", "models": ["b"]}, "models"),
])
def test_bad_configs_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value).startswith(key + ":"), str(err.value)


@pytest.mark.parametrize("raw, key", [
    ({"merge_method": "drm", "base_model": "b", "models": [{"model": "a", "parameters": {"density": 0.2}},
                                                           {"model": "c", "parameters": {"density": 0.3}}]},
     "models[0].parameters.density"),
    ({"merge_method": "drm", "base_model": "b", "models": ["a"], "parameters": {"density": 0.2, "drop_rate": 0.5}},
     "parameters.drop_rate"),
    ({"merge_method": "drm", "base_model": "b", "models": ["a"], "parameters": {"exclude": "("}}, "parameters.exclude"),
    ({"merge_method": "linear", "base_model": "b", "models": ["a"]}, "base_model"),
])
def test_contradictory_parameters_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        build_recipe(parse_config(raw))
    assert str(err.value).startswith(key + ":"), str(err.value)


_SLICE = {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [2, 4]}]}


@pytest.mark.parametrize("raw, message", [
    # null counts as absent for merge_method (required), not for a model reference
    ({"merge_method": None, "models": ["a"]}, "merge_method: missing"),
    ({"merge_method": "linear", "models": [{"model": None}]}, "models[0].model: must be a model path, got None"),
    ({"merge_method": "linear", "models": [{"parameters": {}}]}, "models[0].model: missing"),
    ({"merge_method": "linear", "models": [{"model": "a", "weight": 1}]},
     "models[0].weight: unknown key; a model entry has 'model' and 'parameters'"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a"}]}]},
     "slices[0].sources[0].layer_range: missing"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1], "x": 1}]}]},
     "slices[0].sources[0].x: unknown key; a slice source has ['model', 'layer_range', 'parameters']"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                        {"model": "b", "layer_range": [0, 3]}]}]},
     "slices[0].sources[1].layer_range: [0, 3] covers 3 layers"),
    ({"merge_method": "linear", "slices": [dict(_SLICE, residual=1)]}, "slices[0].residual: unknown key; a slice has"),
    ({"merge_method": "linear", "slices": [{"sources": None}]}, "slices[0].sources: must be a non-empty list"),
    ({"merge_method": "linear", "modules": {"default": {"slices": [_SLICE], "x": 1}}},
     "modules.default.x: unknown key; a module has ['slices', 'models', 'parameters']"),
    ({"merge_method": "linear", "modules": {"default": {"parameters": {}}}},
     "modules.default: give exactly one of 'slices' and 'models'"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer": {"tokens": {"<t>": {"force": None}}}},
     "tokenizer.tokens.<t>.force: must be true or false, got None"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer": {"source": None}},
     "tokenizer.source: must be a model path, got None"),
    ({"merge_method": "linear", "models": ["a"],
      "tokenizer": {"tokens": {"<t>": {"source": {"kind": "model_token", "model": "a", "token_id": -1}}}}},
     "tokenizer.tokens.<t>.source.token_id: must be a non-negative integer, got -1"),
    ({"merge_method": "linear", "models": ["a"],
      "tokenizer": {"tokens": {"<t>": {"source": {"kind": "model_token", "model": "a"}}}}},
     "tokenizer.tokens.<t>.source: give exactly one of token_id and token"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer": {"pad_to_multiple_of": 0}},
     "tokenizer.pad_to_multiple_of: must be a positive integer, got 0"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer": {"pad_to_multiple_of": True}},
     "tokenizer.pad_to_multiple_of: must be a positive integer, got True"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer": {"pad_to_multiple_of": MAX_PAD_TO_MULTIPLE_OF + 1}},
     f"tokenizer.pad_to_multiple_of: at most {MAX_PAD_TO_MULTIPLE_OF} "),
    ({"merge_method": "linear", "models": [f"m{i}" for i in range(MAX_MODELS + 1)]},
     f"models: {MAX_MODELS + 1} entries; at most {MAX_MODELS} models"),
    ({"merge_method": "linear", "models": ["a"], "wat": 1}, f"wat: unknown key; expected one of {list(CONFIG.names)}"),
])
def test_schema_tables_give_one_line_errors_naming_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value).startswith(message), str(err.value)


def test_schema_tables_accept_the_edges():
    config = parse_config({"merge_method": "linear", "models": [f"m{i}" for i in range(MAX_MODELS)],
                           "tokenizer": {"pad_to_multiple_of": MAX_PAD_TO_MULTIPLE_OF,
                                         "tokens": {"<t>": None, "<z>": {"source": {"kind": "zero"}, "force": True}}}})
    assert len(config.models) == MAX_MODELS and config.models[0].parameters == {}
    spec = config.tokenizer
    assert spec.source == "union" and spec.pad_to_multiple_of == MAX_PAD_TO_MULTIPLE_OF
    assert [(t, s.source.kind, s.force) for t, s in spec.tokens] == [("<t>", "default", False), ("<z>", "zero", True)]
    sliced = parse_config({"merge_method": "linear", "modules": {"default": {"slices": [_SLICE], "parameters": None}},
                           "dtype": "torch.bfloat16"})
    assert [m.layer_range for m in sliced.slices[0].sources] == [(0, 2), (2, 4)]
    assert sliced.module_parameters == {} and sliced.dtype == "bfloat16"
    assert sliced.slices[0].key == "modules.default.slices[0]"


def test_parameters_the_method_lacks_are_refused():
    # mergekit's task_arithmetic declares a density and ignores it (it does not sparsify): accepted, no effect
    _config("task_arithmetic", models=[{"model": "a", "parameters": {"density": 0.5}}])
    with pytest.raises(ConfigError, match=r"^models\[0\]\.parameters\.density: unknown per-model parameter"):
        _config("linear", models=[{"model": "a", "parameters": {"density": 0.5}}])


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: ties\nmodels: [a, b\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML at line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_config(empty)
    listed = tmp_path / "list.yaml"
    listed.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="list.yaml: the config must be a mapping"):
        load_config(listed)


def test_relative_paths_resolve_from_cwd_then_config_dir(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "models").mkdir()
    path = tmp_path / "cfg" / "c.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": ["models"]}))
    config = load_config(path)
    monkeypatch.chdir(tmp_path)
    assert config.resolve("models") == tmp_path / "cfg" / "models"
    (tmp_path / "models").mkdir()
    assert config.resolve("models") == Path("models")


def test_parse_size():
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1234") == 1234
    for bad, message in (("lots", "not a size"), ("2 parsecs", "not a size"), ("0", "must be positive")):
        with pytest.raises(ConfigError, match=message):
            parse_size(bad)
