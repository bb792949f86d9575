"""Slices, gradients and layer filters on every architecture of the table in `drm_jax.arch`, each on a tiny
checkpoint built from its transformers config with random weights (one module fixture builds them all).

The expectations are written here from each architecture's own tensor names (layer prefixes, layer counts,
which tensors come before the layers), not read from the table, so a wrong row fails. T5 and CLIP have two
layer stacks of different lengths (encoder 3 / decoder 4, text 3 / vision 4): a slice takes its
`layer_range` from each stack, a gradient's t is the layer's position in its own stack. Where mergekit
0.1.5 has the architecture and its own run of the config succeeds, the outputs are compared with
`mergekit-yaml` (one subprocess for all of them; float32, to 1e-5 of each tensor's largest magnitude).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import drm_jax
from drm_jax import arch as arch_data
from drm_jax.cli.main import main
from drm_jax.engine.roles import RoleRules
from drm_jax.io import architectures as arch_lib
from drm_jax.io import naming
from mergekit_yaml import run_mergekit_yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_DECODER = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=32)
_BERT = dict(vocab_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24,
             max_position_embeddings=40)


def _llama_like(model, config, **extra):
    return lambda: getattr(transformers, model)(getattr(transformers, config)(**_DECODER, **extra))


# name -> (build the model, substring for the filter, [(layer prefix, layers)], substrings of the tensors
# before the layers, the 2-D tensors out of DRM by default)
_LLAMA_OUT = {"model.embed_tokens.weight", "lm_head.weight"}
SPECS = {
    "llama": (_llama_like("LlamaForCausalLM", "LlamaConfig"), "mlp", [("model.layers.", 3)], ["embed_tokens"],
              _LLAMA_OUT),
    "mistral": (_llama_like("MistralForCausalLM", "MistralConfig"), "mlp", [("model.layers.", 3)], ["embed_tokens"],
                _LLAMA_OUT),
    "qwen2": (_llama_like("Qwen2ForCausalLM", "Qwen2Config"), "mlp", [("model.layers.", 3)], ["embed_tokens"],
              _LLAMA_OUT),
    "qwen3": (_llama_like("Qwen3ForCausalLM", "Qwen3Config", head_dim=8), "mlp", [("model.layers.", 3)],
              ["embed_tokens"], _LLAMA_OUT),
    "gemma": (_llama_like("GemmaForCausalLM", "GemmaConfig", head_dim=8), "mlp", [("model.layers.", 3)],
              ["embed_tokens"], {"model.embed_tokens.weight"}),  # lm_head tied: not saved
    "gemma2": (_llama_like("Gemma2ForCausalLM", "Gemma2Config", head_dim=8), "mlp", [("model.layers.", 3)],
               ["embed_tokens"], {"model.embed_tokens.weight"}),
    "phi3": (_llama_like("Phi3ForCausalLM", "Phi3Config", pad_token_id=0), "mlp", [("model.layers.", 3)],
             ["embed_tokens"], _LLAMA_OUT),
    "mixtral": (_llama_like("MixtralForCausalLM", "MixtralConfig", num_local_experts=2, num_experts_per_tok=1),
                "experts", [("model.layers.", 3)], ["embed_tokens"], _LLAMA_OUT),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0)),
        "mlp", [("transformer.h.", 3)], ["wte", "wpe"], {"transformer.wte.weight", "transformer.wpe.weight"}),
    "gpt_neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=0)),
        "mlp", [("gpt_neox.layers.", 3)], ["embed_in"], {"gpt_neox.embed_in.weight", "embed_out.weight"}),
    "bert": (lambda: transformers.BertModel(transformers.BertConfig(**_BERT)), "intermediate",
             [("encoder.layer.", 3)], ["embeddings"],
             {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
              "embeddings.token_type_embeddings.weight"}),
    "roberta": (lambda: transformers.RobertaForMaskedLM(transformers.RobertaConfig(**_BERT, pad_token_id=0,
                                                                                    bos_token_id=0, eos_token_id=0)),
                "intermediate", [("roberta.encoder.layer.", 3)], ["embeddings"],
                {"roberta.embeddings.word_embeddings.weight", "roberta.embeddings.position_embeddings.weight",
                 "roberta.embeddings.token_type_embeddings.weight",
                 "lm_head.dense.weight"}),  # the MLM head's dense layer is under `lm_head`; its decoder is tied
    "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=32, d_model=16, d_kv=8, d_ff=24, num_layers=3, num_decoder_layers=4, num_heads=2)),
        "DenseReluDense", [("encoder.block.", 3), ("decoder.block.", 4)], ["shared"],
        {"shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
         "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}),
    "vit": (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24, image_size=8,
        patch_size=4, num_labels=3)), "intermediate", [("vit.encoder.layer.", 3)], ["embeddings"], set()),
    "clip": (lambda: transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
                           image_size=8, patch_size=4), projection_dim=8)),
        "mlp", [("text_model.encoder.layers.", 3), ("vision_model.encoder.layers.", 4)],
        ["embeddings", "pre_layrnorm"],
        {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
         "vision_model.embeddings.position_embedding.weight"}),
}
ARCHS = sorted(SPECS)
# The config.json keys of the layer counts, per stack, as transformers writes them.
COUNT_KEYS = {"gpt2": ["n_layer"], "t5": ["num_layers", "num_decoder_layers"],
              "clip": ["text_config.num_hidden_layers", "vision_config.num_hidden_layers"]}
# Where mergekit 0.1.5 runs the config itself on transformers 5 checkpoints: its gemma2 / qwen2 / qwen3
# frankenmerges fail writing config.json (transformers 5 checks `layer_types` against the layer count), its
# GPT-NeoX and Mixtral templates name tensors transformers 5 no longer saves (attention.bias buffers,
# per-expert w1/w2/w3)
MERGEKIT = {"slices": ["gemma", "mistral", "phi3"], "gradient": ["gemma2", "phi3", "qwen3"]}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """{architecture: (model a, model b)} saved with save_pretrained (safetensors), random weights."""
    root = tmp_path_factory.mktemp("architectures")
    out = {}
    for seed, name in enumerate(ARCHS):
        paths = []
        for which in "ab":
            torch.manual_seed(2 * seed + (which == "b"))
            path = root / f"{name}_{which}"
            SPECS[name][0]().eval().save_pretrained(path, safe_serialization=True)
            paths.append(path)
        out[name] = tuple(paths)
    return out


def _load(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _position(name: str, stacks) -> tuple[int, int, str, str] | None:
    """(stack number, layer, prefix, rest) of a layer tensor, by the spec's prefixes; None outside layers."""
    for k, (prefix, _) in enumerate(stacks):
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            return k, int(index), prefix, rest
    return None


