"""Converting a checkpoint between formats, one tensor at a time.

Every name goes through the Hugging Face convention: source name -> Hugging Face name and layout ->
target name and layout (drm_jax.io.architectures holds the maps). The whole plan (every target name) is
computed and checked before anything is written, and the writer is atomic, so a conversion that fails
leaves nothing behind. Only one tensor is in memory at a time for "hf" and "t5x" outputs.

A PEFT adapter converts to its merged model: the base model's tensors with the adapter applied (the
base comes from `base=` or, when it is a local directory, the adapter's base_model_name_or_path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from drm_jax.errors import CheckpointError
from drm_jax.io.architectures import (
    FORMAT_NAMING,
    array_from_hf,
    detect_architecture,
    hf_array_from,
    hf_name_from,
    name_from_hf,
    t5x_architecture,
)
from drm_jax.io.base import CheckpointReader, read_json
from drm_jax.io.detect import open_checkpoint
from drm_jax.io.model_files import safe_model_file
from drm_jax.io.maxtext_convert import convert_maxtext
from drm_jax.io.peft_io import PeftReader
from drm_jax.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, refuse_overlap

# A Flax training state often nests the parameters under "params"; the Hugging Face names do not.
_FLAX_PARAMS_PREFIX = "params."


def read_config(reader: CheckpointReader) -> dict:
    """The reader's config.json as a dict ({} when there is none)."""
    path = safe_model_file(reader.config_dir, "config.json") if reader.config_dir is not None else None
    if path is None:
        return {}
    config = read_json(path, "config")
    return config if isinstance(config, dict) else {}


def architecture_of(reader: CheckpointReader) -> str:
    """The name-map table for a checkpoint: from config.json, or from the T5X tree, else "generic"."""
    if reader.format == "t5x":
        return t5x_architecture(reader.keys())
    return detect_architecture(read_config(reader))


def _source_prefix(reader: CheckpointReader, naming: str) -> str:
    names = reader.keys()
    if naming == "flax" and names and all(n.startswith(_FLAX_PARAMS_PREFIX) for n in names):
        return _FLAX_PARAMS_PREFIX
    return ""


def plan_conversion(reader: CheckpointReader, to_format: str, arch: str) -> list[tuple[str, str]]:
    """(source name, target name) for every tensor to write, in the source's order.

    Tensors the target convention drops (T5's tied encoder/decoder embed_tokens in T5X) are left out.
    Raises CheckpointError when a name has no counterpart or two source names map to one target name.
    """
    source_naming = FORMAT_NAMING[reader.format]
    target_naming = FORMAT_NAMING[to_format]
    prefix = _source_prefix(reader, source_naming)
    plan: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for name in reader.keys():
        ndim = len(reader.shape(name))
        hf_name = hf_name_from(source_naming, arch, name[len(prefix):], ndim)
        target = name_from_hf(target_naming, arch, hf_name, ndim)
        if target is None:
            continue
        if target in seen:
            raise CheckpointError(f"{reader.path}: tensors {seen[target]!r} and {name!r} both map to {target!r}")
        seen[target] = name
        plan.append((name, target))
    return plan


def converted_tensors(reader: CheckpointReader, to_format: str, arch: str,
                      plan: list[tuple[str, str]]) -> Iterator[tuple[str, np.ndarray]]:
    """(target name, array in the target layout), read one at a time."""
    source_naming = FORMAT_NAMING[reader.format]
    target_naming = FORMAT_NAMING[to_format]
    prefix = _source_prefix(reader, source_naming)
    for source, target in plan:
        array = reader.get(source)
        hf_name = hf_name_from(source_naming, arch, source[len(prefix):], array.ndim)
        hf_array = hf_array_from(source_naming, arch, source[len(prefix):], array)
        yield target, array_from_hf(target_naming, arch, hf_name, hf_array)


