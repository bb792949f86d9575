"""mergekit's per-tensor settings, slices and modules in the config: parsing, every bad config naming its
key, the value of a gradient or filter list and the precedence of scopes against mergekit 0.1.5's own
functions, layer naming per architecture, and the recipes of slices."""

from __future__ import annotations

import random

import pytest

from drm_jax.config.schema import ModelEntry, SliceEntry, parse_config
from drm_jax.config.recipe import build_recipe
from drm_jax.config.segment_defs import models_def, representative, slice_def
from drm_jax.config.segments import TensorParams, check_segments
from drm_jax.config.settings import Conditional, FilterList, Gradient, evaluate, resolve
from drm_jax.errors import ConfigError
from drm_jax.io import architectures as arch


def _slices(method="ties", **top):
    raw = {"merge_method": method, "base_model": "base",
           "slices": [{"sources": [{"model": "base", "layer_range": [0, 4]},
                                   {"model": "a", "layer_range": [0, 4], "parameters": {"weight": [0, 1]}}],
                       "parameters": {"density": [{"filter": "mlp", "value": 0.3}]}},
                      {"sources": [{"model": "base", "layer_range": [4, 6]},
                                   {"model": "b", "layer_range": [2, 4]}], "base_model": "base",
                       "merge_method": "task_arithmetic"}]}
    raw.update(top)
    return parse_config(raw)


def test_gradients_and_filter_lists_are_parsed():
    config = parse_config({"merge_method": "ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"density": [1, 0.7, 0.1], "weight": {"filter": "mlp", "value": 0.5}}},
        {"model": "b", "parameters": {"weight": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.2}]}}],
        "parameters": {"lambda": [0.5, 1.5], "normalize": True}})
    a, b = config.models
    assert a.parameters["density"] == Gradient((1.0, 0.7, 0.1))
    assert a.parameters["weight"] == FilterList((Conditional("mlp", 0.5),))
    assert b.parameters["weight"] == FilterList((Conditional("self_attn", Gradient((0.0, 1.0))), Conditional(None, 0.2)))
    assert config.parameters["lambda"] == Gradient((0.5, 1.5)) and config.parameters["normalize"] is True
    # the recipe of a tensor no filter names: the checks pass on a value each setting can take
    recipe = build_recipe(config)
    assert recipe.method == "ties" and len(recipe.models) == 2


