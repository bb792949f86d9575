"""Config schema and recipe: mergekit's keys, defaults and semantics; every bad config names its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from drm_jax.config.schema import METHOD_PARAMS, load_config, parse_config
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
