"""A Flax (linen) BERT encoder that reads and writes Hugging Face `BertModel` checkpoints.

transformers 5 ships no Flax model classes, so this is ours. The module tree mirrors the Hugging Face
(PyTorch) parameter names, so a checkpoint converts by renaming plus transposing dense kernels:

    HF / PyTorch name (layout (out, in))            Flax path (kernel layout (in, out))
    embeddings.word_embeddings.weight               embeddings/word_embeddings/embedding
    encoder.layer.3.attention.self.query.weight     encoder/layer_3/attention/self/query/kernel  (.T)
    encoder.layer.3.output.LayerNorm.weight         encoder/layer_3/output/LayerNorm/scale
    pooler.dense.bias                               pooler/dense/bias

Numerics follow transformers' eager BertModel exactly (exact erf GELU, two-pass LayerNorm variance,
additive masking with the dtype minimum), so on the same float32 weights the hidden states agree to
about 1e-6. Dropout is not implemented: the module is always deterministic (the example fine-tunes
without dropout).

Reference: Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers" (arXiv 1810.04805).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.errors import CheckpointError, ConfigError
from drm_jax.io.model_files import copy_model_files

SAFETENSORS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Tokenizer files copied next to a saved checkpoint when present in the source directory.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT `config.json` that the encoder needs (defaults: bert-base)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "BertConfig":
        """Build from a Hugging Face config dict; unknown keys are ignored, unsupported ones raise."""
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ConfigError(f"{source}: position_embedding_type={position_type!r} is not supported "
                              "(only 'absolute')")
        if raw.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported "
                              f"(one of {sorted(_ACTIVATIONS)})")
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in names and v is not None})
        if config.hidden_size % config.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {config.hidden_size} is not divisible by "
                              f"num_attention_heads {config.num_attention_heads}")
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BertConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: cannot read the BERT config ({err})") from err
        return cls.from_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config dict transformers' `BertConfig` / `AutoModel` accepts."""
        return {"architectures": ["BertModel"], "model_type": "bert",
                "position_embedding_type": "absolute", **dataclasses.asdict(self)}


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance (use_fast_variance=False) as torch computes it; E[x^2]-E[x]^2 drifts by ~1e-6.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name)


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """input_ids, token_type_ids: (batch, seq) int -> (batch, seq, hidden)."""
        c = self.config
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
        x = x + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(token_type_ids)
        x = x + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(positions)
        return _layer_norm(c, "LayerNorm")(x)


class BertSelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x: (batch, seq, hidden); key_mask: (batch, seq) bool, True = attend. -> (batch, seq, hidden)."""
        c = self.config
        heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads

        def split(t: jax.Array) -> jax.Array:  # (b, s, h*d) -> (b, h, s, d)
            return t.reshape(t.shape[0], t.shape[1], heads, head_dim).transpose(0, 2, 1, 3)

        q = split(nn.Dense(c.hidden_size, name="query")(x))
        k = split(nn.Dense(c.hidden_size, name="key")(x))
        v = split(nn.Dense(c.hidden_size, name="value")(x))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(head_dim).astype(np.float32)
        # Additive masking with the dtype minimum, as transformers does; exp() of it is exactly 0.
        scores = scores + jnp.where(key_mask[:, None, None, :], 0.0, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        return out.transpose(0, 2, 1, 3).reshape(x.shape)


class BertAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        attended = BertSelfAttention(self.config, name="self")(x, key_mask)
        return BertResidual(self.config, name="output")(attended, x)


class BertResidual(nn.Module):
    """HF's BertSelfOutput / BertOutput: dense, add the residual, LayerNorm."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        x = nn.Dense(self.config.hidden_size, name="dense")(x)
        return _layer_norm(self.config, "LayerNorm")(x + residual)


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.config.intermediate_size, name="dense")(x)
        return _ACTIVATIONS[self.config.hidden_act](x)


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        x = BertAttention(self.config, name="attention")(x, key_mask)
        hidden = BertIntermediate(self.config, name="intermediate")(x)
        return BertResidual(self.config, name="output")(hidden, x)


class BertEncoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, name=f"layer_{i}")(x, key_mask)
        return x


class BertPooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(nn.Dense(self.config.hidden_size, name="dense")(x[:, 0]))


