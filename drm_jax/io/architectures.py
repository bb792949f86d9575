"""Name and layout maps between Hugging Face (PyTorch) names and the Flax and T5X conventions, as data.

Flax convention (the one transformers 4.x Flax models used): a linear weight (out, in) named `weight`
becomes a `kernel` of shape (in, out); an embedding table keeps its (num, dim) layout and is named
`embedding`; a LayerNorm weight is named `scale`; RMSNorm-style weights of T5 and Llama keep the name
`weight` (FlaxT5LayerNorm, FlaxLlamaRMSNorm); an N-D convolution (out, in, *window) becomes a kernel
(*window, in, out); biases and free parameters (ViT `cls_token`, CLIP `logit_scale`) keep name and layout.
Module paths are unchanged: "encoder.layer.0.attention.self.query.weight" <->
"encoder.layer.0.attention.self.query.kernel" (nested dict keys joined by ".").

GPT-2's Conv1D stores its weight as (in, out) already, in PyTorch too: it maps to a `kernel` without a
transpose, so every Flax kernel written here is (in, out). (transformers 4.x's FlaxGPT2 differed: it kept
the PyTorch-transposed (out, in) array and transposed it at call time.)

One table per architecture lists regular expressions over Hugging Face names with the parameter kind;
the first match wins, and names no rule matches fall back to the generic rules: a 2-D `weight` is a
transposed `kernel` (an `embedding` when its module name says "embed"), a 1-D `weight` a LayerNorm
`scale`, an N-D `weight` a convolution kernel, everything else unchanged.

The T5X map (Hugging Face T5 <-> the T5X "target.*" names, as in transformers'
convert_t5x_checkpoint_to_pytorch) is a table too: T5X kernels are (in, out) and its relative position
bias is (heads, buckets), the transpose of Hugging Face's (buckets, heads).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, Mapping

import numpy as np

from drm_jax import arch as arch_data
from drm_jax.errors import CheckpointError, quote

Orientation = Literal["out_in", "in_out"]


@dataclasses.dataclass(frozen=True)
class ParamKind:
    """What a parameter is, which Flax leaf name it takes, and which axis of its 2-D PyTorch-layout
    array is the output (None for 1-D and N-D parameters)."""

    name: str
    flax_leaf: str | None  # None: the Flax name equals the Hugging Face name
    orientation: Orientation | None
    ndims: tuple[int, ...] | None  # ranks this kind applies to; None: any


LINEAR = ParamKind("linear", "kernel", "out_in", (2,))
CONV1D = ParamKind("conv1d", "kernel", "in_out", (2,))  # GPT-2 Conv1D: (in, out) in PyTorch
CONV = ParamKind("conv", "kernel", None, (3, 4, 5))
# Embedding rows are the vectors looked up (one per token/position): rows play the output role.
EMBEDDING = ParamKind("embedding", "embedding", "out_in", (2,))
NORM = ParamKind("norm", "scale", None, (1,))  # LayerNorm weight
NORM_WEIGHT = ParamKind("norm_weight", None, None, (1,))  # RMSNorm / T5LayerNorm: Flax kept "weight"
OTHER = ParamKind("other", None, None, None)  # biases, free parameters

# The tables: (regex searched in the Hugging Face name, kind). Only names ending in ".weight" are looked up.
_T5_RULES = (
    (r"(^|\.)(shared|embed_tokens)\.weight$", EMBEDDING),
    (r"\.relative_attention_bias\.weight$", EMBEDDING),
    (r"(^|\.)(layer_norm|final_layer_norm)\.weight$", NORM_WEIGHT),
    # q, k, v, o, DenseReluDense.wi / wi_0 / wi_1 (gated v1.1) / wo, lm_head
    (r"\.weight$", LINEAR),
)
_LLAMA_RULES = (
    (r"(^|\.)embed_tokens\.weight$", EMBEDDING),
    (r"(^|\.)(input_layernorm|post_attention_layernorm|norm)\.weight$", NORM_WEIGHT),
    (r"\.weight$", LINEAR),
)
_BERT_RULES = (
    (r"(^|\.)(word|position|token_type)_embeddings\.weight$", EMBEDDING),
    (r"(^|\.)LayerNorm\.weight$", NORM),
    (r"\.weight$", LINEAR),
)
_GPT2_RULES = (
    (r"(^|\.)(wte|wpe)\.weight$", EMBEDDING),
    (r"(^|\.)(ln_1|ln_2|ln_f|ln_cross_attn)\.weight$", NORM),
    (arch_data.ARCHITECTURES["gpt2"].in_out, CONV1D),  # stored (in, out): the architecture table says which
    (r"\.weight$", LINEAR),  # lm_head, score
)
_VIT_RULES = (
    (r"(^|\.)patch_embeddings\.projection\.weight$", CONV),
    (r"(^|\.)(layernorm_before|layernorm_after|layernorm)\.weight$", NORM),
    (r"\.weight$", LINEAR),
)
_CLIP_RULES = (
    (r"(^|\.)(token_embedding|position_embedding)\.weight$", EMBEDDING),
    (r"(^|\.)patch_embedding\.weight$", CONV),
    (r"(^|\.)(layer_norm1|layer_norm2|final_layer_norm|pre_layrnorm|post_layernorm)\.weight$", NORM),
    (r"\.weight$", LINEAR),  # q/k/v/out_proj, fc1, fc2, text_projection, visual_projection
)

ARCHITECTURE_RULES: dict[str, tuple[tuple[str, ParamKind], ...]] = {
    "t5": _T5_RULES,  # T5 v1.0: DenseReluDense.wi, tied lm_head
    "t5_v1_1": _T5_RULES,  # gated GELU: DenseReluDense.wi_0 / wi_1, separate lm_head; same kinds
    "llama": _LLAMA_RULES,
    "bert": _BERT_RULES,
    "gpt2": _GPT2_RULES,
    "vit": _VIT_RULES,
    "clip": _CLIP_RULES,
    "gpt_neox": (),  # the generic rules name its tensors right
    "generic": (),
}
ARCHITECTURES = tuple(ARCHITECTURE_RULES)
_COMPILED = {arch: tuple((re.compile(pattern), kind) for pattern, kind in rules)
             for arch, rules in ARCHITECTURE_RULES.items()}

# `architectures` class-name fragments -> model_type, for a config.json without a model_type
_CLASS_NAMES = (("t5", "t5"), ("llama", "llama"), ("bert", "bert"), ("gpt2", "gpt2"), ("gptneox", "gpt_neox"),
                ("vit", "vit"), ("clip", "clip"))


def detect_architecture(config: Mapping | None) -> str:
    """The name-map table for a Hugging Face config.json dict: one of ARCHITECTURES ("generic" if unknown).

    T5 configs whose feed_forward_proj is gated ("gated-gelu", T5 v1.1) give "t5_v1_1".
    """
    if not config or not isinstance(config, Mapping):
        return "generic"
    model_type = str(config.get("model_type", "")).lower()
    if not model_type:
        # A config.json with wrong types (architectures: 5) tells us nothing: generic names.
        architectures = config.get("architectures")
        if not isinstance(architectures, (list, tuple)):
            architectures = ()
        names = " ".join(str(a) for a in architectures).lower()
        model_type = next((t for fragment, t in _CLASS_NAMES if fragment in names), "")
    arch = arch_data.MODEL_TYPES.get(model_type, "generic")
    if arch == "t5" and str(config.get("feed_forward_proj", "relu")).startswith("gated"):
        arch = "t5_v1_1"
    return arch


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURE_RULES:
        raise CheckpointError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def _generic_kind(hf_name: str, ndim: int | None) -> ParamKind:
    if not hf_name.endswith(".weight") and hf_name != "weight":
        return OTHER
    ndim = 2 if ndim is None else ndim
    if ndim == 1:
        return NORM
    if ndim == 2:
        module = hf_name.rsplit(".", 2)[-2] if "." in hf_name else ""
        return EMBEDDING if "embed" in module.lower() else LINEAR
    if ndim >= 3:
        return CONV
    return OTHER


def param_kind(arch: str, hf_name: str, ndim: int | None = None) -> ParamKind:
    """The kind of Hugging Face parameter `hf_name` in architecture `arch`.

    `ndim` (the array's rank) makes the answer exact: a table rule applies only to the ranks of its kind
    (a stray 1-D weight matched by a table's catch-all linear rule falls back to the generic rules).
    """
    _check_arch(arch)
    if hf_name.endswith(".weight"):
        for pattern, kind in _COMPILED[arch]:
            if pattern.search(hf_name) and (ndim is None or kind.ndims is None or ndim in kind.ndims):
                return kind
    return _generic_kind(hf_name, ndim)


def weight_kind(arch: str, name: str, ndim: int | None = None) -> str:
    """"linear" | "conv1d" | "conv" | "embedding" | "norm" | "norm_weight" | "other" for a Hugging Face or
    Flax name (Flax names are mapped back first)."""
    return param_kind(arch, from_flax_name(arch, name, ndim), ndim).name


def weight_orientation(arch: str, name: str, ndim: int | None = 2) -> Orientation | None:
    """Which axis of 2-D parameter `name` is the output: "out_in" (PyTorch Linear, embeddings) or
    "in_out" (GPT-2 Conv1D; every Flax/T5X `kernel`); None for 1-D/N-D parameters, norms and biases.

    Accepts Hugging Face names and Flax names (a name ending in ".kernel" is always (in, out)).
    """
    _check_arch(arch)
    if ndim is not None and ndim != 2:
        return None
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "kernel":
        return "in_out"
    if leaf == "embedding":
        return "out_in"
    if leaf == "rel_embedding":  # T5X relative position bias (heads, buckets): not a linear map
        return None
    return param_kind(arch, name, ndim).orientation


# --- layer-indexed names (slices and layer renumbering) ----------------------------------------------------


# The rows live in `drm_jax.arch` (one table: layer stacks, embeddings and heads, orientation, vocabulary).
# The longest layer index read from a tensor name (a million layers is beyond any model).
MAX_LAYER_DIGITS = 6
_STACKS = {name: tuple((re.compile(stack.pattern), stack) for stack in row.stacks)
           for name, row in arch_data.ARCHITECTURES.items() if row.stacks}
_BEFORE = {name: re.compile(row.before) for name, row in arch_data.ARCHITECTURES.items()}


def layer_naming(arch: str) -> arch_data.Architecture | None:
    """The architecture table's row of `arch` when it names layers (has layer stacks), else None."""
    _check_arch(arch)
    return arch_data.ARCHITECTURES[arch] if arch in _STACKS else None


def _match(arch: str, name: str) -> tuple[re.Match, arch_data.LayerStack] | None:
    for pattern, stack in _STACKS.get(arch, ()):
        match = pattern.match(name)
        if match is not None:
            return match, stack
    return None


def layer_stack(arch: str, name: str) -> arch_data.LayerStack | None:
    """The layer stack a Hugging Face tensor name belongs to (T5's "encoder" or "decoder"), or None."""
    found = _match(arch, name)
    return None if found is None else found[1]


def layer_index(arch: str, name: str) -> int | None:
    """The layer index in a Hugging Face tensor name ("model.layers.7.mlp.up_proj.weight" -> 7), within its
    stack, or None for a tensor outside the layers (or an architecture without layer naming)."""
    found = _match(arch, name)
    if found is None:
        return None
    text = found[0].group("index")
    # "layers.00" would be a second name of layer 0, a 5,000-digit index no model has (and int() refuses)
    if len(text) > MAX_LAYER_DIGITS or not text.isascii() or text != str(int(text)):
        raise CheckpointError(f"tensor {quote(name)}: layer index {quote(text)} is not a plain decimal number of "
                              f"at most {MAX_LAYER_DIGITS} digits")
    return int(text)


def with_layer_index(arch: str, name: str, index: int) -> str:
    """The same tensor of layer `index` ("model.layers.7.mlp.up_proj.weight", 2 -> "model.layers.2.mlp...")."""
    found = _match(arch, name)
    if found is None:
        raise CheckpointError(f"tensor {name!r} is not layer-indexed in architecture {arch!r}")
    match = found[0]
    return f"{match.group('head')}{int(index)}{match.group('tail')}"


def before_layers(arch: str, name: str) -> bool:
    """Whether a tensor outside the layers comes before them (embeddings) rather than after."""
    return arch in _STACKS and bool(_BEFORE[arch].search(name))


def config_value(config: Mapping, key: str):
    """The value at a dotted config.json key ("text_config.num_hidden_layers"), or None."""
    for part in key.split("."):
        if not isinstance(config, Mapping) or part not in config:
            return None
        config = config[part]
    return config


def num_layers_key(stack: arch_data.LayerStack, config: Mapping | None) -> str:
    """The config.json key of a stack's layer count: the first of its keys the config has, else the first."""
    return next((k for k in stack.num_layers_keys if config_value(config or {}, k) is not None),
                stack.num_layers_keys[0])


# --- Hugging Face <-> Flax ------------------------------------------------------------------------------

_FLAX_WEIGHT_LEAVES = ("kernel", "embedding", "scale")


def _split_leaf(name: str) -> tuple[str, str]:
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def to_flax_name(arch: str, hf_name: str, ndim: int | None = None) -> str:
    """Flax name of Hugging Face parameter `hf_name` ("...query.weight" -> "...query.kernel")."""
    kind = param_kind(arch, hf_name, ndim)
    if kind.flax_leaf is None:
        return hf_name
    prefix, _ = _split_leaf(hf_name)
    return _join(prefix, kind.flax_leaf)


def from_flax_name(arch: str, flax_name: str, ndim: int | None = None) -> str:
    """Hugging Face name of Flax parameter `flax_name` (`kernel`, `embedding` and `scale` become `weight`)."""
    _check_arch(arch)
    prefix, leaf = _split_leaf(flax_name)
    if leaf in _FLAX_WEIGHT_LEAVES:
        return _join(prefix, "weight")
    return flax_name


def _conv_to_flax(array: np.ndarray) -> np.ndarray:
    """(out, in, *window) -> (*window, in, out)."""
    return np.transpose(array, (*range(2, array.ndim), 1, 0))


def _conv_from_flax(array: np.ndarray) -> np.ndarray:
    """(*window, in, out) -> (out, in, *window)."""
    return np.transpose(array, (array.ndim - 1, array.ndim - 2, *range(array.ndim - 2)))


def to_flax_array(arch: str, hf_name: str, array: np.ndarray) -> np.ndarray:
    """Array of `hf_name` in Flax layout: linear weights transposed to (in, out), convolutions to
    (*window, in, out); anything else (GPT-2 Conv1D included) unchanged. Exact: only axes move."""
    kind = param_kind(arch, hf_name, array.ndim)
    if kind is LINEAR:
        return array.T
    if kind is CONV:
        return _conv_to_flax(array)
    return array


def from_flax_array(arch: str, flax_name: str, array: np.ndarray) -> np.ndarray:
    """Inverse of `to_flax_array`, from the Flax name and array."""
    if _split_leaf(flax_name)[1] != "kernel":
        return array
    kind = param_kind(arch, from_flax_name(arch, flax_name, array.ndim), array.ndim)
    if kind is CONV1D or array.ndim < 2:
        return array
    return array.T if array.ndim == 2 else _conv_from_flax(array)


# --- Hugging Face T5 <-> T5X ----------------------------------------------------------------------------

T5X_PREFIX = "target."
_T5X_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}
_T5X_MLP = ("wi", "wi_0", "wi_1", "wo")
# (stack, HF sublayer index, HF attention module or None for the MLP, T5X module, T5X layer norm)
_T5X_SUBLAYERS = (
    ("encoder", 0, "SelfAttention", "attention", "pre_attention_layer_norm"),
    ("encoder", 1, None, "mlp", "pre_mlp_layer_norm"),
    ("decoder", 0, "SelfAttention", "self_attention", "pre_self_attention_layer_norm"),
    ("decoder", 1, "EncDecAttention", "encoder_decoder_attention", "pre_cross_attention_layer_norm"),
    ("decoder", 2, None, "mlp", "pre_mlp_layer_norm"),
)


def _t5x_rows() -> tuple[tuple[str, str, bool], ...]:
    """(Hugging Face template, T5X template without "target.", transpose); "{i}" is the layer index."""
    rows = [
        ("shared.weight", "token_embedder.embedding", False),
        # T5 and T5 v1.1 share one relative position bias per stack, stored in block 0 by Hugging Face.
        ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "encoder.relpos_bias.rel_embedding", True),
        ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "decoder.relpos_bias.rel_embedding", True),
        # UMT5 has one per layer.
        ("encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
         "encoder.layers_{i}.relpos_bias.rel_embedding", True),
        ("decoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
         "decoder.layers_{i}.relpos_bias.rel_embedding", True),
        ("encoder.final_layer_norm.weight", "encoder.encoder_norm.scale", False),
        ("decoder.final_layer_norm.weight", "decoder.decoder_norm.scale", False),
        ("lm_head.weight", "decoder.logits_dense.kernel", True),
    ]
    for stack, sublayer, attention, t5x_module, t5x_norm in _T5X_SUBLAYERS:
        hf_layer = f"{stack}.block.{{i}}.layer.{sublayer}"
        t5x_layer = f"{stack}.layers_{{i}}"
        rows.append((f"{hf_layer}.layer_norm.weight", f"{t5x_layer}.{t5x_norm}.scale", False))
        if attention is None:
            rows += [(f"{hf_layer}.DenseReluDense.{w}.weight", f"{t5x_layer}.mlp.{w}.kernel", True) for w in _T5X_MLP]
        else:
            rows += [(f"{hf_layer}.{attention}.{hf}.weight", f"{t5x_layer}.{t5x_module}.{t5x}.kernel", True)
                     for hf, t5x in _T5X_ATTENTION.items()]
    return tuple(rows)


