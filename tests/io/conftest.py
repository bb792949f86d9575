"""Fixtures for the checkpoint-format tests: tiny random-weight transformers models (no downloads).

`hf_model(kind)` (session-scoped factory) saves one model with `save_pretrained` under a temporary
directory, plus a tokenizer file, and returns (directory, model class); each model is built once per
session. `model_logits(model, kind)` runs a model on fixed inputs. (Helpers live here, not in an
importable module: this directory is named `io`, like the standard library module.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def _configs() -> dict:
    """kind -> (transformers model class, tiny config)."""
    import transformers as tf

    t5 = dict(vocab_size=40, d_model=12, d_kv=4, d_ff=20, num_layers=2, num_heads=3,
              relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return {
        "t5": (tf.T5ForConditionalGeneration, tf.T5Config(**t5)),
        "t5_v1_1": (tf.T5ForConditionalGeneration,
                    tf.T5Config(**t5, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
        "bert": (tf.BertForSequenceClassification, tf.BertConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
            max_position_embeddings=32, num_labels=3)),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(
            vocab_size=40, n_embd=16, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2)),
        "vit": (tf.ViTForImageClassification, tf.ViTConfig(
            image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=24, num_labels=3)),
        "clip": (tf.CLIPModel, tf.CLIPConfig(
            text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                             num_attention_heads=4, max_position_embeddings=16, bos_token_id=1, eos_token_id=2),
            vision_config=dict(image_size=8, patch_size=4, hidden_size=16, intermediate_size=24,
                               num_hidden_layers=1, num_attention_heads=4),
            projection_dim=8)),
    }


def _model_inputs(kind: str) -> dict:
    """Fixed example inputs for a model kind (torch tensors)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (2, 7), generator=generator)
    pixels = torch.randn(2, 3, 8, 8, generator=generator)
    if kind.startswith("t5"):
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    if kind == "vit":
        return {"pixel_values": pixels}
    if kind == "clip":
        return {"input_ids": ids, "pixel_values": pixels}
    return {"input_ids": ids}


def _model_outputs(model, kind: str) -> np.ndarray:
    """The model's logits (CLIP: image-text logits) on the fixed inputs, as float32 numpy."""
    import torch

    with torch.no_grad():
        out = model(**_model_inputs(kind))
    logits = out.logits_per_image if kind == "clip" else out.logits
    return logits.float().numpy()


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """Factory: kind -> (saved model directory, model class). Random weights, seeded; built once each."""
    import torch

    all_configs = _configs()
    cache: dict[str, tuple[Path, type]] = {}

    def build(kind: str) -> tuple[Path, type]:
        if kind not in cache:
            model_cls, config = all_configs[kind]
            torch.manual_seed(0)
            model = model_cls(config).eval()
            directory = tmp_path_factory.mktemp(f"hf-{kind}")
            model.save_pretrained(directory)
            (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
            cache[kind] = (directory, model_cls)
        return cache[kind]

    return build


@pytest.fixture(scope="session")
def model_logits():
    """Function (model, kind) -> logits on fixed inputs, float32 numpy."""
    return _model_outputs
