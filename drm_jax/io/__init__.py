"""Checkpoint formats: Hugging Face safetensors, PyTorch, Flax msgpack, Orbax, T5X, MaxText and PEFT LoRA
adapters.

Readers are lazy (names, shapes and dtypes from metadata; `get(name)` reads one tensor's bytes), writers
are atomic (temporary directory renamed into place), dtypes are kept (bf16 stays bf16).

    from drm_jax.io import open_checkpoint, CheckpointWriter, convert_checkpoint
    with open_checkpoint("bert-finetuned/") as reader:          # format detected
        kernel = reader.get("encoder.layer.0.attention.self.query.weight")
    convert_checkpoint("bert-finetuned/", "bert-flax/", to="flax")

Name and layout maps between the Hugging Face, Flax and T5X conventions are in
drm_jax.io.architectures.
"""

from drm_jax.io.architectures import (
    ARCHITECTURES,
    detect_architecture,
    from_flax_array,
    from_flax_name,
    from_t5x_name,
    to_flax_array,
    to_flax_name,
    to_t5x_name,
    weight_kind,
    weight_orientation,
)
from drm_jax.io.base import CheckpointReader
from drm_jax.io.convert import convert_checkpoint
from drm_jax.io.detect import FORMATS, detect_format, open_checkpoint
from drm_jax.io.maxtext_io import MaxTextLayout, MaxTextReader, write_maxtext
from drm_jax.io.writer import DEFAULT_MAX_SHARD_SIZE, WRITE_FORMATS, CheckpointWriter, write_checkpoint

__all__ = [
    "ARCHITECTURES", "CheckpointReader", "CheckpointWriter", "DEFAULT_MAX_SHARD_SIZE", "FORMATS", "MaxTextLayout",
    "MaxTextReader", "WRITE_FORMATS",
    "convert_checkpoint", "detect_architecture", "detect_format", "from_flax_array", "from_flax_name",
    "from_t5x_name", "open_checkpoint", "to_flax_array", "to_flax_name", "to_t5x_name", "weight_kind",
    "weight_orientation", "write_checkpoint", "write_maxtext",
]
