"""Readers of files written by the reference libraries (torch, flax, orbax), format detection, name maps."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from drm_jax.io import (
    detect_architecture,
    detect_format,
    from_flax_array,
    from_flax_name,
    open_checkpoint,
    to_flax_array,
    to_flax_name,
    weight_orientation,
)
from drm_jax.io.architectures import weight_kind

RNG = np.random.default_rng(0)


def test_torch_bin_bf16_nested_and_sharded(tmp_path):
    torch = pytest.importorskip("torch")
    weight = torch.randn(5, 3).to(torch.bfloat16)
    bias = torch.randn(5)
    single = tmp_path / "single"
    single.mkdir()
    torch.save({"state_dict": {"layer.weight": weight, "layer.bias": bias}, "epoch": 3}, single / "model.pt")
    with open_checkpoint(single / "model.pt") as reader:
        assert reader.format == "torch" and sorted(reader.keys()) == ["layer.bias", "layer.weight"]
        assert reader.dtype("layer.weight") == ml_dtypes.bfloat16 and reader.shape("layer.weight") == (5, 3)
        got = reader.get("layer.weight")
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got.astype(np.float32), weight.float().numpy())
        np.testing.assert_array_equal(reader.get("layer.bias"), bias.numpy())

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    torch.save({"a.weight": weight}, sharded / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.weight": bias}, sharded / "pytorch_model-00002-of-00002.bin")
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "pytorch_model-00001-of-00002.bin", "b.weight": "pytorch_model-00002-of-00002.bin"}}))
    assert detect_format(sharded) == "torch"
    with open_checkpoint(sharded) as reader:
        assert sorted(reader.keys()) == ["a.weight", "b.weight"]
        np.testing.assert_array_equal(reader.get("b.weight"), bias.numpy())


def test_flax_msgpack_from_flax_serialization(tmp_path, monkeypatch):
    from flax import serialization

    params = {
        "encoder": {"layer": {"0": {"dense": {"kernel": RNG.normal(size=(4, 6)).astype(np.float32),
                                              "bias": np.zeros(6, np.float16)}}}},
        "embed": {"embedding": RNG.normal(size=(7, 4)).astype(ml_dtypes.bfloat16)},
        "scalar": np.float32(1.5),
        "big": RNG.normal(size=(50,)).astype(np.float64),
    }
    # Force flax to split "big" into chunked form, as it does above 2**30 bytes.
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 128)
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.to_bytes(params))
    assert b"__msgpack_chunked_array__" in (tmp_path / "flax_model.msgpack").read_bytes()

    with open_checkpoint(tmp_path) as reader:
        assert reader.format == "flax"
        assert sorted(reader.keys()) == ["big", "embed.embedding", "encoder.layer.0.dense.bias",
                                         "encoder.layer.0.dense.kernel", "scalar"]
        np.testing.assert_array_equal(reader.get("encoder.layer.0.dense.kernel"), params["encoder"]["layer"]["0"]["dense"]["kernel"])
        embedding = reader.get("embed.embedding")
        assert embedding.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(embedding, params["embed"]["embedding"])
        assert reader.shape("big") == (50,)
        np.testing.assert_array_equal(reader.get("big"), params["big"])
        assert reader.get("scalar") == np.float32(1.5)


def test_sharded_flax_checkpoint_like_transformers(tmp_path):
    from flax import serialization

    kernel = RNG.normal(size=(3, 2)).astype(np.float32)
    embedding = RNG.normal(size=(5, 3)).astype(np.float32)
    # transformers 4.x wrote shards as flat dicts with "/"-joined keys.
    (tmp_path / "flax_model-00001-of-00002.msgpack").write_bytes(serialization.to_bytes({"a/dense/kernel": kernel}))
    (tmp_path / "flax_model-00002-of-00002.msgpack").write_bytes(serialization.to_bytes({"a/embed/embedding": embedding}))
    (tmp_path / "flax_model.msgpack.index.json").write_text(json.dumps({"weight_map": {
        "a/dense/kernel": "flax_model-00001-of-00002.msgpack", "a/embed/embedding": "flax_model-00002-of-00002.msgpack"}}))
    with open_checkpoint(tmp_path) as reader:
        assert sorted(reader.keys()) == ["a.dense.kernel", "a.embed.embedding"]
        np.testing.assert_array_equal(reader.get("a.embed.embedding"), embedding)


def test_orbax_checkpoint_saved_by_orbax(tmp_path):
    import orbax.checkpoint as ocp

    tree = {"params": {"dense": {"kernel": RNG.normal(size=(4, 3)).astype(ml_dtypes.bfloat16),
                                 "bias": RNG.normal(size=(3,)).astype(np.float32)}}}
    ocp.PyTreeCheckpointer().save(tmp_path / "ckpt" / "7" / "default", tree)
    for path in (tmp_path / "ckpt" / "7" / "default", tmp_path / "ckpt" / "7", tmp_path / "ckpt"):
        assert detect_format(path) == "orbax"
    with open_checkpoint(tmp_path / "ckpt") as reader:
        assert sorted(reader.keys()) == ["params.dense.bias", "params.dense.kernel"]
        assert reader.dtype("params.dense.kernel") == ml_dtypes.bfloat16
        got = reader.get("params.dense.kernel")
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got, tree["params"]["dense"]["kernel"])

    # A Flax training state's "params." prefix is dropped on conversion to Hugging Face names.
    from drm_jax.io import convert_checkpoint

    convert_checkpoint(tmp_path / "ckpt", tmp_path / "hf", "hf")
    with open_checkpoint(tmp_path / "hf") as reader:
        assert sorted(reader.keys()) == ["dense.bias", "dense.weight"]
        np.testing.assert_array_equal(reader.get("dense.weight"), tree["params"]["dense"]["kernel"].T)


def test_detect_format_of_files(tmp_path):
    from drm_jax.io import write_checkpoint

    write_checkpoint({"a": np.zeros(2, np.float32)}, tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == "hf"
    assert detect_format(tmp_path / "hf" / "model.safetensors") == "hf"
    write_checkpoint({"a.kernel": np.zeros((2, 2), np.float32)}, tmp_path / "flax", format="flax")
    assert detect_format(tmp_path / "flax") == "flax"
    assert detect_format(tmp_path / "flax" / "flax_model.msgpack") == "flax"
    (tmp_path / "tf").mkdir()
    (tmp_path / "tf" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')  # TensorFlow, not T5X
    from drm_jax.errors import CheckpointError

    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        detect_format(tmp_path / "tf")


def test_flax_name_maps_per_architecture():
    cases = [
        ("bert", "bert.encoder.layer.0.attention.self.query.weight", 2, "bert.encoder.layer.0.attention.self.query.kernel"),
        ("bert", "bert.embeddings.word_embeddings.weight", 2, "bert.embeddings.word_embeddings.embedding"),
        ("bert", "bert.encoder.layer.0.output.LayerNorm.weight", 1, "bert.encoder.layer.0.output.LayerNorm.scale"),
        ("bert", "bert.encoder.layer.0.output.LayerNorm.bias", 1, "bert.encoder.layer.0.output.LayerNorm.bias"),
        ("t5", "encoder.block.0.layer.0.layer_norm.weight", 1, "encoder.block.0.layer.0.layer_norm.weight"),
        ("t5", "shared.weight", 2, "shared.embedding"),
        ("t5_v1_1", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", 2, "encoder.block.0.layer.1.DenseReluDense.wi_0.kernel"),
        ("t5", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 2,
         "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.embedding"),
        ("llama", "model.layers.0.input_layernorm.weight", 1, "model.layers.0.input_layernorm.weight"),
        ("llama", "model.embed_tokens.weight", 2, "model.embed_tokens.embedding"),
        ("llama", "lm_head.weight", 2, "lm_head.kernel"),
        ("gpt2", "transformer.h.0.attn.c_attn.weight", 2, "transformer.h.0.attn.c_attn.kernel"),
        ("gpt2", "transformer.wte.weight", 2, "transformer.wte.embedding"),
        ("gpt2", "transformer.ln_f.weight", 1, "transformer.ln_f.scale"),
        ("vit", "vit.embeddings.cls_token", 3, "vit.embeddings.cls_token"),
        ("vit", "vit.embeddings.patch_embeddings.projection.weight", 4, "vit.embeddings.patch_embeddings.projection.kernel"),
        ("clip", "vision_model.pre_layrnorm.weight", 1, "vision_model.pre_layrnorm.scale"),
        ("clip", "text_model.embeddings.token_embedding.weight", 2, "text_model.embeddings.token_embedding.embedding"),
        ("clip", "logit_scale", 0, "logit_scale"),
        ("generic", "blocks.0.mlp.fc.weight", 2, "blocks.0.mlp.fc.kernel"),
        ("generic", "blocks.0.norm.weight", 1, "blocks.0.norm.scale"),
        ("generic", "stem.conv.weight", 4, "stem.conv.kernel"),
    ]
    for arch, hf, ndim, flax in cases:
        assert to_flax_name(arch, hf, ndim) == flax, (arch, hf)
        assert from_flax_name(arch, flax, ndim) == hf, (arch, flax)


def test_flax_layouts_and_orientation():
    linear = RNG.normal(size=(5, 3))  # (out, in)
    assert to_flax_array("generic", "proj.weight", linear).shape == (3, 5)  # generic: transposed kernel
    np.testing.assert_array_equal(from_flax_array("generic", "proj.kernel", to_flax_array("generic", "proj.weight", linear)), linear)
    conv1d = RNG.normal(size=(3, 9))  # GPT-2 (in, out): unchanged
    np.testing.assert_array_equal(to_flax_array("gpt2", "h.0.attn.c_attn.weight", conv1d), conv1d)
    np.testing.assert_array_equal(from_flax_array("gpt2", "h.0.attn.c_attn.kernel", conv1d), conv1d)
    conv = RNG.normal(size=(8, 3, 4, 2))
    assert to_flax_array("vit", "vit.embeddings.patch_embeddings.projection.weight", conv).shape == (4, 2, 3, 8)
    np.testing.assert_array_equal(
        from_flax_array("vit", "vit.embeddings.patch_embeddings.projection.kernel",
                        to_flax_array("vit", "vit.embeddings.patch_embeddings.projection.weight", conv)), conv)

    assert weight_orientation("gpt2", "transformer.h.0.mlp.c_fc.weight") == "in_out"
    assert weight_orientation("gpt2", "lm_head.weight") == "out_in"
    assert weight_orientation("llama", "model.layers.0.mlp.up_proj.weight") == "out_in"
    assert weight_orientation("bert", "bert.encoder.layer.0.output.dense.kernel") == "in_out"  # any Flax kernel
    assert weight_orientation("bert", "bert.encoder.layer.0.output.LayerNorm.weight", 1) is None
    assert weight_orientation("generic", "x.bias", 1) is None
    assert weight_kind("llama", "model.embed_tokens.weight", 2) == "embedding"
    assert weight_kind("bert", "bert.encoder.layer.0.output.LayerNorm.scale", 1) == "norm"


def test_detect_architecture_from_config():
    assert detect_architecture({"model_type": "t5", "feed_forward_proj": "relu"}) == "t5"
    assert detect_architecture({"model_type": "t5", "feed_forward_proj": "gated-gelu"}) == "t5_v1_1"
    assert detect_architecture({"model_type": "mistral"}) == "llama"
    assert detect_architecture({"architectures": ["GPT2LMHeadModel"]}) == "gpt2"
    assert detect_architecture({"model_type": "vit"}) == "vit"
    assert detect_architecture({"model_type": "clip"}) == "clip"
    assert detect_architecture({"model_type": "bert"}) == "bert"
    assert detect_architecture({"model_type": "mamba"}) == "generic"
    assert detect_architecture(None) == "generic"
