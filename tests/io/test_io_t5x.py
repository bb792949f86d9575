"""T5X legacy checkpoints (msgpack `checkpoint` + zarr arrays) and the Hugging Face T5 <-> T5X name map."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from drm_jax.errors import CheckpointError
from drm_jax.io import CheckpointWriter, from_t5x_name, open_checkpoint, to_t5x_name
from drm_jax.io.architectures import from_t5x_array, to_t5x_array


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "target.token_embedder.embedding": rng.normal(size=(12, 4)).astype(np.float32),
        "target.encoder.layers_0.attention.query.kernel": rng.normal(size=(4, 6)).astype(ml_dtypes.bfloat16),
        "target.encoder.relpos_bias.rel_embedding": rng.normal(size=(2, 8)).astype(np.float32),
        "target.encoder.encoder_norm.scale": rng.normal(size=(4,)).astype(np.float32),
        "target.decoder.logits_dense.kernel": rng.normal(size=(4, 12)).astype(np.float32),
    }


def test_t5x_legacy_layout_written_and_read_back(tmp_path):
    import tensorstore as ts
    from flax import serialization

    params = _params()
    with CheckpointWriter(tmp_path / "checkpoint_100", "t5x") as writer:
        for name, array in params.items():
            writer.add(name, array)
        writer.add("target.scalar_param", np.asarray(2.5, np.float32))  # 0-d: inline in the msgpack

    directory = tmp_path / "checkpoint_100"
    # The layout t5x.checkpoints writes: msgpack {version, optimizer: {target, state}} with TensorStore
    # specs (relative kvstore paths) in place of arrays, and one zarr directory per array.
    content = serialization.msgpack_restore((directory / "checkpoint").read_bytes())
    assert content["version"] == 3 and set(content["optimizer"]) == {"target", "state"}
    spec = content["optimizer"]["target"]["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert spec["driver"] == "zarr" and spec["dtype"] == "bfloat16"
    assert spec["kvstore"] == {"driver": "file", "path": "target.encoder.layers_0.attention.query.kernel"}
    np.testing.assert_array_equal(content["optimizer"]["target"]["scalar_param"], np.float32(2.5))
    for name, expected in params.items():
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(directory / name)}}).result()
        np.testing.assert_array_equal(store.read().result(), expected)

    for path in (directory, tmp_path, directory / "checkpoint"):  # the dir, the model dir (latest step), the file
        with open_checkpoint(path) as reader:
            assert reader.format == "t5x"
            assert sorted(reader.keys()) == sorted([*params, "target.scalar_param"])
            for name, expected in params.items():
                assert reader.shape(name) == expected.shape and reader.dtype(name) == expected.dtype
                got = reader.get(name)
                assert got.dtype == expected.dtype
                np.testing.assert_array_equal(got, expected)
            assert reader.get("target.scalar_param") == np.float32(2.5)


@pytest.mark.parametrize("kind", ["t5", "t5_v1_1"])
def test_hf_t5_names_to_t5x_and_back(kind, hf_model):
    source, _ = hf_model(kind)
    with open_checkpoint(source) as reader:
        names = [n for n in reader.keys() if not n.endswith("embed_tokens.weight")]
        t5x_names = [to_t5x_name(n) for n in names]
        assert len(set(t5x_names)) == len(names)
        assert all(n.startswith("target.") for n in t5x_names)
        assert [from_t5x_name(n) for n in t5x_names] == names
        for name, t5x in zip(names, t5x_names):  # layouts: kernels (in, out), relpos (heads, buckets)
            array = reader.get(name)
            moved = to_t5x_array(name, array)
            if t5x.endswith((".kernel", ".rel_embedding")):
                np.testing.assert_array_equal(moved, array.T)
            np.testing.assert_array_equal(from_t5x_array(t5x, moved), array)


def test_t5x_name_table_spot_checks():
    pairs = {
        "shared.weight": "target.token_embedder.embedding",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "target.encoder.relpos_bias.rel_embedding",
        "encoder.block.3.layer.0.layer_norm.weight": "target.encoder.layers_3.pre_attention_layer_norm.scale",
        "encoder.block.3.layer.0.SelfAttention.o.weight": "target.encoder.layers_3.attention.out.kernel",
        "encoder.block.3.layer.1.DenseReluDense.wi_1.weight": "target.encoder.layers_3.mlp.wi_1.kernel",
        "encoder.final_layer_norm.weight": "target.encoder.encoder_norm.scale",
        "decoder.block.2.layer.0.layer_norm.weight": "target.decoder.layers_2.pre_self_attention_layer_norm.scale",
        "decoder.block.2.layer.1.EncDecAttention.k.weight": "target.decoder.layers_2.encoder_decoder_attention.key.kernel",
        "decoder.block.2.layer.1.layer_norm.weight": "target.decoder.layers_2.pre_cross_attention_layer_norm.scale",
        "decoder.block.2.layer.2.DenseReluDense.wo.weight": "target.decoder.layers_2.mlp.wo.kernel",
        "decoder.final_layer_norm.weight": "target.decoder.decoder_norm.scale",
        "lm_head.weight": "target.decoder.logits_dense.kernel",
    }
    for hf, t5x in pairs.items():
        assert to_t5x_name(hf) == t5x
        assert from_t5x_name(t5x) == hf
    assert to_t5x_name("encoder.embed_tokens.weight") is None  # tied to shared
    with pytest.raises(CheckpointError, match="no T5X name"):
        to_t5x_name("bert.encoder.layer.0.attention.self.query.weight")
    with pytest.raises(CheckpointError, match="no Hugging Face T5 name"):
        from_t5x_name("target.something.else")


def test_t5x_version_2_bf16_stored_as_uint16(tmp_path):
    """T5X before version 3 wrote bfloat16 arrays as their uint16 bit patterns; the spec still says bfloat16."""
    from flax import serialization

    expected = np.random.default_rng(1).normal(size=(3, 4)).astype(ml_dtypes.bfloat16)
    with CheckpointWriter(tmp_path / "ckpt", "t5x") as writer:
        writer.add("target.encoder.layers_0.mlp.wo.kernel", expected.view(np.uint16))
    path = tmp_path / "ckpt" / "checkpoint"
    content = serialization.msgpack_restore(path.read_bytes())
    content["version"] = 2
    content["optimizer"]["target"]["encoder"]["layers_0"]["mlp"]["wo"]["kernel"]["dtype"] = "bfloat16"
    path.write_bytes(serialization.msgpack_serialize(content))
    with open_checkpoint(tmp_path / "ckpt") as reader:
        got = reader.get("target.encoder.layers_0.mlp.wo.kernel")
        assert got.dtype == ml_dtypes.bfloat16 == reader.dtype("target.encoder.layers_0.mlp.wo.kernel")
        np.testing.assert_array_equal(got, expected)