class _MergedAdapter(CheckpointReader):
    """A base model with a PEFT adapter applied: the base's names, adapted tensors replaced."""

    def __init__(self, adapter: PeftReader) -> None:
        super().__init__(adapter.base.path, adapter.base.config_dir)
        self.format = adapter.base.format
        self.adapter = adapter
        self.base = adapter.base
        self._extra = [n for n in adapter.keys() if n not in self.base]

    def keys(self) -> list[str]:
        return [*self.base.keys(), *self._extra]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.adapter.shape(name) if name in self.adapter else self.base.shape(name)

    def dtype(self, name: str):
        return self.adapter.dtype(name) if name in self.adapter else self.base.dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self.adapter.get(name) if name in self.adapter else self.base.get(name)


def _open_source(src: Path, base: str | Path | None) -> CheckpointReader:
    reader = open_checkpoint(src, base=base)
    if isinstance(reader, PeftReader) and reader.base is None:
        hinted = reader.config.get("base_model_name_or_path")
        reader.close()
        if not isinstance(hinted, str) or not hinted or not Path(hinted).is_dir():
            raise CheckpointError(
                f"{src}: a PEFT adapter converts to its merged model and needs the base model (--base PATH)"
            )
        reader = open_checkpoint(src, base=Path(hinted))
    return reader


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, *, overwrite: bool = False,
                       max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, base: str | Path | None = None,
                       arch: str | None = None, hf_config: dict | None = None, scan_layers: bool = True,
                       defaulted: list | None = None, maxtext_rope: str = "interleaved") -> Path:
    """Convert checkpoint `src` (any readable format) to format `to` ("hf" | "flax" | "orbax" | "t5x" |
    "maxtext") in `dst`.

    config.json, generation config and tokenizer files are copied beside the weights. `arch` overrides the
    architecture detected from config.json (see drm_jax.io.architectures.ARCHITECTURES). `hf -> flax -> hf`
    returns the same tensors, bit for bit, under the same names. Returns `dst`.

    MaxText in or out (Llama family, drm_jax.io.maxtext_convert): `hf_config` gives the config.json values
    MaxText's shapes cannot tell (rope_theta, rms_norm_eps, max_position_embeddings, model_type), the names
    of those that took MaxText's defaults are appended to `defaulted`; `scan_layers` (default True) stacks
    the layers of a MaxText output; `maxtext_rope` is its rotary layout, "interleaved" (default, MaxText's
    LLaMA rotary embedding, as its converter writes) or "halves" (a run at rope_type "default").
    """
    src, dst = Path(src), Path(dst)
    # Before anything is read or written: --overwrite replaces dst, so no input may lie in or around it.
    refuse_overlap(dst, [src] + ([Path(base)] if base is not None else []), what="destination")
    reader = _open_source(src, base)
    try:
        inputs = [src, reader.path, getattr(getattr(reader, "base", None), "path", None), reader.config_dir]
        refuse_overlap(dst, [p for p in inputs if p is not None], what="destination")
        if isinstance(reader, PeftReader):
            reader = _MergedAdapter(reader)
        detected = architecture_of(reader)
        asked, arch = arch, arch or detected
        if "maxtext" in (reader.format, to):
            names = convert_maxtext(reader, dst, to, arch=arch, overwrite=overwrite, max_shard_size=max_shard_size,
                                    hf_config=hf_config, scan_layers=scan_layers, rope=maxtext_rope)
            if defaulted is not None:
                defaulted.extend(names)
            return dst
        if to == "t5x" and arch not in ("t5", "t5_v1_1"):
            raise CheckpointError(f"{src}: T5X output supports T5 models only, "
                                  + (f"and --arch {asked!r} was asked (this checkpoint is {detected!r})"
                                     if asked is not None else f"this checkpoint is {detected!r}"))
        plan = plan_conversion(reader, to, arch)
        if not plan:
            raise CheckpointError(f"{src}: no tensors to convert (empty or corrupt checkpoint)")
        with CheckpointWriter(dst, to, max_shard_size=max_shard_size, overwrite=overwrite,
                              copy_from=reader.config_dir) as writer:
            for name, array in converted_tensors(reader, to, arch, plan):
                writer.add(name, array)
        return writer.path
    finally:
        if isinstance(reader, _MergedAdapter):
            reader.adapter.close()
        else:
            reader.close()