T5X_NAME_TABLE = _t5x_rows()
# Hugging Face names with no T5X counterpart: the per-stack embeddings are tied to `shared`.
T5X_TIED = re.compile(r"^(encoder|decoder)\.embed_tokens\.weight$")


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_HF_TO_T5X = tuple((_template_regex(hf), t5x, transpose) for hf, t5x, transpose in T5X_NAME_TABLE)
_T5X_TO_HF = tuple((_template_regex(t5x), hf, transpose) for hf, t5x, transpose in T5X_NAME_TABLE)


def _lookup(table, name: str) -> tuple[str, bool] | None:
    for pattern, template, transpose in table:
        match = pattern.match(name)
        if match:
            return template.format(**match.groupdict()), transpose
    return None


def to_t5x_name(hf_name: str) -> str | None:
    """T5X name ("target.encoder.layers_0.attention.query.kernel") of a Hugging Face T5 name; None for the
    tied encoder/decoder `embed_tokens` copies of `shared`. Raises CheckpointError for non-T5 names."""
    if T5X_TIED.match(hf_name):
        return None
    found = _lookup(_HF_TO_T5X, hf_name)
    if found is None:
        raise CheckpointError(f"tensor {hf_name!r} has no T5X name (T5X output supports T5 models only)")
    return T5X_PREFIX + found[0]


