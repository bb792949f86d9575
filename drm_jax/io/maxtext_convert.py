"""MaxText <-> Hugging Face conversion for the Llama family (Llama, Mistral), as MaxText's own converter maps it.

The map restates MaxText's documented Llama mapping (its checkpoint_conversion param mapping and hooks):

- names: `token_embedder.embedding` <-> `model.embed_tokens.weight`, `decoder.decoder_norm.scale` <->
  `model.norm.weight`, `decoder.logits_dense.kernel` <-> `lm_head.weight` (absent when the embeddings are
  tied), and per layer `self_attention.{query,key,value,out}.kernel` <-> `self_attn.{q,k,v,o}_proj.weight`,
  `mlp.{wi_0,wi_1,wo}.kernel` <-> `mlp.{gate,up,down}_proj.weight`,
  `{pre,post}_self_attention_layer_norm.scale` <-> `{input,post_attention}_layernorm.weight`;
- layouts: every kernel is the transpose of its Hugging Face weight, the attention kernels with their head
  axes unfolded: query (emb, heads, head_dim) is `q_proj.weight.T` reshaped, out (heads, head_dim, emb) is
  `o_proj.weight.T` reshaped; norms and the embedding table are unchanged;
- the query kernel is scaled by 1 / sqrt(head_dim) on the way in (MaxText folds the attention's
  1 / sqrt(head_dim) into it) and by sqrt(head_dim) on the way out, in float32, cast back to the dtype;
- rotary embedding (`rope="interleaved"`, the default): within each head, MaxText's query and key dimensions
  are interleaved (pairs (2j, 2j+1)) where Hugging Face's are split in halves (j, j + head_dim / 2): in,
  `x[..., 2j] = hf[..., j]`, `x[..., 2j + 1] = hf[..., j + head_dim / 2]`; out, evens then odds. That is the
  layout of MaxText's LLaMA rotary embedding (model_name or rope_type llama3.1, the models its converter
  writes). A MaxText run at rope_type "default" (e.g. `model_name=default`, decoder_block llama2) rotates
  halves as Hugging Face does: `rope="halves"` converts it without the permutation (a MaxText 0.2.5 run's
  logged loss equals the converted model's only so). The checkpoint does not record which it is.

A conversion is exact (bit for bit, both ways) but for the query scaling: exact when sqrt(head_dim) is a
power of two (head_dim 4, 16, 64, 256), else rounded once each way as MaxText's converter rounds it.

The layers are split (MaxText -> Hugging Face) or stacked on MaxText's scan axis (Hugging Face -> MaxText,
`scan_layers`, default True) by drm_jax.io.maxtext_io. config.json is derived from the shapes (vocabulary,
widths, layers, heads, head_dim, tied embeddings); what shapes cannot tell comes from the user
(`hf_config`), else from a config.json beside the MaxText checkpoint, else from MaxText's defaults
(`MAXTEXT_DEFAULTS`), and `convert_maxtext` returns the names of the values it defaulted.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from drm_jax.errors import CheckpointError
from drm_jax.io.architectures import FORMAT_NAMING, array_from_hf, hf_array_from, hf_name_from, name_from_hf
from drm_jax.io.base import CONFIG_FILE_NAMES, CheckpointReader, read_json
from drm_jax.io.maxtext_io import MaxTextReader, layer_name, split_layer_name
from drm_jax.io.writer import CheckpointWriter

HF_LAYER = "model.layers.{i}."
# (MaxText name, or a layer leaf's tail; Hugging Face name or layer tail; transform)
LLAMA_TABLE = (
    ("token_embedder.embedding", "model.embed_tokens.weight", "same"),
    ("decoder.decoder_norm.scale", "model.norm.weight", "same"),
    ("decoder.logits_dense.kernel", "lm_head.weight", "kernel"),
)
LLAMA_LAYER_TABLE = (
    ("self_attention.query.kernel", "self_attn.q_proj.weight", "query"),
    ("self_attention.key.kernel", "self_attn.k_proj.weight", "key"),
    ("self_attention.value.kernel", "self_attn.v_proj.weight", "kernel"),
    ("self_attention.out.kernel", "self_attn.o_proj.weight", "kernel"),
    ("mlp.wi_0.kernel", "mlp.gate_proj.weight", "kernel"),
    ("mlp.wi_1.kernel", "mlp.up_proj.weight", "kernel"),
    ("mlp.wo.kernel", "mlp.down_proj.weight", "kernel"),
    ("pre_self_attention_layer_norm.scale", "input_layernorm.weight", "same"),
    ("post_self_attention_layer_norm.scale", "post_attention_layernorm.weight", "same"),
)
_TO_HF = {mt: (hf, how) for mt, hf, how in LLAMA_TABLE}
_TO_HF_LAYER = {mt: (hf, how) for mt, hf, how in LLAMA_LAYER_TABLE}
_FROM_HF = {hf: (mt, how) for mt, hf, how in LLAMA_TABLE}
_FROM_HF_LAYER = {hf: (mt, how) for mt, hf, how in LLAMA_LAYER_TABLE}
LLAMA_MODEL_TYPES = ("llama", "mistral")
# What the shapes cannot tell, at MaxText's defaults (rope_max_timescale, normalization_layer_epsilon,
# max_target_length).
MAXTEXT_DEFAULTS = {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048}
ROPE_LAYOUTS = ("interleaved", "halves")  # MaxText's query / key dimensions within a head (module docstring)


# --- the per-tensor transforms ------------------------------------------------------------------------

def _scaled(array: np.ndarray, factor: float) -> np.ndarray:
    """`array` times float32(factor), computed in float32 and cast back (MaxText's scale_query_layer)."""
    return (array.astype(np.float32) * np.float32(factor)).astype(array.dtype)


def rope_to_hf(array: np.ndarray) -> np.ndarray:
    """Last axis interleaved (MaxText) -> halves (Hugging Face): evens, then odds."""
    return np.concatenate((array[..., ::2], array[..., 1::2]), axis=-1)


def rope_from_hf(array: np.ndarray) -> np.ndarray:
    """Last axis halves (Hugging Face) -> interleaved (MaxText); inverse of `rope_to_hf`."""
    half = array.shape[-1] // 2
    return np.stack((array[..., :half], array[..., half:]), axis=-1).reshape(array.shape)


def _hf_from(name: str, how: str, stored: np.ndarray, rope: str = "interleaved") -> np.ndarray:
    """MaxText leaf `name` (stored shape, one layer) -> its Hugging Face weight."""
    if how == "same":
        return stored
    if how in ("query", "key"):
        if how == "query":
            stored = _scaled(stored, math.sqrt(stored.shape[-1]))
        if rope == "interleaved":
            stored = rope_to_hf(stored)
    if name.endswith("self_attention.out.kernel"):
        matrix = stored.reshape(-1, stored.shape[-1])  # (heads * head_dim, emb)
    else:
        matrix = stored.reshape(stored.shape[0], -1)  # (emb, heads * head_dim) or 2-D as it is
    return np.ascontiguousarray(matrix.T)


def _maxtext_from(name: str, how: str, hf: np.ndarray, stored_shape: tuple[int, ...],
                  rope: str = "interleaved") -> np.ndarray:
    """Hugging Face weight -> MaxText leaf `name` in `stored_shape` (inverse of `_hf_from`)."""
    if how == "same":
        return hf
    stored = np.ascontiguousarray(hf.T).reshape(stored_shape)
    if how in ("query", "key"):
        if rope == "interleaved":
            stored = rope_from_hf(stored)
        if how == "query":
            stored = _scaled(stored, 1.0 / math.sqrt(stored.shape[-1]))
    return stored


# --- MaxText -> Hugging Face ----------------------------------------------------------------------------

def _placed(reader: MaxTextReader) -> list[tuple[str, str, str]]:
    """(MaxText name, Hugging Face name, transform) of every leaf; refuses a leaf the Llama table does not
    place (one line naming it)."""
    plan = []
    for name in reader.keys():
        split = split_layer_name(name)
        found = _TO_HF.get(name) if split is None else _TO_HF_LAYER.get(split[1])
        if found is None:
            raise CheckpointError(f"{reader.item_dir}: MaxText leaf {name!r} (shape {reader.stored_shape(name)}) has "
                                  f"no place in the Llama / Mistral table; only those convert to or from Hugging Face")
        hf = found[0] if split is None else HF_LAYER.format(i=split[0]) + found[0]
        plan.append((name, hf, found[1]))
    return plan


def hf_config_from_shapes(reader: MaxTextReader, given: Mapping[str, Any] | None = None) -> tuple[dict, list[str]]:
    """config.json of a MaxText Llama / Mistral checkpoint and the keys that took a default.

    Shapes give vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim, tie_word_embeddings and the dtype; `given` (the user's values), else a
    config.json beside the checkpoint, else `MAXTEXT_DEFAULTS` give rope_theta, rms_norm_eps and
    max_position_embeddings (and model_type: "llama" unless said). A config.json beside the checkpoint whose
    shape keys disagree with the shapes is refused.
    """
    stored = reader.layout.stored
    first = layer_name(0, "")
    try:
        vocab, hidden = stored["token_embedder.embedding"]
        _, heads, head_dim = stored[first + "self_attention.query.kernel"]
        _, kv_heads, _ = stored[first + "self_attention.key.kernel"]
        _, intermediate = stored[first + "mlp.wi_0.kernel"]
    except (KeyError, ValueError):
        raise CheckpointError(f"{reader.item_dir}: not a Llama-style MaxText tree (the embedding, layer 0's "
                              f"query, key and mlp.wi_0 kernels are needed to derive config.json)") from None
    derived = {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": reader.layout.num_layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "tie_word_embeddings": "decoder.logits_dense.kernel" not in stored,
    }
    beside: dict = {}
    if reader.config_dir is not None and (reader.config_dir / "config.json").is_file():
        found = read_json(reader.config_dir / "config.json", "config")
        beside = found if isinstance(found, dict) else {}
        for key, value in derived.items():
            if key in beside and beside[key] != value and key != "tie_word_embeddings":
                raise CheckpointError(f"{reader.config_dir / 'config.json'}: {key} is {beside[key]!r} but the "
                                      f"MaxText shapes say {value!r}")
    config = {**beside, **derived}
    defaulted = []
    for key, default in MAXTEXT_DEFAULTS.items():
        if given and given.get(key) is not None:
            config[key] = given[key]
        elif key not in beside:
            config[key] = default
            defaulted.append(key)
    model_type = (given or {}).get("model_type") or beside.get("model_type") or "llama"
    if model_type not in LLAMA_MODEL_TYPES:
        raise CheckpointError(f"model_type {model_type!r}: MaxText conversion knows {', '.join(LLAMA_MODEL_TYPES)}")
    config["model_type"] = model_type
    config["architectures"] = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[model_type]]
    config.setdefault("hidden_act", "silu")
    config["rope_parameters"] = {**(config.get("rope_parameters") or {}), "rope_theta": config["rope_theta"],
                                 "rope_type": (config.get("rope_parameters") or {}).get("rope_type", "default")}
    dtype = np.dtype(reader.dtype("token_embedder.embedding")).name
    config["torch_dtype"] = dtype if dtype in ("float32", "float16", "bfloat16") else "float32"
    return config, defaulted


