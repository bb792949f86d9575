"""Architecture knowledge as data, in one table: how each model family names its repeated layers, which
tensors are embeddings and heads, which 2-D weights are stored (in, out), which tensors are indexed by
token ids, and which config.json key holds the layer count.

Pure data (no jax, no numpy), at the bottom of the package beside `drm_jax.errors`, so that the engine
(`drm_jax.engine.roles`: the default exclusions), io (`drm_jax.io.architectures`: layer naming, GPT-2's
Conv1D orientation, config.json detection) and the config planner (`drm_jax.config.vocabulary`) all
read the same rows; engine and io are siblings and may not import each other.

Every tensor name is a Hugging Face (PyTorch) name. A family is keyed by the name-map table that
`drm_jax.io.architectures.detect_architecture` returns for its config.json `model_type`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerStack:
    """One stack of repeated layers (a decoder-only model has one; T5 has an encoder and a decoder stack,
    CLIP a text and a vision tower).

    pattern: regex over tensor names with the groups `head` (up to the index), `index` and `tail`, as
      mergekit's `${layer_index}` templates; several alternatives (old and new transformers names) are
      joined in one regex.
    num_layers_keys: config.json keys of the stack's layer count, dotted for nested configs
      ("text_config.num_hidden_layers"); the first one the config.json has is read and written (the
      first one when it has none).
    per_layer_keys: config.json keys of lists with one entry per layer of the stack (transformers 5's
      `layer_types` of Qwen2/3 and Gemma-2), sliced with the layers.
    """

    name: str
    pattern: str
    num_layers_keys: tuple[str, ...]
    per_layer_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Architecture:
    """What drm_jax knows about one model family.

    model_types: config.json `model_type` values of the family.
    stacks: its layer stacks (empty: no layer naming, so no slices or gradients).
    before: regex of the tensors outside the layers that come before them (mergekit's pre_weights:
      embeddings); every other tensor outside the layers comes after them (final norm, heads, pooler).
    embedding_and_head_names: dotted-name components of embeddings and LM heads: 2-D weights that are not
      a linear layer's (out of DRM by default).
    in_out: regex of the 2-D weights stored (in, out) under Hugging Face names (GPT-2's Conv1D); every
      other 2-D weight is (out, in).
    vocabulary: regexes (full match) of the tensors whose first axis is indexed by token ids.
    """

    model_types: tuple[str, ...]
    stacks: tuple[LayerStack, ...] = ()
    before: str = r"(?!)"
    embedding_and_head_names: tuple[str, ...] = ()
    in_out: str | None = None
    vocabulary: tuple[str, ...] = ()


_TOKENS = r"^(?:.*\.)?{}\.weight$"  # a token embedding under any prefix
_HEAD = r"^{}\.(?:weight|bias)$"  # an LM head at the top level

# T5 v1.0 (tied lm_head, DenseReluDense.wi) and v1.1 / mT5 / UMT5 (gated wi_0 / wi_1): two stacks
_T5 = Architecture(
    model_types=("t5",),
    stacks=(LayerStack("encoder", r"^(?P<head>encoder\.block\.)(?P<index>\d+)(?P<tail>\..+)$", ("num_layers",)),
            LayerStack("decoder", r"^(?P<head>decoder\.block\.)(?P<index>\d+)(?P<tail>\..+)$",
                       ("num_decoder_layers", "num_layers"))),
    before=r"^((encoder|decoder)\.embed_tokens|shared)\.",
    embedding_and_head_names=("shared", "embed_tokens", "relative_attention_bias", "lm_head"),
    vocabulary=(_TOKENS.format("embed_tokens"), r"^(?:model\.)?shared\.weight$", _HEAD.format("lm_head")))

ARCHITECTURES: dict[str, Architecture] = {
    # Llama and the models of its naming: Mistral, Qwen2, Qwen3, Gemma, Gemma-2, Phi-3 and Mixtral (experts and
    # router inside the layers: `model.layers.<i>.mlp.experts...`)
    "llama": Architecture(
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"),
        stacks=(LayerStack("layers", r"^(?P<head>model\.layers\.)(?P<index>\d+)(?P<tail>\..+)$",
                           ("num_hidden_layers",), ("layer_types",)),),
        before=r"(^|\.)embed_tokens\.",
        embedding_and_head_names=("embed_tokens", "lm_head"),
        vocabulary=(_TOKENS.format("embed_tokens"), _HEAD.format("lm_head"))),
    "gpt2": Architecture(
        model_types=("gpt2",),
        stacks=(LayerStack("h", r"^(?P<head>(transformer\.)?h\.)(?P<index>\d+)(?P<tail>\..+)$", ("n_layer",)),),
        before=r"(^|\.)(wte|wpe)\.",
        embedding_and_head_names=("wte", "wpe", "lm_head"),
        in_out=r"(^|\.)(c_attn|c_proj|c_fc|q_attn)\.weight$",
        vocabulary=(_TOKENS.format("wte"), _HEAD.format("lm_head"))),
    "gpt_neox": Architecture(
        model_types=("gpt_neox",),
        stacks=(LayerStack("layers", r"^(?P<head>(gpt_neox\.)?layers\.)(?P<index>\d+)(?P<tail>\..+)$",
                           ("num_hidden_layers",)),),
        before=r"(^|\.)embed_in\.",
        embedding_and_head_names=("embed_in", "embed_out", "lm_head"),
        vocabulary=(_TOKENS.format("embed_in"), _HEAD.format("embed_out"), _HEAD.format("lm_head"))),
    # BERT, RoBERTa and XLM-R, bare or under a task head's prefix
    "bert": Architecture(
        model_types=("bert", "roberta", "xlm-roberta"),
        stacks=(LayerStack("layer", r"^(?P<head>((bert|roberta)\.)?encoder\.layer\.)(?P<index>\d+)(?P<tail>\..+)$",
                           ("num_hidden_layers",)),),
        before=r"(^|\.)embeddings\.",
        embedding_and_head_names=("word_embeddings", "position_embeddings", "token_type_embeddings"),
        vocabulary=(_TOKENS.format("word_embeddings"),)),
    "t5": _T5,
    # mT5 and UMT5 are T5 v1.1 (gated); a "t5" config.json with a gated feed_forward_proj is too
    "t5_v1_1": dataclasses.replace(_T5, model_types=("mt5", "umt5")),
    # ViT: `vit.layers.<i>` (transformers 5), `vit.encoder.layer.<i>` (4.x), bare under ViTModel
    "vit": Architecture(
        model_types=("vit",),
        stacks=(LayerStack("layers", r"^(?P<head>(vit\.)?(encoder\.layer|layers)\.)(?P<index>\d+)(?P<tail>\..+)$",
                           ("num_hidden_layers",)),),
        before=r"(^|\.)embeddings\.",
        embedding_and_head_names=("position_embeddings",)),
    # CLIP: a text and a vision tower (CLIPTextModel / CLIPVisionModel alone: one of them, flat config)
    "clip": Architecture(
        model_types=("clip", "clip_text_model", "clip_vision_model"),
        stacks=(LayerStack("text", r"^(?P<head>text_model\.encoder\.layers\.)(?P<index>\d+)(?P<tail>\..+)$",
                           ("text_config.num_hidden_layers", "num_hidden_layers")),
                LayerStack("vision", r"^(?P<head>vision_model\.encoder\.layers\.)(?P<index>\d+)(?P<tail>\..+)$",
                           ("vision_config.num_hidden_layers", "num_hidden_layers"))),
        before=r"(^|\.)(embeddings|pre_layrnorm)\.",
        embedding_and_head_names=("token_embedding", "position_embedding"),
        vocabulary=(_TOKENS.format("token_embedding"),)),
}

# Embeddings and heads of models no row names (OPT, LLaMA's original `tok_embeddings`, Flax `Embed`
# modules, T5X's names), excluded from DRM by default all the same.
OTHER_EMBEDDING_AND_HEAD_NAMES = (
    "tok_embeddings", "token_embeddings", "embedding", "embeddings_table", "positional_embedding",
    "embed_positions", "rel_embedding", "output_embedding", "logits_dense",
)


def _union(groups) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for group in groups:
        seen.update(dict.fromkeys(group))
    return tuple(seen)


# Name components of embeddings and LM heads: a 2-D weight whose dotted name contains one of them as a
# whole component is not a linear layer's weight (the engine's default exclusion).
EMBEDDING_AND_HEAD_NAMES = _union([a.embedding_and_head_names for a in ARCHITECTURES.values()]
                                  + [OTHER_EMBEDDING_AND_HEAD_NAMES])
DEFAULT_EXCLUDE = (r"(^|\.)(" + "|".join(map(re.escape, EMBEDDING_AND_HEAD_NAMES)) + r")(\.|$)",)
# Tensors whose first axis is indexed by token ids, in any family (vocabulary alignment).
VOCABULARY_TENSORS = re.compile("|".join(_union(a.vocabulary for a in ARCHITECTURES.values())))
# config.json model_type -> family
MODEL_TYPES = {t: name for name, a in ARCHITECTURES.items() for t in a.model_types}

__all__ = ["ARCHITECTURES", "Architecture", "DEFAULT_EXCLUDE", "EMBEDDING_AND_HEAD_NAMES", "LayerStack",
           "MODEL_TYPES", "OTHER_EMBEDDING_AND_HEAD_NAMES", "VOCABULARY_TENSORS"]