def test_slices_and_modules_are_parsed():
    config = _slices()
    assert [m.model for m in config.models] == ["base", "a", "b"]  # every source model once
    first, second = config.slices
    assert isinstance(first, SliceEntry) and first.key == "slices[0]" and first.num_layers == 4
    assert first.sources[1].layer_range == (0, 4) and first.sources[1].key == "slices[0].sources[1]"
    assert first.parameters["density"] == FilterList((Conditional("mlp", 0.3),))
    assert second.merge_method == "task_arithmetic" and second.base_model == "base" and second.num_layers == 2
    modules = parse_config({"merge_method": "linear", "modules": {"default": {
        "models": [{"model": "a", "parameters": {"weight": 0.4}}, "b"], "parameters": {"weight": [0.1, 0.9]}}}})
    assert [m.model for m in modules.models] == ["a", "b"] and modules.slices == ()
    assert modules.models[0].key == "modules.default.models[0]"
    assert modules.module_parameters == {"weight": Gradient((0.1, 0.9))}
    sliced = parse_config({"merge_method": "linear", "modules": {"default": {"slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}], "residual_weight": 0.5}]}}})
    assert sliced.slices[0].key == "modules.default.slices[0]"


def test_every_slice_is_checked_before_reading():
    check_segments(_slices())  # both slices' recipes
    bad = parse_config({"merge_method": "ties", "base_model": "base", "slices": [
        {"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "a", "layer_range": [0, 2]}]},
        {"sources": [{"model": "base", "layer_range": [2, 4]}, {"model": "b", "layer_range": [2, 4]}],
         "merge_method": "drm", "parameters": {"density": 0.3}},
        {"sources": [{"model": "base", "layer_range": [4, 6]}, {"model": "b", "layer_range": [4, 6],
                                                                "parameters": {"density": 0.2}},
                     {"model": "a", "layer_range": [4, 6], "parameters": {"density": 0.6}}],
         "merge_method": "drm"}]})
    with pytest.raises(ConfigError, match=r"prunes all models jointly"):
        check_segments(bad)


BAD = [
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "parameters": {"normalize": [True, False]}},
     "parameters.normalize"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"],
      "parameters": {"trim_scope": [{"filter": "mlp", "value": "model"}]}}, "parameters.trim_scope"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": []}}]},
     "models[0].parameters.weight"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": [1, [2]]}}]},
     "models[0].parameters.weight[1]"),
    ({"merge_method": "ties", "base_model": "b",
      "models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 1}, 0.5]}}]},
     "models[0].parameters.weight[1]"),
    ({"merge_method": "ties", "base_model": "b",
      "models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp"}]}}]}, "models[0].parameters.weight[0].value"),
    ({"merge_method": "ties", "base_model": "b",
      "models": [{"model": "a", "parameters": {"weight": {"value": {"filter": "x", "value": 1}}}}]},
     "models[0].parameters.weight.value"),
    ({"merge_method": "ties", "base_model": "b",
      "models": [{"model": "a", "parameters": {"density": [0.2, 1.2]}}]}, "models[0].parameters.density[1]"),
    ({"merge_method": "ties", "base_model": "b", "models": ["a"], "modules": {"default": {"models": ["a"]}}},
     "modules"),
    ({"merge_method": "ties", "base_model": "b", "slices": []}, "slices"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a"}]}]}, "slices[0].sources[0].layer_range"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [2]}]}]},
     "slices[0].sources[0].layer_range"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2], "wat": 1}]}]},
     "slices[0].sources[0].wat"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}], "wat": 1}]},
     "slices[0].wat"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}],
                                                 "merge_method": "magic"}]}, "slices[0].merge_method"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                        {"model": "a", "layer_range": [2, 4]}]}]},
     "slices[0].sources[1].model"),
    ({"merge_method": "ties", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                      {"model": "b", "layer_range": [0, 2]}]}]},
     "slices[0].base_model"),
    ({"merge_method": "ties", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}], "base_model": "c"}]},
     "slices[0].base_model"),
    ({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [
        {"model": "b", "layer_range": [0, 2]}, {"model": "a", "layer_range": [0, 2],
                                                "parameters": {"lambda": 1}}]}]},
     "slices[0].sources[1].parameters.lambda"),
    ({"merge_method": "linear", "modules": {"default": {"models": ["a"], "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}]}]}}}, "modules.default"),
    ({"merge_method": "linear", "modules": {"default": {"models": ["a"], "wat": 1}}}, "modules.default.wat"),
    ({"merge_method": "linear", "modules": {"default": {"models": [{"model": "a", "parameters": {"w": 1}}]}}},
     "modules.default.models[0].parameters.w"),
]


@pytest.mark.parametrize("raw, key", BAD)
def test_bad_configs_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value).startswith(key + ":"), str(err.value)


# -- values and precedence, against mergekit's own functions ------------------------------------------------
def _random_setting(rng: random.Random):
    def scalar_or_gradient():
        if rng.random() < 0.5:
            return round(rng.uniform(0, 1), 3)
        return [round(rng.uniform(0, 1), 3) for _ in range(rng.randint(1, 6))]

    kind = rng.random()
    if kind < 0.3:
        return scalar_or_gradient()
    entries = [{"filter": rng.choice(["mlp", "self_attn", "layers.1.", "q_proj", "*", "norm"]),
                "value": scalar_or_gradient()} for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.6:
        entries.append({"value": scalar_or_gradient()})
    return entries[0] if len(entries) == 1 and rng.random() < 0.3 else entries


NAMES = ["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.10.self_attn.q_proj.weight",
         "model.layers.3.input_layernorm.weight", "model.norm.weight", "lm_head.weight", ""]


def test_values_are_mergekits():
    """A gradient's value at t and a filter list's first match, as mergekit's evaluate_setting computes them."""
    config_module = pytest.importorskip("mergekit.config")
    from pydantic import TypeAdapter

    adapter = TypeAdapter(config_module.ParameterSetting)
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        raw = _random_setting(rng)
        ours = parse_config({"merge_method": "task_arithmetic", "base_model": "b", "models": ["a"],
                             "parameters": {"lambda": raw}}).parameters["lambda"]
        theirs = adapter.validate_python(raw)
        for name in NAMES:
            for t in (0.0, 1 / 3, 0.5, 0.71, 1.0):
                want = config_module.evaluate_setting(name, theirs, t, validate=float)
                got = evaluate(ours, name, t)
                assert got == want, (raw, name, t, got, want)
                checked += 1
    assert checked == 300 * len(NAMES) * 5


def test_precedence_is_mergekits_config_reader():
    """Per-model values: the source's own, then the slice's, the module's, the top level's; shared values the
    same without the source; the first scope that gives a value wins (mergekit's ConfigReader)."""
    mk = pytest.importorskip("mergekit.config")
    from mergekit.common import ModelReference

    rng = random.Random(1)
    for trial in range(40):
        top, module, slice_params = ({n: _random_setting(rng) for n in ("weight", "lambda") if rng.random() < 0.7}
                                     for _ in range(3))
        own = [{"weight": _random_setting(rng)} if rng.random() < 0.6 else {} for _ in range(2)]
        raw = {"merge_method": "task_arithmetic", "base_model": "m0", "parameters": top,
               "modules": {"default": {"parameters": module, "slices": [{"parameters": slice_params, "sources": [
                   {"model": f"m{i}", "layer_range": [0, 4], "parameters": own[i]} for i in range(2)]}]}}}
        ours = parse_config(raw)
        seg = slice_def(ours, ours.slices[0])
        theirs = mk.MergeConfiguration.model_validate(raw)
        reader = mk.ConfigReader(config=theirs, t=0, slice_out=theirs.modules["default"].slices[0],
                                 module=theirs.modules["default"])
        for name in NAMES[:-1]:
            for t in (0.0, 0.5, 1.0):
                for i, src in enumerate(seg.sources):
                    ref = ModelReference.parse(f"m{i}")
                    want = next((mk.evaluate_setting(name, s["weight"], t, validate=float)
                                 for s in reader.parameter_sources(ref) if s and "weight" in s
                                 and mk.evaluate_setting(name, s["weight"], t, validate=float) is not None), None)
                    assert resolve("weight", (src.parameters,) + seg.scopes, name, t) == want, (trial, name, t, i)
                want = next((mk.evaluate_setting(name, s["lambda"], t, validate=float)
                             for s in reader.parameter_sources(None) if s and "lambda" in s
                             and mk.evaluate_setting(name, s["lambda"], t, validate=float) is not None), None)
                assert resolve("lambda", seg.scopes, name, t) == want, (trial, name, t)


def test_tensor_recipes_take_each_tensors_values():
    config = parse_config({"merge_method": "ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"density": [1, 0.5], "weight": [{"filter": "mlp", "value": 0.5},
                                                                      {"value": 0.25}]}},
        {"model": "b", "parameters": {"density": 0.4}}], "parameters": {"weight": 0.75, "lambda": [0.5, 1.5]}})
    params = TensorParams(config, models_def(config))
    mlp = params.recipe("model.layers.3.mlp.up_proj.weight", ["model.layers.3.mlp.up_proj.weight"] * 3, 1.0)
    attn = params.recipe("model.layers.0.self_attn.q_proj.weight", ["model.layers.0.self_attn.q_proj.weight"] * 3, 0.0)
    assert mlp.engine_kwargs["coefficients"] == [0.5, 0.75] and attn.engine_kwargs["coefficients"] == [0.25, 0.75]
    assert mlp.engine_kwargs["density"] == (0.5, 0.4) and attn.engine_kwargs["density"] == (1.0, 0.4)
    assert mlp.engine_kwargs["lambda_"] == 1.5 and attn.engine_kwargs["lambda_"] == 0.5
    assert representative(config).models[0].parameters == {"density": 1.0, "weight": 0.5}


