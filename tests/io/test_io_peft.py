"""PEFT LoRA adapter directories: deltas are scaling * B @ A in the base weight's layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from drm_jax.cli.main import main
from drm_jax.errors import CheckpointError
from drm_jax.io import open_checkpoint, write_checkpoint

RNG = np.random.default_rng(0)
BASE = {
    "model.layers.0.self_attn.q_proj.weight": RNG.normal(size=(8, 6)).astype(np.float32),  # (out, in)
    "model.layers.0.self_attn.v_proj.weight": RNG.normal(size=(4, 6)).astype(np.float32),
    "model.layers.0.self_attn.v_proj.bias": RNG.normal(size=(4,)).astype(np.float32),
    "model.embed_tokens.weight": RNG.normal(size=(10, 6)).astype(np.float32),
    "transformer.h.0.attn.c_attn.weight": RNG.normal(size=(6, 9)).astype(np.float32),  # Conv1D (in, out)
    "model.norm.weight": RNG.normal(size=(6,)).astype(np.float32),
    "lm_head.weight": RNG.normal(size=(10, 6)).astype(np.float32),
}


def _lora(r: int, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    return RNG.normal(size=(r, fan_in)).astype(np.float32), RNG.normal(size=(fan_out, r)).astype(np.float32)


def _write_adapter(directory: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    write_checkpoint({f"base_model.model.{k}": v for k, v in tensors.items()}, directory)
    (directory / "model.safetensors").rename(directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return directory


@pytest.fixture()
def adapter(tmp_path):
    """A hand-written adapter: q_proj (r=2), v_proj with rank_pattern r=3, alpha_pattern and lora_B.bias,
    an embedding, and norm saved whole (modules_to_save)."""
    q_a, q_b = _lora(2, 6, 8)
    v_a, v_b = _lora(3, 6, 4)
    e_a, e_b = RNG.normal(size=(2, 10)).astype(np.float32), RNG.normal(size=(6, 2)).astype(np.float32)
    v_bias = RNG.normal(size=(4,)).astype(np.float32)
    norm = RNG.normal(size=(6,)).astype(np.float32)
    tensors = {
        "model.layers.0.self_attn.q_proj.lora_A.weight": q_a,
        "model.layers.0.self_attn.q_proj.lora_B.weight": q_b,
        "model.layers.0.self_attn.v_proj.lora_A.weight": v_a,
        "model.layers.0.self_attn.v_proj.lora_B.weight": v_b,
        "model.layers.0.self_attn.v_proj.lora_B.bias": v_bias,
        "model.embed_tokens.lora_embedding_A": e_a,
        "model.embed_tokens.lora_embedding_B": e_b,
        "model.norm.weight": norm,
    }
    config = {"r": 2, "lora_alpha": 8, "rank_pattern": {"v_proj": 3}, "alpha_pattern": {"layers.0.self_attn.v_proj": 6},
              "target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["norm"]}
    expected = {
        "model.layers.0.self_attn.q_proj.weight": (8 / 2) * q_b @ q_a,
        "model.layers.0.self_attn.v_proj.weight": (6 / 3) * v_b @ v_a,
        "model.layers.0.self_attn.v_proj.bias": (6 / 3) * v_bias,
        "model.embed_tokens.weight": (8 / 2) * (e_b @ e_a).T,
        "model.norm.weight": norm - BASE["model.norm.weight"],
    }
    return _write_adapter(tmp_path / "adapter", config, tensors), expected


def test_lora_deltas_are_scaled_b_at_a(adapter, tmp_path):
    directory, expected = adapter
    base_dir = write_checkpoint(BASE, tmp_path / "base")
    with open_checkpoint(directory, base=base_dir) as reader:
        assert reader.format == "peft"
        assert sorted(reader.keys()) == sorted(expected)
        for name, delta in expected.items():
            got = reader.delta(name)
            assert got.shape == BASE[name].shape == reader.shape(name)
            np.testing.assert_allclose(got, delta, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(reader.get(name), BASE[name] + delta, rtol=1e-6, atol=1e-6)
            assert reader.get(name).dtype == BASE[name].dtype


def test_lora_deltas_without_base_and_full_weights_need_it(adapter):
    directory, expected = adapter
    with open_checkpoint(directory) as reader:
        name = "model.layers.0.self_attn.q_proj.weight"
        np.testing.assert_allclose(reader.delta(name), expected[name], rtol=1e-6, atol=1e-6)
        assert reader.shape(name) == (8, 6)
        with pytest.raises(CheckpointError, match="needs the base model"):
            reader.get(name)


def test_fan_in_fan_out_and_rslora(tmp_path):
    a, b = _lora(4, 6, 9)
    directory = _write_adapter(tmp_path / "adapter", {"r": 4, "lora_alpha": 3, "use_rslora": True, "fan_in_fan_out": True},
                               {"transformer.h.0.attn.c_attn.lora_A.weight": a,
                                "transformer.h.0.attn.c_attn.lora_B.weight": b})
    with open_checkpoint(directory, base=write_checkpoint(BASE, tmp_path / "base")) as reader:
        delta = reader.delta("transformer.h.0.attn.c_attn.weight")
        assert delta.shape == (6, 9)  # GPT-2 Conv1D layout (in, out)
        np.testing.assert_allclose(delta, (3 / math.sqrt(4)) * (b @ a).T, rtol=1e-6, atol=1e-6)


def test_convert_merges_adapter_into_base(adapter, tmp_path):
    directory, expected = adapter
    base_dir = write_checkpoint(BASE, tmp_path / "base")
    assert main(["convert", str(directory), str(tmp_path / "merged"), "--to", "hf", "--base", str(base_dir)]) == 0
    with open_checkpoint(tmp_path / "merged") as merged:
        assert sorted(merged.keys()) == sorted(BASE)
        for name, base in BASE.items():
            np.testing.assert_allclose(merged.get(name), base + expected.get(name, 0), rtol=1e-6, atol=1e-6)


def test_bad_adapters(tmp_path, capsys):
    a, b = _lora(2, 6, 8)
    dora = _write_adapter(tmp_path / "dora", {"r": 2, "lora_alpha": 2, "use_dora": True},
                          {"x.lora_A.weight": a, "x.lora_B.weight": b})
    with pytest.raises(CheckpointError, match="DoRA"):
        open_checkpoint(dora)
    lonely = _write_adapter(tmp_path / "lonely", {"r": 2, "lora_alpha": 2}, {"x.lora_A.weight": a})
    with pytest.raises(CheckpointError, match="lora_A without lora_B"):
        open_checkpoint(lonely)
    adapter = _write_adapter(tmp_path / "ok", {"r": 2, "lora_alpha": 2}, {"x.lora_A.weight": a, "x.lora_B.weight": b})
    assert main(["convert", str(adapter), str(tmp_path / "out"), "--to", "hf"]) == 2  # no base given
    assert "needs the base model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.optional
def test_adapter_saved_by_peft_matches_peft_merge(hf_model, tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    source, model_cls = hf_model("llama")
    torch.manual_seed(3)
    model = peft.get_peft_model(
        model_cls.from_pretrained(source),
        peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj", "embed_tokens"],
                        rank_pattern={"down_proj": 2}, init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.detach().float().numpy() for k, v in model.merge_and_unload().state_dict().items()}

    with open_checkpoint(tmp_path / "adapter", base=source) as reader:
        assert any(n.endswith("down_proj.weight") for n in reader.keys())
        assert "model.embed_tokens.weight" in reader
        for name in reader.keys():
            np.testing.assert_allclose(reader.get(name), merged[name], rtol=1e-5, atol=1e-6)