class BertModel(nn.Module):
    """The BERT encoder (HF `BertModel`).

    __call__(input_ids (b, s) int, attention_mask (b, s) {0,1} or None, token_type_ids (b, s) or None)
    returns (last_hidden_state (b, s, hidden), pooler_output (b, hidden) or None without a pooler).
    """

    config: BertConfig
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = BertEmbeddings(self.config, name="embeddings")(input_ids, token_type_ids)
        x = BertEncoder(self.config, name="encoder")(x, attention_mask.astype(bool))
        pooled = BertPooler(self.config, name="pooler")(x) if self.add_pooling_layer else None
        return x, pooled


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of the token states over real (mask=1) tokens, as sentence-transformers pools.

    hidden (b, s, d), attention_mask (b, s) -> (b, d).
    """
    weights = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)


# ---------------------------------------------------------------------------------------------------
# Conversion between HF flat state dicts (torch layout) and Flax parameter trees (flax layout)
# ---------------------------------------------------------------------------------------------------

def _hf_name_to_path(name: str) -> tuple[tuple[str, ...], bool]:
    """'encoder.layer.3.attention.self.query.weight' -> (path, transpose?)."""
    parts = name.split(".")
    path: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] == "layer" and i + 1 < len(parts) and parts[i + 1].isdigit():
            path.append(f"layer_{parts[i + 1]}")
            i += 2
            continue
        path.append(parts[i])
        i += 1
    leaf, owner = path[-1], path[-2] if len(path) > 1 else ""
    if owner == "LayerNorm":
        path[-1] = {"weight": "scale", "gamma": "scale", "beta": "bias"}.get(leaf, leaf)
        return tuple(path), False
    if owner.endswith("embeddings") and leaf == "weight":
        path[-1] = "embedding"
        return tuple(path), False
    if leaf == "weight":
        path[-1] = "kernel"
        return tuple(path), True
    return tuple(path), False


def _path_to_hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Inverse of `_hf_name_to_path`: (flax path) -> (HF name, transpose?)."""
    parts = []
    for p in path[:-1]:
        if p.startswith("layer_") and p[6:].isdigit():
            parts += ["layer", p[6:]]
        else:
            parts.append(p)
    leaf = path[-1]
    transpose = leaf == "kernel"
    parts.append({"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf))
    return ".".join(parts), transpose


def hf_to_flax(state: Mapping[str, np.ndarray], source: str = "state dict") -> dict:
    """HF BertModel state dict (names as in PyTorch, (out, in) weights) -> nested Flax params.

    A leading 'bert.' prefix (BertFor* checkpoints) is stripped; heads outside the encoder, integer
    buffers (position_ids) and other non-float tensors are skipped.
    """
    params: dict = {}
    for name, value in state.items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            continue
        if name.startswith("bert."):
            name = name[len("bert."):]
        if not name.startswith(("embeddings.", "encoder.", "pooler.")):
            continue
        path, transpose = _hf_name_to_path(name)
        if transpose and value.ndim != 2:
            raise CheckpointError(f"{source}: tensor {name!r} should be 2-D, has shape {value.shape}")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value.T if transpose else value
    return params


def flax_to_hf(params: Mapping) -> dict[str, np.ndarray]:
    """Nested Flax params -> HF BertModel state dict (float32 numpy, contiguous, (out, in) weights)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    state = {}
    for key_path, value in flat:
        path = tuple(str(getattr(k, "key", k)) for k in key_path)
        name, transpose = _path_to_hf_name(path)
        value = np.asarray(value)
        state[name] = np.ascontiguousarray(value.T if transpose else value)
    return state


def _check_against_template(params: Mapping, config: BertConfig, with_pooler: bool, source: str) -> None:
    """Raise CheckpointError naming the first missing or mis-shaped tensor."""
    template = jax.eval_shape(
        lambda: BertModel(config, add_pooling_layer=with_pooler).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for key_path, spec in jax.tree_util.tree_flatten_with_path(template)[0]:
        name = _path_to_hf_name(tuple(str(k.key) for k in key_path))[0]
        if key_path not in got:
            raise CheckpointError(f"{source}: tensor {name!r} is missing")
        if tuple(got[key_path].shape) != tuple(spec.shape):
            flip = name.endswith(".weight") and len(spec.shape) == 2 and "embeddings" not in name
            have, want = tuple(got[key_path].shape), tuple(spec.shape)
            if flip:  # report shapes in the HF (out, in) layout the user sees in the file
                have, want = have[::-1], want[::-1]
            raise CheckpointError(f"{source}: tensor {name!r} has shape {have}, expected {want}")


def load_hf_bert(directory: str | os.PathLike) -> tuple[BertConfig, dict]:
    """Read a Hugging Face BERT directory (config.json + model.safetensors) -> (config, Flax params).

    The params include the pooler when the checkpoint has one. Raises CheckpointError naming the file
    and tensor when something is missing or has the wrong shape.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = BertConfig.from_json(directory / CONFIG_NAME)
    weights = directory / SAFETENSORS_NAME
    try:
        state = load_file(str(weights))
    except (OSError, Exception) as err:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{weights}: cannot read safetensors ({err})") from err
    params = hf_to_flax(state, source=str(weights))
    with_pooler = "pooler" in params
    _check_against_template(params, config, with_pooler, str(weights))
    return config, params


def save_hf_bert(directory: str | os.PathLike, config: BertConfig, params: Mapping,
                 tokenizer_from: str | os.PathLike | None = None,
                 extra_config: Mapping[str, Any] | None = None) -> Path:
    """Write params as a Hugging Face BERT directory transformers' `AutoModel` loads.

    Writes config.json and model.safetensors, and copies the tokenizer files found in `tokenizer_from`.
    Atomic: everything goes to a temporary sibling directory first, then is renamed into place (an
    existing directory is replaced). Returns the directory.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.astype(np.float32) for k, v in flax_to_hf(params).items()}
        save_file(state, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        hf_config = {**config.to_hf_dict(), **(extra_config or {})}
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        copy_model_files(tokenizer_from, TOKENIZER_FILES, tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