def test_slice_defs_follow_mergekit():
    config = _slices()
    first, second = (slice_def(config, s) for s in config.slices)
    assert first.method == "ties" and first.base_model == "base"
    assert first.scopes == (config.slices[0].parameters, {}, {})
    assert second.method == "task_arithmetic"
    # a base model is not special to linear / passthrough: not added to a slice's sources, not its reference
    linear = parse_config({"merge_method": "linear", "base_model": "x", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 1]}, {"model": "b", "layer_range": [1, 2]}]}]})
    assert slice_def(linear, linear.slices[0]).base_model is None
    assert isinstance(linear.models[0], ModelEntry)


@pytest.mark.parametrize("table, name, index, renamed, before", [
    ("llama", "model.layers.12.mlp.up_proj.weight", 12, "model.layers.3.mlp.up_proj.weight", False),
    ("llama", "model.layers.0.self_attn.k_proj.bias", 0, "model.layers.3.self_attn.k_proj.bias", False),  # qwen2
    ("gpt2", "transformer.h.7.attn.c_attn.weight", 7, "transformer.h.3.attn.c_attn.weight", False),
    ("gpt2", "h.7.mlp.c_fc.bias", 7, "h.3.mlp.c_fc.bias", False),
    ("bert", "encoder.layer.5.attention.self.query.weight", 5, "encoder.layer.3.attention.self.query.weight", False),
    ("bert", "bert.encoder.layer.1.output.dense.bias", 1, "bert.encoder.layer.3.output.dense.bias", False),
    ("bert", "roberta.encoder.layer.2.output.LayerNorm.weight", 2,
     "roberta.encoder.layer.3.output.LayerNorm.weight", False),
])
def test_layer_naming(table, name, index, renamed, before):
    assert arch.layer_index(table, name) == index
    assert arch.with_layer_index(table, name, 3) == renamed