def _get(config: dict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _slices_config(a: Path, b: Path) -> dict:
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": str(a), "layer_range": [1, 3]}]},
                       {"sources": [{"model": str(b), "layer_range": [0, 2]}]}]}


def _gradient_config(a: Path, b: Path, flt: str) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(a), "parameters": {"weight": [1.0, 0.0]}},
                       {"model": str(b), "parameters": {"weight": [{"filter": flt, "value": 0.25},
                                                                   {"value": [0.0, 1.0]}]}}]}


@pytest.mark.parametrize("name", ARCHS)
def test_slices_take_each_stacks_layers(name, family, tmp_path):
    """Layers 1-2 of a then 0-1 of b, renumbered 0-3 in every stack; embeddings from a, the rest from b."""
    a, b = family[name]
    _, _, stacks, before, _ = SPECS[name]
    drm_jax.merge_config(_slices_config(a, b), tmp_path / "out")
    ours, ta, tb = _load(tmp_path / "out"), _load(a), _load(b)
    expected = {}
    for n, v in ta.items():
        if _position(n, stacks) is None and any(s in n for s in before):
            expected[n] = v
    for n, v in tb.items():
        if _position(n, stacks) is None and not any(s in n for s in before):
            expected[n] = v
    for source, offset, first in ((ta, 0, 1), (tb, 2, 0)):
        for n, v in source.items():
            pos = _position(n, stacks)
            if pos is not None and first <= pos[1] < first + 2:
                expected[f"{pos[2]}{pos[1] - first + offset}.{pos[3]}"] = v
    assert sorted(ours) == sorted(expected)
    for n, v in expected.items():
        assert np.array_equal(ours[n], v.astype(np.float32)), n
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in COUNT_KEYS.get(name, ["num_hidden_layers"]):
        assert _get(written, key) == 4, key
    # per-layer lists follow their layers (Gemma-2 alternates sliding and full attention)
    types_a, types_b = (json.loads((p / "config.json").read_text()).get("layer_types") for p in (a, b))
    if types_a is not None:
        assert written["layer_types"] == types_a[1:3] + types_b[0:2]
    transformers.AutoConfig.from_pretrained(tmp_path / "out")  # transformers accepts what was written