def maxtext_to_hf_tensors(reader: MaxTextReader, rope: str = "interleaved"):
    """(Hugging Face name, array) of every leaf, one at a time (refused first if any leaf has no place);
    `rope`: MaxText's rotary layout, one of `ROPE_LAYOUTS` (module docstring)."""
    plan = _placed(reader)
    for name, hf, how in plan:
        stored = reader.get(name).reshape(reader.stored_shape(name))
        yield hf, _hf_from(name, how, stored, rope)


# --- Hugging Face -> MaxText ----------------------------------------------------------------------------

def _heads(config: Mapping[str, Any], path: Path) -> tuple[int, int, int]:
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: config.json lacks hidden_size / num_attention_heads (needed for the "
                              f"MaxText head axes)") from None
    return heads, kv_heads, head_dim


def hf_to_maxtext_tensors(names, get: Callable[[str], np.ndarray], config: Mapping[str, Any], path: Path,
                          rope: str = "interleaved"):
    """(MaxText name, array in its stored per-layer shape) of every Hugging Face Llama tensor in `names`;
    `rope`: MaxText's rotary layout to write, one of `ROPE_LAYOUTS`."""
    heads, kv_heads, head_dim = _heads(config, path)
    plan = []
    for hf in names:
        match = hf.startswith("model.layers.") and hf.split(".", 3)
        if match and match[2].isdigit():
            found = _FROM_HF_LAYER.get(match[3])
            name = layer_name(int(match[2]), found[0]) if found else None
        else:
            found = _FROM_HF.get(hf)
            name = found[0] if found else None
        if found is None:
            if hf.endswith("rotary_emb.inv_freq"):
                continue  # a buffer, not a parameter
            raise CheckpointError(f"{path}: tensor {hf!r} has no place in MaxText's Llama / Mistral tree")
        plan.append((hf, name, found[1]))
    for hf, name, how in plan:
        array = get(hf)
        if name.endswith("self_attention.out.kernel"):
            shape = (heads, head_dim, array.shape[0])
        elif how in ("query", "key") or name.endswith("self_attention.value.kernel"):
            count = heads if how == "query" else kv_heads
            shape = (array.shape[1], count, head_dim)
        else:
            shape = array.T.shape if how == "kernel" else array.shape
        if math.prod(shape) != array.size:
            raise CheckpointError(f"{path}: tensor {hf!r} of shape {array.shape} does not fit {shape} "
                                  f"(config.json's heads and head_dim)")
        yield name, _maxtext_from(name, how, array, shape, rope)