def from_t5x_name(t5x_name: str) -> str:
    """Hugging Face T5 name of a T5X name (with or without the "target." prefix)."""
    bare = t5x_name[len(T5X_PREFIX):] if t5x_name.startswith(T5X_PREFIX) else t5x_name
    found = _lookup(_T5X_TO_HF, bare)
    if found is None:
        raise CheckpointError(f"T5X tensor {t5x_name!r} has no Hugging Face T5 name")
    return found[0]


def to_t5x_array(hf_name: str, array: np.ndarray) -> np.ndarray:
    found = _lookup(_HF_TO_T5X, hf_name)
    return array.T if found and found[1] else array


def from_t5x_array(t5x_name: str, array: np.ndarray) -> np.ndarray:
    bare = t5x_name[len(T5X_PREFIX):] if t5x_name.startswith(T5X_PREFIX) else t5x_name
    found = _lookup(_T5X_TO_HF, bare)
    return array.T if found and found[1] else array


def t5x_architecture(t5x_names) -> str:
    """"t5_v1_1" when the T5X tree has gated MLPs (wi_0), else "t5"."""
    return "t5_v1_1" if any(".mlp.wi_0." in name for name in t5x_names) else "t5"


# --- naming conventions, as used by conversion -----------------------------------------------------------

# Which naming convention each checkpoint format uses.
FORMAT_NAMING = {"hf": "hf", "torch": "hf", "peft": "hf", "flax": "flax", "orbax": "flax", "t5x": "t5x"}


