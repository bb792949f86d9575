"""Model definitions in Flax that read and write Hugging Face checkpoints (transformers 5 has none)."""

from drm_jax.models.bert import (
    BertConfig,
    BertModel,
    flax_to_hf,
    hf_to_flax,
    load_hf_bert,
    mean_pool,
    save_hf_bert,
)

__all__ = ["BertConfig", "BertModel", "flax_to_hf", "hf_to_flax", "load_hf_bert", "mean_pool", "save_hf_bert"]
