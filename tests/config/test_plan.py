"""`plan_config`: a config and its inputs' headers in, one immutable plan out, opening no file (issue 24,
point 5). The headers here are written by hand from the tiny Llama models of examples/configs
(`make_tiny_models.py`), for model paths that do not exist; one test reads the same headers from the real
files and checks that the plan is the same."""

from __future__ import annotations

import builtins
import dataclasses
import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from drm_jax.config.adapter_out import AdapterHeader, AdapterHeaders, plan_adapter
from drm_jax.config.plan import Headers, ModelHeader, input_entries, plan_config, read_headers
from drm_jax.config.recipe import build_recipe
from drm_jax.config.schema import parse_config
from drm_jax.config.streaming import open_views
from drm_jax.config.vocabulary import TokenizerHeader, Tokenizers, build_tokenizer, read_tokenizers
from drm_jax.errors import CheckpointError, ConfigError, MergeInputError
from drm_jax.io import architectures as arch_lib

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"
NOWHERE = Path("/nonexistent-drm-jax-plan-test")


def _tiny():
    spec = importlib.util.spec_from_file_location("make_tiny_models", EXAMPLES / "make_tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = _tiny()
SHAPES = dict(sorted(TINY.llama_shapes().items()))  # safetensors files list their tensors sorted
LAYER = sorted(n[len("model.layers.0."):] for n in SHAPES if n.startswith("model.layers.0."))  # one layer's names


def _header(model: str, layers: int = TINY.LAYERS, dtype: str = "float32") -> ModelHeader:
    shapes = {n: s for n, s in SHAPES.items() if not n.startswith("model.layers.")}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{n}": SHAPES[f"model.layers.0.{n}"] for n in LAYER})
    shapes = dict(sorted(shapes.items()))
    config = dict(TINY.CONFIG, num_hidden_layers=layers)
    return ModelHeader(model, tuple(shapes), tuple(shapes.values()), tuple(np.dtype(dtype) for _ in shapes),
                       path=NOWHERE / model, config_dir=NOWHERE / model, model_config=json.dumps(config))


def _headers(config, recipe, **layers) -> Headers:
    return Headers(arch_lib.detect_architecture(TINY.CONFIG),
                   tuple(_header(e.model, layers.get(Path(e.model).name, TINY.LAYERS))
                         for e in input_entries(config, recipe)))


def _example(name: str, **changes):
    """An example config, its models under NOWHERE (no tokenizer_source: its vocabulary is planned from
    tokenizers' data, `test_vocabulary_plan_*`)."""
    raw = yaml.safe_load((EXAMPLES / name).read_text())
    raw.pop("tokenizer_source", None)
    raw.update(changes)
    config = parse_config(raw, NOWHERE / name)
    return config, build_recipe(config)


def _no_file(*args, **kwargs):
    raise AssertionError(f"the plan opened a file: {args[:1]}")


def _plan(config, headers, **kwargs):
    """plan_config with every Python-level file open failing."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", _no_file)
        patch.setattr(io, "open", _no_file)
        return plan_config(config, headers, **kwargs)


def test_plan_is_pure_and_frozen():
    config, recipe = _example("ties.yaml")
    headers = _headers(config, recipe)
    plan = _plan(config, headers, recipe=recipe)
    assert plan == _plan(config, headers, recipe=recipe)  # same inputs, equal plans
    assert plan == _plan(config, _headers(config, recipe))  # equal headers, no shared state
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.segments = ()
    seg = plan.segments[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        seg.method = "linear"
    with pytest.raises(TypeError):
        seg.params["lambda_"] = 2.0  # a read-only mapping
    # per-model values are tuples, not lists: nothing in the plan can be changed in place
    assert seg.params["coefficients"] == (0.6, 0.4) and seg.params["density"] == (0.5, 0.7)
    assert recipe.engine_kwargs["coefficients"] == [0.6, 0.4]  # the recipe's own list, as it was
    assert not NOWHERE.exists()


def test_models_config_plans_one_segment_of_every_tensor():
    config, recipe = _example("ties.yaml")
    plan = _plan(config, _headers(config, recipe))
    assert plan.kind == "models" and plan.entries == ("models/base", "models/task_a", "models/task_b")
    assert plan.reference == "models/base" and plan.out_dtype == "float32" and plan.layer_updates is None
    (seg,) = plan.segments
    assert (seg.key, seg.method, seg.reference, seg.models) == ("models", "ties", "models/base",
                                                                ("models/task_a", "models/task_b"))
    assert seg.labels == ("models[0] (models/task_a)", "models[1] (models/task_b)")
    assert seg.names == tuple(SHAPES) and seg.shapes == tuple(SHAPES.values()) and seg.in_names is None
    assert set(seg.dtypes) == {np.dtype(np.float32)}
    # the embeddings and LM head take the other path (the default exclusions), the 2-D weights the matrix path
    roles = dict(zip(seg.names, seg.roles))
    assert roles["model.layers.1.mlp.up_proj.weight"] == "matrix" and roles["model.norm.weight"] == "other"
    assert roles["lm_head.weight"] == "other" and roles["model.embed_tokens.weight"] == "other"
    assert seg.params["coefficients"] == tuple(recipe.engine_kwargs["coefficients"]) and seg.leaf_params is None


def test_gradient_gives_per_tensor_values():
    config, recipe = _example("slerp.yaml", parameters={"t": [0.0, 1.0]})
    (seg,) = _plan(config, _headers(config, recipe)).segments
    # t of layer i of 2 is i / 1; the tensors outside the layers take t = 0 (the segment's value)
    assert seg.params["t"] == 0.0
    assert seg.leaf_params["model.layers.1.self_attn.q_proj.weight"]["t"] == 1.0
    # a per-model gradient: each tensor's values as a tuple
    config, recipe = _example("ties.yaml", models=[
        {"model": "models/task_a", "parameters": {"weight": [0.2, 0.4], "density": 0.5}},
        {"model": "models/task_b", "parameters": {"weight": 0.4, "density": 0.7}}])
    (seg,) = _plan(config, _headers(config, recipe)).segments
    assert type(seg.params["coefficients"]) is tuple
    assert all(type(v["coefficients"]) is tuple for v in seg.leaf_params.values())
    assert seg.leaf_params["model.layers.1.self_attn.q_proj.weight"]["coefficients"] == (0.4, 0.4)
    assert "model.layers.0.self_attn.q_proj.weight" not in seg.leaf_params


SLICES = {"merge_method": "slerp", "base_model": "models/task_a", "parameters": {"t": 0.5}, "dtype": "float32",
          "slices": [{"sources": [{"model": "models/task_a", "layer_range": [0, 2]},
                                  {"model": "models/task_b", "layer_range": [0, 2]}]},
                     {"sources": [{"model": "models/task_b", "layer_range": [1, 2]},
                                  {"model": "models/base", "layer_range": [1, 2]}],
                      "base_model": "models/task_b", "parameters": {"t": 0.25}}]}


def _slices(raw=SLICES):
    config = parse_config(raw, NOWHERE / "slices.yml")
    return config, build_recipe(config)


def test_slices_config_plans_its_segments():
    config, recipe = _slices()
    plan = _plan(config, _headers(config, recipe))
    assert plan.kind == "slices" and plan.reference == "models/task_a"
    assert [s.key for s in plan.segments] == ["slices[0] (tensors before the layers)", "slices[0]", "slices[1]",
                                              "slices[1] (tensors after the layers)"]
    before, first, second, after = plan.segments
    assert before.names == ("model.embed_tokens.weight",) and set(after.names) == {"model.norm.weight",
                                                                                    "lm_head.weight"}
    # output layers 0, 1 from slice 0, layer 2 from slice 1, each read under its source's own layer
    assert first.names == tuple(f"model.layers.{i}.{n}" for i in range(2) for n in LAYER)
    assert second.names == tuple(f"model.layers.2.{n}" for n in LAYER)
    assert second.in_names["models/task_b"] == tuple(f"model.layers.1.{n}" for n in LAYER)
    assert second.in_names["models/base"] == tuple(f"model.layers.1.{n}" for n in LAYER)
    assert second.reference == "models/task_b" and second.models == ("models/base",)  # slerp: the base is not a task
    assert (first.params["t"], second.params["t"]) == (0.5, 0.25)
    assert dict(plan.layer_updates) == {"num_hidden_layers": 3}


def test_plan_raises_the_merges_errors_from_headers():
    raw = json.loads(json.dumps(SLICES))
    raw["slices"][1]["sources"][0]["layer_range"] = [2, 3]
    config, recipe = _slices(raw)
    with pytest.raises(CheckpointError, match=r"slices\[1\]\.sources\[0\]\.layer_range: models/task_b has no "
                                              r"layer 2 \(layer_range \[2, 3\]\)"):
        _plan(config, _headers(config, recipe))  # task_b has 2 layers
    assert _plan(config, _headers(config, recipe, task_b=3)).layer_updates["num_hidden_layers"] == 3
    config, recipe = _example("ties.yaml")
    headers = _headers(config, recipe)
    short = dataclasses.replace(headers.models[2], shapes=((1, 2),) + headers.models[2].shapes[1:])
    with pytest.raises(MergeInputError, match=r"has shape \(1, 2\) in models\[1\] \(models/task_b\)"):
        _plan(config, dataclasses.replace(headers, models=headers.models[:2] + (short,)))


def test_headers_read_from_files_give_the_same_plan(tmp_path):
    assert TINY.main([str(tmp_path / "models")]) == 0
    config = parse_config(dict(SLICES), tmp_path / "slices.yml")
    recipe = build_recipe(config)
    entries = input_entries(config, recipe)
    with open_views(config, entries) as (views, arch):
        headers = read_headers([e.model for e in entries], views, arch)
    assert [h.names for h in headers.models] == [tuple(SHAPES)] * 3
    assert headers == Headers(headers.arch, tuple(
        dataclasses.replace(_header(h.model), path=h.path, config_dir=h.config_dir,
                            model_config=h.model_config) for h in headers.models))
    assert plan_config(config, headers) == _plan(config, _headers(config, recipe))


def test_vocabulary_plan_is_part_of_the_frozen_plan(tmp_path):
    assert TINY.main([str(tmp_path / "models")]) == 0
    raw = {"merge_method": "linear", "models": [{"model": "models/task_a"}, {"model": "models/task_b"}],
           "dtype": "float32", "tokenizer": {"source": "union", "pad_to_multiple_of": 48}}
    config = parse_config(raw, tmp_path / "vocab.yml")
    recipe = build_recipe(config)
    entries = input_entries(config, recipe)
    with open_views(config, entries) as (views, arch):
        headers = read_headers([e.model for e in entries], views, arch)
    tokenizers = read_tokenizers(config)  # the I/O step: the plan below opens no file
    plan = _plan(config, headers, recipe=recipe, tokenizers=tokenizers)
    vocabulary = plan.vocabulary
    assert (vocabulary.size, vocabulary.rows) == (TINY.VOCAB, 96)
    # the vocabulary tensors are planned with the output's rows (padded to a multiple of 48)
    shapes = dict(zip(plan.segments[0].names, plan.segments[0].shapes))
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (96, TINY.HIDDEN)
    assert shapes["model.norm.weight"] == (TINY.HIDDEN,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        vocabulary.rows = 64
    with pytest.raises(ValueError):
        vocabulary.index["models/task_a"][0] = 5  # read-only arrays
    with pytest.raises(TypeError):
        vocabulary.vocab["new"] = 0
    with pytest.raises(TypeError):
        tokenizers.base.vocab["new"] = 0
    # tokenizers read again from the same files are equal (new tokenizer objects), and so is the plan
    assert read_tokenizers(config) == tokenizers
    assert plan == _plan(config, headers, recipe=recipe, tokenizers=read_tokenizers(config))
    # the output tokenizer, built after the plan from the loaded tokenizers, has the planned vocabulary
    assert build_tokenizer(vocabulary, tokenizers).get_vocab() == dict(vocabulary.vocab)
    with pytest.raises(ValueError, match="read_tokenizers"):
        plan_config(config, headers, recipe=recipe)


def _tokenizer(model: str, tokens, added=(), size=None) -> TokenizerHeader:
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab.update({t: len(tokens) + i for i, t in enumerate(added)})
    return TokenizerHeader(model, vocab, tuple((len(tokens) + i, t) for i, t in enumerate(added)), len(tokens), size)


def test_vocabulary_is_planned_from_tokenizer_data_alone():
    """Tokenizers written by hand for models under NOWHERE: the union, the `tokens` block and the rows."""
    config, recipe = _example("ties.yaml", tokenizer={"source": "union", "pad_to_multiple_of": 8, "tokens": {
        "<new>": {"source": {"kind": "zero"}}, "y1": {"source": "models/task_b", "force": True}}})
    words = [f"w{i}" for i in range(TINY.VOCAB - 1)]
    tokenizers = Tokenizers(_tokenizer("models/base", ["<unk>"] + words),
                            (_tokenizer("models/task_a", ["<unk>"] + words[:-2] + ["y1", "y2"], added=["<tool>"],
                                        size=TINY.VOCAB + 1),
                             _tokenizer("models/task_b", ["<unk>"] + words[:-1] + ["y1"], size=TINY.VOCAB)))
    plan = _plan(config, _headers(config, recipe), recipe=recipe, tokenizers=tokenizers)
    vocab = plan.vocabulary
    # the base's 64 tokens, task_a's ordinary tokens it lacks, then the added tokens, then the tokens block's
    assert [t for t, i in sorted(vocab.vocab.items(), key=lambda item: item[1])][TINY.VOCAB:] == [
        "y1", "y2", "<tool>", "<new>"]
    assert (vocab.size, vocab.rows, vocab.added) == (68, 72, ("<new>",))
    assert vocab.order == ("models/task_a", "models/task_b", "models/base")
    assert vocab.index["models/task_b"][vocab.vocab["y1"]] == TINY.VOCAB - 1 and vocab.forced[vocab.vocab["y1"]]
    assert vocab.index["models/base"][vocab.vocab["y2"]] == -1
    assert vocab.rules[vocab.vocab["<new>"]].kind == "zero"
    shapes = dict(zip(plan.segments[0].names, plan.segments[0].shapes))
    assert shapes["model.embed_tokens.weight"] == (72, TINY.HIDDEN)
    assert plan == _plan(config, _headers(config, recipe), recipe=recipe, tokenizers=tokenizers)
    # a token the config takes from a model that lacks it: the plan's own error, from the data
    config, recipe = _example("ties.yaml", tokenizer={"source": "base", "tokens": {"y2": {"source": "models/task_b"}}})
    with pytest.raises(ConfigError, match=r"tokenizer\.tokens\.y2\.source: 'models/task_b' does not have the "
                                          r"token 'y2'"):
        _plan(config, _headers(config, recipe), recipe=recipe, tokenizers=tokenizers)


ADAPTED = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight")


def _factors(i: int, q_a=(4, 32)):
    """Adapter i's (name, kind, key, A's shape, B's shape): adapter 0 adapts the embeddings as an embedding
    (its update stored transposed), adapter 1 as a linear layer; both q_proj, of rank 4 (A `q_a`)."""
    embed = ((4, 64), (32, 4)) if i == 0 else ((4, 32), (64, 4))
    return ((ADAPTED[0], "lora", "model.embed_tokens") + embed,
            (ADAPTED[1], "lora", "model.layers.0.self_attn.q_proj", q_a, (32, 4)))


def _adapter_headers(*flags, factors=_factors):
    names = ADAPTED + ("model.norm.weight",)
    adapters = tuple(AdapterHeader(names[:2], frozenset(names[:1]) if i == 0 else frozenset(),
                                   json.dumps({"fan_in_fan_out": flag, "task_type": "CAUSAL_LM", "r": 4}),
                                   factors(i), f"lora_{i}", f"lora_{i}/adapter_model.safetensors")
                     for i, flag in enumerate(flags))
    return AdapterHeaders(names, ((64, 32), (32, 32), (32,)), (np.dtype("float16"),) * 3, "llama", adapters)


def test_adapter_plan_is_pure_and_frozen():
    raw = {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.5},
           "models": [{"model": "lora_a", "parameters": {"weight": 1.0}},
                      {"model": "lora_b", "parameters": {"weight": 0.5}}]}
    config = parse_config(raw, NOWHERE / "adapters.yml")
    recipe = build_recipe(config)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builtins, "open", _no_file)
        patch.setattr(io, "open", _no_file)
        plan = plan_adapter(config, recipe, NOWHERE / "base", _adapter_headers(False, False), rank=8)
        assert plan == plan_adapter(config, recipe, NOWHERE / "base", _adapter_headers(False, False), rank=8)
        with pytest.raises(ConfigError, match="the adapters disagree on fan_in_fan_out"):
            plan_adapter(config, recipe, NOWHERE / "base", _adapter_headers(False, True))
    # the adapted weights are merged in float32, the others keep the base's dtype
    assert [d.name for _, _, d in plan.leaves] == ["float32", "float32", "float16"]
    assert plan.embeddings == {"model.embed_tokens.weight"} and plan.task_type == "CAUSAL_LM"
    assert plan.base_name == str(NOWHERE / "base") and (plan.rank, plan.out_dtype) == (8, "float32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.rank = 2
    with pytest.raises(TypeError):
        plan.engine_kwargs["density"] = 1.0
    assert plan.engine_kwargs["coefficients"] == (1.0, 0.5)  # per-model values as a tuple
    assert plan.ranks == {ADAPTED[0]: (4, 4), ADAPTED[1]: (4, 4)} and plan.out_rank(ADAPTED[1]) == 8


def test_adapter_plan_checks_the_factors_from_the_headers():
    """The LoRA factors' kinds and shapes, refused from the headers alone: one error naming the file and module."""
    raw = {"merge_method": "task_arithmetic", "base_model": "base",
           "models": [{"model": "lora_a", "parameters": {"weight": 1.0}},
                      {"model": "lora_b", "parameters": {"weight": 0.5}}]}
    config = parse_config(raw, NOWHERE / "adapters.yml")
    recipe = build_recipe(config)

    def plan(**kwargs):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(builtins, "open", _no_file)
            patch.setattr(io, "open", _no_file)
            return plan_adapter(config, recipe, NOWHERE / "base", _adapter_headers(False, False, **kwargs))

    assert plan().out_rank(ADAPTED[1]) == 8  # K r: 2 adapters of rank 4
    q = "lora_1/adapter_model.safetensors: module 'model.layers.0.self_attn.q_proj': LoRA factors A "
    cases = [((4, 31), re.escape(q + "(4, 31) and B (32, 4) make an update of shape (32, 31), but the base "
                                     "weight 'model.layers.0.self_attn.q_proj.weight' has shape (32, 32)")),
             ((2, 32), re.escape(q + "(2, 32) and B (32, 4) are not a linear layer's or an embedding's")),
             ((4, 32, 1), re.escape(q + "(4, 32, 1) and B (32, 4) are not a linear layer's or an embedding's"))]
    for q_a, message in cases:
        with pytest.raises(CheckpointError, match=message):
            plan(factors=lambda i, q_a=q_a: _factors(i, q_a if i == 1 else (4, 32)))
    # a weight the adapter changes without LoRA factors (a tensor saved whole) has nothing to merge
    whole = lambda i: _factors(i)[:1] + (("model.layers.0.self_attn.q_proj.weight", "whole", "q", (), ()),)
    with pytest.raises(CheckpointError, match=r"lora_0: 'model.layers.0.self_attn.q_proj.weight' is a tensor "
                                              r"saved whole \(modules_to_save\), which has no LoRA factors"):
        plan(factors=whole)
    with pytest.raises(ConfigError, match=r"--adapter-rank 33 is larger than any adapted weight's rank can be "
                                          r"\(at most 32"):
        plan_adapter(config, recipe, NOWHERE / "base", _adapter_headers(False, False), rank=33)