# --- the conversion ----------------------------------------------------------------------------------------

def _copy_side_files(source: Path | None, directory: Path) -> None:
    """Tokenizer, generation and processor files beside the weights (config.json is written, not copied)."""
    if source is None:
        return
    for name in CONFIG_FILE_NAMES:
        if name != "config.json" and (source / name).is_file():
            shutil.copy2(source / name, directory / name)


def _write_config(directory: Path, config: Mapping[str, Any]) -> None:
    (directory / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n",
                                            encoding="utf-8")


def convert_maxtext(reader: CheckpointReader, dst: Path, to: str, *, arch: str, overwrite: bool = False,
                    max_shard_size: int, hf_config: Mapping[str, Any] | None = None,
                    scan_layers: bool = True, rope: str = "interleaved") -> list[str]:
    """Convert where MaxText is the source or the target (`drm_jax.io.convert_checkpoint` calls this).

    MaxText -> "hf" | "flax" | "orbax": through the Llama map, with a config.json from the shapes; returns
    the config keys that took MaxText's defaults. Any readable Llama / Mistral checkpoint -> "maxtext":
    `<dst>/0/items`, layers stacked when `scan_layers`, its config.json copied beside. MaxText -> MaxText
    rewrites the tree (scanned or not as `scan_layers` says). `rope`: MaxText's rotary layout, one of
    `ROPE_LAYOUTS` (module docstring; default "interleaved", MaxText's converter's).
    """
    if rope not in ROPE_LAYOUTS:
        raise CheckpointError(f"rope layout {rope!r}: one of {', '.join(ROPE_LAYOUTS)}")
    defaulted: list[str] = []
    if reader.format == "maxtext" and to == "maxtext":
        with CheckpointWriter(dst, "maxtext", overwrite=overwrite, copy_from=reader.config_dir,
                              scan_layers=scan_layers) as writer:
            for name in reader.keys():
                writer.add(name, reader.get(name).reshape(reader.stored_shape(name)))
        return defaulted
    if reader.format == "maxtext":
        if to == "t5x":
            raise CheckpointError(f"{reader.path}: T5X output supports T5 models only, this checkpoint is MaxText")
        config, defaulted = hf_config_from_shapes(reader, hf_config)
        naming = FORMAT_NAMING[to]
        with CheckpointWriter(dst, to, max_shard_size=max_shard_size, overwrite=overwrite) as writer:
            for hf, array in maxtext_to_hf_tensors(reader, rope):
                writer.add(name_from_hf(naming, "llama", hf, array.ndim),
                           array_from_hf(naming, "llama", hf, array))
            _write_config(writer.tmp_dir, config)
            _copy_side_files(reader.config_dir, writer.tmp_dir)
        return defaulted
    # a Hugging Face (or Flax, Orbax, PyTorch) Llama -> MaxText
    if arch != "llama":
        raise CheckpointError(f"{reader.path}: MaxText output supports the Llama family (Llama, Mistral), this "
                              f"checkpoint is {arch!r}")
    config = read_json(reader.config_dir / "config.json", "config") if reader.config_dir else {}
    if not isinstance(config, dict) or str(config.get("model_type", "llama")) not in LLAMA_MODEL_TYPES:
        raise CheckpointError(f"{reader.path}: MaxText output supports model_type llama and mistral, this is "
                              f"{config.get('model_type') if isinstance(config, dict) else None!r}")
    naming = FORMAT_NAMING[reader.format]
    prefix = "params." if naming == "flax" and all(n.startswith("params.") for n in reader.keys()) else ""
    own = {hf_name_from(naming, arch, n[len(prefix):], len(reader.shape(n))): n for n in reader.keys()}

    def get(hf: str) -> np.ndarray:
        return hf_array_from(naming, arch, own[hf][len(prefix):], reader.get(own[hf]))

    with CheckpointWriter(dst, "maxtext", overwrite=overwrite, copy_from=reader.config_dir,
                          scan_layers=scan_layers) as writer:
        for name, array in hf_to_maxtext_tensors(list(own), get, config, reader.path, rope):
            writer.add(name, array)
    return defaulted


__all__ = ["ROPE_LAYOUTS", "convert_maxtext"]