def hf_name_from(naming: str, arch: str, name: str, ndim: int | None = None) -> str:
    """Hugging Face name of `name` written in `naming` ("hf" | "flax" | "t5x")."""
    if naming == "flax":
        return from_flax_name(arch, name, ndim)
    if naming == "t5x":
        return from_t5x_name(name)
    return name


def hf_array_from(naming: str, arch: str, name: str, array: np.ndarray) -> np.ndarray:
    """Array of `name` (in `naming`'s layout) in Hugging Face layout."""
    if naming == "flax":
        return from_flax_array(arch, name, array)
    if naming == "t5x":
        return from_t5x_array(name, array)
    return array


def name_from_hf(naming: str, arch: str, hf_name: str, ndim: int | None = None) -> str | None:
    """Name of Hugging Face parameter `hf_name` in `naming`; None when that convention drops it."""
    if naming == "flax":
        return to_flax_name(arch, hf_name, ndim)
    if naming == "t5x":
        return to_t5x_name(hf_name)
    return hf_name


def array_from_hf(naming: str, arch: str, hf_name: str, array: np.ndarray) -> np.ndarray:
    """Hugging Face-layout array of `hf_name` in `naming`'s layout."""
    if naming == "flax":
        return to_flax_array(arch, hf_name, array)
    if naming == "t5x":
        return to_t5x_array(hf_name, array)
    return array

