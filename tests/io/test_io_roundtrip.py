"""hf -> flax -> hf (and orbax, T5X) conversions of real transformers models: same tensors, same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drm_jax.cli.main import main
from drm_jax.io import open_checkpoint


def _convert(src, dst, to, *extra) -> None:
    assert main(["convert", str(src), str(dst), "--to", to, *extra]) == 0


def _assert_same_tensors(a_dir, b_dir) -> None:
    with open_checkpoint(a_dir) as a, open_checkpoint(b_dir) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():
            x, y = a.get(name), b.get(name)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert np.array_equal(x, y), name


@pytest.mark.parametrize("kind", ["t5", "t5_v1_1", "llama", "bert", "gpt2", "vit", "clip"])
def test_hf_flax_hf_keeps_logits_exactly(kind, hf_model, model_logits, tmp_path):
    source, model_cls = hf_model(kind)
    _convert(source, tmp_path / "flax", "flax")
    assert (tmp_path / "flax" / "flax_model.msgpack").is_file()
    _convert(tmp_path / "flax", tmp_path / "back", "hf")

    _assert_same_tensors(source, tmp_path / "back")
    for name in ("config.json", "tokenizer_config.json"):
        assert (tmp_path / "flax" / name).read_bytes() == (source / name).read_bytes()
        assert (tmp_path / "back" / name).read_bytes() == (source / name).read_bytes()
    original = model_cls.from_pretrained(source).eval()
    reloaded = model_cls.from_pretrained(tmp_path / "back").eval()
    np.testing.assert_array_equal(model_logits(original, kind), model_logits(reloaded, kind))


def _flax_tree(directory):
    from flax import serialization

    return serialization.msgpack_restore((directory / "flax_model.msgpack").read_bytes())


def test_flax_layout_kernels_are_in_out(hf_model, tmp_path):
    """Read the msgpack with flax itself: nested dict, kernel (in, out), embedding, LayerNorm scale."""
    source, _ = hf_model("bert")
    _convert(source, tmp_path / "bert", "flax")
    tree = _flax_tree(tmp_path / "bert")
    with open_checkpoint(source) as hf:
        up = hf.get("bert.encoder.layer.0.intermediate.dense.weight")  # (24, 16): (out, in)
        word = hf.get("bert.embeddings.word_embeddings.weight")
    layer = tree["bert"]["encoder"]["layer"]["0"]
    kernel = layer["intermediate"]["dense"]["kernel"]
    assert up.shape == (24, 16) and kernel.shape == (16, 24)
    np.testing.assert_array_equal(kernel, up.T)
    np.testing.assert_array_equal(tree["bert"]["embeddings"]["word_embeddings"]["embedding"], word)
    assert set(layer["output"]["LayerNorm"]) == {"scale", "bias"}

    # GPT-2's Conv1D weight is (in, out) already: its kernel is the same array, still (in, out).
    source, _ = hf_model("gpt2")
    _convert(source, tmp_path / "gpt2", "flax")
    fc = _flax_tree(tmp_path / "gpt2")["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"]
    with open_checkpoint(source) as hf:
        assert fc.shape == (16, 64)
        np.testing.assert_array_equal(fc, hf.get("transformer.h.0.mlp.c_fc.weight"))

    # ViT patch convolution: (out, in, kh, kw) -> (kh, kw, in, out).
    source, _ = hf_model("vit")
    _convert(source, tmp_path / "vit", "flax")
    conv = _flax_tree(tmp_path / "vit")["vit"]["embeddings"]["patch_embeddings"]["projection"]["kernel"]
    with open_checkpoint(source) as hf:
        np.testing.assert_array_equal(conv, hf.get("vit.embeddings.patch_embeddings.projection.weight").transpose(2, 3, 1, 0))


def test_hf_orbax_hf_keeps_logits(hf_model, model_logits, tmp_path):
    source, model_cls = hf_model("bert")
    _convert(source, tmp_path / "orbax", "orbax")
    with open_checkpoint(tmp_path / "orbax") as reader:
        assert reader.format == "orbax"
        assert reader.shape("bert.encoder.layer.1.output.dense.kernel") == (24, 16)
    _convert(tmp_path / "orbax", tmp_path / "back", "hf")
    _assert_same_tensors(source, tmp_path / "back")
    np.testing.assert_array_equal(
        model_logits(model_cls.from_pretrained(source).eval(), "bert"),
        model_logits(model_cls.from_pretrained(tmp_path / "back").eval(), "bert"),
    )


@pytest.mark.parametrize("kind", ["t5", "t5_v1_1"])
def test_hf_t5x_hf_keeps_logits(kind, hf_model, model_logits, tmp_path):
    source, model_cls = hf_model(kind)
    _convert(source, tmp_path / "t5x", "t5x")
    with open_checkpoint(tmp_path / "t5x") as reader, open_checkpoint(source) as hf:
        assert reader.format == "t5x"
        assert "target.encoder.layers_1.attention.query.kernel" in reader
        assert ("target.encoder.layers_0.mlp.wi_0.kernel" in reader) == (kind == "t5_v1_1")
        # transformers 5 ties T5's lm_head to `shared` and does not save it; T5X then has no logits_dense.
        assert ("target.decoder.logits_dense.kernel" in reader) == ("lm_head.weight" in hf)
    _convert(tmp_path / "t5x", tmp_path / "back", "hf")
    with open_checkpoint(source) as a, open_checkpoint(tmp_path / "back") as b:
        kept = [n for n in a.keys() if not n.endswith("embed_tokens.weight")]  # tied to shared
        assert sorted(b.keys()) == sorted(kept)
        for name in kept:
            np.testing.assert_array_equal(a.get(name), b.get(name))
    np.testing.assert_array_equal(
        model_logits(model_cls.from_pretrained(source).eval(), kind),
        model_logits(model_cls.from_pretrained(tmp_path / "back").eval(), kind),
    )


def test_bf16_survives_every_format(tmp_path):
    import ml_dtypes

    from drm_jax.io import write_checkpoint

    rng = np.random.default_rng(0)
    tensors = {
        "encoder.block.0.layer.0.SelfAttention.q.weight": rng.normal(size=(6, 4)).astype(ml_dtypes.bfloat16),
        "encoder.final_layer_norm.weight": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
        "shared.weight": rng.normal(size=(10, 4)).astype(np.float32),
    }
    write_checkpoint(tensors, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "t5", "feed_forward_proj": "relu"}))
    previous = tmp_path / "hf"
    for step, fmt in enumerate(["flax", "orbax", "t5x", "hf"]):
        _convert(previous, tmp_path / f"{step}-{fmt}", fmt)
        previous = tmp_path / f"{step}-{fmt}"
    with open_checkpoint(previous) as reader:
        for name, expected in tensors.items():
            got = reader.get(name)
            assert got.dtype == expected.dtype, name
            np.testing.assert_array_equal(got, expected)