def _expected_gradient(ta, tb, stacks, flt) -> dict[str, np.ndarray]:
    out = {}
    for n, x in ta.items():
        if not np.issubdtype(x.dtype, np.floating):
            out[n] = x
            continue
        pos = _position(n, stacks)
        t = 0.0 if pos is None else pos[1] / (stacks[pos[0]][1] - 1)
        wa, wb = 1.0 - t, (0.25 if flt in n else t)
        out[n] = ((wa * x.astype(np.float64) + wb * tb[n].astype(np.float64)) / (wa + wb)).astype(np.float32)
    return out


@pytest.mark.parametrize("name", ARCHS)
def test_gradient_and_filter_follow_each_stacks_layers(name, family, tmp_path):
    """linear: a's weight falls 1 -> 0 over each stack's layers, b's rises 0 -> 1 except 0.25 where the
    filter matches; normalized (mergekit's linear)."""
    a, b = family[name]
    _, flt, stacks, _, _ = SPECS[name]
    drm_jax.merge_config(_gradient_config(a, b, flt), tmp_path / "out")
    ours, ta, tb = _load(tmp_path / "out"), _load(a), _load(b)
    expected = _expected_gradient(ta, tb, stacks, flt)
    assert sorted(ours) == sorted(expected)
    assert any(flt in n for n in ours) and any(_position(n, stacks) for n in ours)
    for n, v in expected.items():
        np.testing.assert_allclose(ours[n], v, rtol=0, atol=1e-6 * max(1.0, float(np.abs(v).max())), err_msg=n)


@pytest.mark.parametrize("name", ARCHS)
def test_default_exclusions_and_orientation(name, family):
    """The 2-D tensors out of DRM by default are exactly the embeddings and heads; only GPT-2's Conv1D
    weights are seen transposed."""
    a, _ = family[name]
    _, _, _, _, excluded = SPECS[name]
    tensors = _load(a)
    reader = type("Dir", (), {"config_dir": a})()
    arch = naming.architecture_of([reader])
    roles = RoleRules(layout=naming.layout_for(arch))
    two_d = {n: v for n, v in tensors.items() if v.ndim == 2}
    out = {n for n, v in two_d.items() if roles(n, v.shape, v.dtype).role != "matrix"}
    assert out == excluded
    transposed = {n for n, v in two_d.items() if roles(n, v.shape, v.dtype).transpose}
    assert transposed == ({n for n in two_d if re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", n)}
                          if name == "gpt2" else set())
    assert transposed or name != "gpt2"


def test_every_row_names_its_model_types():
    """Each architecture of the brief is detected from its config.json and has layer stacks."""
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral", "gpt2",
                       "gpt_neox", "bert", "roberta", "t5", "vit", "clip"):
        row = arch_lib.layer_naming(arch_lib.detect_architecture({"model_type": model_type}))
        assert row is not None and row.stacks, model_type
    assert arch_lib.detect_architecture({"model_type": "mamba"}) == "generic"
    # the default exclusions are derived from the rows: every row's names are in them
    for row in arch_data.ARCHITECTURES.values():
        for component in row.embedding_and_head_names:
            assert re.search(arch_data.DEFAULT_EXCLUDE[0], f"x.{component}.weight"), component