@pytest.mark.parametrize("table, name, before", [
    ("llama", "model.embed_tokens.weight", True), ("llama", "model.norm.weight", False),
    ("llama", "lm_head.weight", False), ("gpt2", "transformer.wte.weight", True), ("gpt2", "wpe.weight", True),
    ("gpt2", "transformer.ln_f.bias", False), ("bert", "embeddings.word_embeddings.weight", True),
    ("bert", "bert.embeddings.LayerNorm.bias", True), ("bert", "pooler.dense.weight", False),
])
def test_tensors_outside_the_layers(table, name, before):
    assert arch.layer_index(table, name) is None
    assert arch.before_layers(table, name) is before


def test_model_types_with_layer_naming():
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral", "gpt2", "gpt_neox",
                       "bert", "roberta", "t5", "mt5", "vit", "clip", "clip_text_model"):
        assert arch.layer_naming(arch.detect_architecture({"model_type": model_type})) is not None
    assert arch.layer_naming("generic") is None and arch.layer_index("generic", "model.layers.0.mlp.weight") is None
    assert arch.layer_naming("gpt2").stacks[0].num_layers_keys == ("n_layer",)
    # T5's two stacks: each tensor's index is within its own stack
    assert arch.layer_index("t5", "decoder.block.1.layer.2.DenseReluDense.wo.weight") == 1
    assert arch.layer_stack("t5", "decoder.block.1.layer.0.SelfAttention.q.weight").name == "decoder"
