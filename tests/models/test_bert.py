"""The Flax BERT encoder against transformers' PyTorch BertModel on the same (tiny, random) weights."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drm_jax.errors import CheckpointError, ConfigError
from drm_jax.models import BertConfig, BertModel, flax_to_hf, hf_to_flax, load_hf_bert, mean_pool, save_hf_bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=40, type_vocab_size=2)


@pytest.fixture(scope="module")
def torch_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(**TINY, attn_implementation="eager")
    model = transformers.BertModel(config).eval()
    # Random (not default-initialised) LayerNorms and biases so every parameter is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("LayerNorm.weight") else 0.0))
    return model


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, TINY["vocab_size"], size=(3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    types = np.zeros_like(ids)
    types[0, 5:] = 1
    return ids, mask, types


def _state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_matches_transformers_bertmodel(torch_bert, batch):
    ids, mask, types = batch
    params = hf_to_flax(_state(torch_bert))
    config = BertConfig.from_dict(torch_bert.config.to_dict())
    hidden, pooled = BertModel(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                                             jnp.asarray(types))
    with torch.no_grad():
        ref = torch_bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         token_type_ids=torch.tensor(types))
    assert hidden.shape == (3, 11, TINY["hidden_size"])
    np.testing.assert_allclose(np.asarray(hidden), ref.last_hidden_state.numpy(), atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=2e-6, rtol=0)


def test_padding_does_not_change_real_tokens(torch_bert, batch):
    ids, mask, _ = batch
    params = hf_to_flax(_state(torch_bert))
    model = BertModel(BertConfig(**TINY), add_pooling_layer=False)
    full, _ = model.apply({"params": params}, jnp.asarray(ids[2:3, :3]))
    padded, none = model.apply({"params": params}, jnp.asarray(ids[2:3]), jnp.asarray(mask[2:3]))
    assert none is None
    np.testing.assert_allclose(np.asarray(padded[:, :3]), np.asarray(full), atol=1e-6)
    pooled = mean_pool(padded, jnp.asarray(mask[2:3]))
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(full).mean(axis=1), atol=1e-6)


def test_hf_flax_round_trip_is_exact(torch_bert):
    state = _state(torch_bert)
    back = flax_to_hf(hf_to_flax(state))
    floats = {k for k, v in state.items() if np.issubdtype(v.dtype, np.floating)}
    assert set(back) == floats
    for name in floats:
        np.testing.assert_array_equal(back[name], state[name])
    kernel = hf_to_flax(state)["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"]
    assert kernel.shape == (TINY["hidden_size"], TINY["intermediate_size"])  # flax (in, out)


def test_save_then_transformers_loads(tmp_path, torch_bert, batch):
    ids, mask, _ = batch
    params = hf_to_flax(_state(torch_bert))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    out = save_hf_bert(tmp_path / "ckpt", BertConfig(**TINY), params, tokenizer_from=tmp_path / "src")
    assert (out / "vocab.txt").is_file() and not list(tmp_path.glob(".ckpt*"))
    loaded = transformers.BertModel.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        a = loaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        b = torch_bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    config, again = load_hf_bert(out)
    assert config == BertConfig(**TINY)
    assert jax.tree_util.tree_all(jax.tree.map(lambda x, y: np.array_equal(x, y), again, params))
    save_hf_bert(out, config, params)  # overwriting an existing directory is atomic too
    assert (out / "model.safetensors").is_file()


def test_bad_checkpoints_raise_named_errors(tmp_path, torch_bert):
    from safetensors.numpy import save_file

    state = _state(torch_bert)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    del state["encoder.layer.1.output.dense.weight"]
    save_file({k: v for k, v in state.items() if v.dtype == np.float32}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="encoder.layer.1.output.dense.weight"):
        load_hf_bert(tmp_path)
    state["encoder.layer.1.output.dense.weight"] = np.zeros((5, 7), np.float32)
    save_file({k: v for k, v in state.items() if v.dtype == np.float32}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"output.dense.weight.*\(5, 7\)"):
        load_hf_bert(tmp_path)
    with pytest.raises(ConfigError, match="relative_key"):
        BertConfig.from_dict({**TINY, "position_embedding_type": "relative_key"})