def _unknown(family, tmp_path) -> tuple[Path, Path]:
    """Two Llama checkpoints whose config.json says model_type "mamba2x" (an architecture the table lacks)."""
    out = []
    for src, which in zip(family["llama"], "ab"):
        dst = tmp_path / which
        dst.mkdir()
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        config = json.loads((dst / "config.json").read_text())
        config["model_type"], config["architectures"] = "mamba2x", ["Mamba2xForCausalLM"]
        (dst / "config.json").write_text(json.dumps(config))
        out.append(dst)
    return out[0], out[1]


def test_unknown_architecture_slices_are_one_line(family, tmp_path, capsys):
    a, b = _unknown(family, tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_slices_config(a, b)))
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'mamba2x'" in err and "layer naming" in err and "slices" in err, err
    assert not (tmp_path / "out").exists()
    # a gradient needs layer indices too; a filter and plain values merge by tensor name as before
    path.write_text(yaml.safe_dump(_gradient_config(a, b, "mlp")))
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "models[0].parameters.weight" in err and "'mamba2x'" in err, err
    plain = {"merge_method": "linear", "dtype": "float32",
             "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                        {"model": str(b), "parameters": {"weight": [{"filter": "mlp", "value": 3.0}, {"value": 1.0}]}}]}
    path.write_text(yaml.safe_dump(plain))
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 0
    ours, ta, tb = _load(tmp_path / "out"), _load(a), _load(b)
    for n, x in ta.items():
        wb = 3.0 if "mlp" in n else 1.0
        np.testing.assert_allclose(ours[n], (x + wb * tb[n]) / (1 + wb), rtol=0, atol=1e-6, err_msg=n)


@pytest.fixture(scope="module")
def mergekit_runs(family, tmp_path_factory):
    """{(kind, architecture): (mergekit's output, the config)}, all run by one mergekit-yaml process."""
    pytest.importorskip("mergekit")
    work = tmp_path_factory.mktemp("mergekit_architectures")
    runs = {}
    for kind, names in MERGEKIT.items():
        for name in names:
            a, b = family[name]
            config = _slices_config(a, b) if kind == "slices" else _gradient_config(a, b, SPECS[name][1])
            path = work / f"{kind}_{name}.yaml"
            path.write_text(yaml.safe_dump(config))
            runs[(kind, name)] = (path, work / f"mk_{kind}_{name}", config)
    run_mergekit_yaml([(path, theirs) for path, theirs, _ in runs.values()])
    return {key: (theirs, config) for key, (_, theirs, config) in runs.items()}


@pytest.mark.optional
@pytest.mark.parametrize("kind, name", [(k, n) for k, names in MERGEKIT.items() for n in names])
def test_agrees_with_mergekit(kind, name, mergekit_runs, tmp_path):
    theirs_dir, config = mergekit_runs[(kind, name)]
    drm_jax.merge_config(config, tmp_path / "out")
    ours, theirs = _load(tmp_path / "out"), _load(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    for n, v in theirs.items():
        scale = max(1e-30, float(np.abs(v).max()))
        np.testing.assert_allclose(ours[n], v, rtol=0, atol=1e-5 * scale, err_msg=n)
    if kind == "slices":
        written = json.loads((tmp_path / "out" / "config.json").read_text())
        assert written["num_hidden_layers"] == json.loads((theirs_dir / "config.json").read_text())["num_hidden_layers"]
