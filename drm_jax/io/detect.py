"""Which format a checkpoint path is in, and the reader that opens it.

Directory rules, first match wins: `adapter_config.json` -> "peft"; `model.safetensors[.index.json]` or a
single `*.safetensors` -> "hf"; `pytorch_model.bin[.index.json]` or a single `*.bin`/`*.pt`/`*.pth` ->
"torch"; `flax_model.msgpack[.index.json]` -> "flax"; an Orbax item (`_METADATA`, `manifest.ocdbt`, also
one level down or under numbered step directories) -> "maxtext" when its tree holds MaxText's
`params.params.decoder` (also a MaxText run directory, through its `checkpoints/`), else "orbax"; a msgpack `checkpoint` file (also under
`checkpoint_<step>/`) -> "t5x". A file is recognised by its name and suffix.
"""

from __future__ import annotations

from pathlib import Path

from drm_jax.errors import CheckpointError
from drm_jax.io.base import CheckpointReader, require_regular_file
from drm_jax.io.flax_io import FLAX_INDEX_NAME, FLAX_NAME, FlaxReader
from drm_jax.io.maxtext_io import MaxTextReader, find_maxtext_item
from drm_jax.io.orbax_io import OrbaxReader, find_orbax_item
from drm_jax.io.peft_io import ADAPTER_CONFIG_NAME, PeftReader
from drm_jax.io.safetensors_io import SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME, SafetensorsReader
from drm_jax.io.t5x_io import T5xReader, find_t5x_checkpoint
from drm_jax.io.torch_io import TORCH_INDEX_NAME, TORCH_NAME, TORCH_SUFFIXES, TorchReader

FORMATS = ("hf", "torch", "flax", "orbax", "t5x", "peft", "maxtext")
_EXPECTED = (
    f"{SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, {TORCH_NAME}, {FLAX_NAME}, an Orbax or MaxText checkpoint, a T5X "
    f"'checkpoint' file or {ADAPTER_CONFIG_NAME}"
)


def _detect_file(path: Path) -> str | None:
    name = path.name
    if name == ADAPTER_CONFIG_NAME:
        return "peft"
    if path.suffix == ".safetensors" or name.endswith(".safetensors.index.json"):
        return "hf"
    if path.suffix in TORCH_SUFFIXES or name == TORCH_INDEX_NAME:
        return "torch"
    if path.suffix == ".msgpack" or name == FLAX_INDEX_NAME:
        return "flax"
    if find_t5x_checkpoint(path) is not None:
        return "t5x"
    return None


# File names that make a directory a checkpoint: one of them that is not a regular file is refused here
# (a FIFO would block its reader; skipping it would hide the problem behind "unknown format").
_MARKER_NAMES = (ADAPTER_CONFIG_NAME, SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME, TORCH_INDEX_NAME, TORCH_NAME,
                 FLAX_INDEX_NAME, FLAX_NAME)


def _detect_directory(path: Path) -> str | None:
    for name in _MARKER_NAMES:
        if (path / name).exists() and not (path / name).is_file():
            require_regular_file(path / name)
    if (path / ADAPTER_CONFIG_NAME).is_file():
        return "peft"
    if (path / SAFETENSORS_INDEX_NAME).is_file() or (path / SAFETENSORS_NAME).is_file():
        return "hf"
    if (path / TORCH_INDEX_NAME).is_file() or (path / TORCH_NAME).is_file():
        return "torch"
    if (path / FLAX_INDEX_NAME).is_file() or (path / FLAX_NAME).is_file():
        return "flax"
    if len(list(path.glob("*.safetensors"))) == 1:
        return "hf"
    if len([p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file()]) == 1:
        return "torch"
    if find_maxtext_item(path) is not None:
        return "maxtext"
    if find_orbax_item(path) is not None:
        return "orbax"
    if find_t5x_checkpoint(path) is not None:
        return "t5x"
    return None


def detect_format(path: str | Path) -> str:
    """"hf" | "torch" | "flax" | "orbax" | "t5x" | "peft" | "maxtext" for a checkpoint file or directory.

    Raises CheckpointError naming the path when it is missing or in no known format.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_file() and not path.is_dir():
        raise CheckpointError(f"{path}: not a regular file or directory (a FIFO, device or socket); refused")
    found = _detect_file(path) if path.is_file() else _detect_directory(path)
    if found is None:
        raise CheckpointError(f"{path}: unknown checkpoint format (expected {_EXPECTED})")
    return found


def open_checkpoint(path: str | Path, *, base: CheckpointReader | str | Path | None = None) -> CheckpointReader:
    """Open a checkpoint lazily, detecting its format (see `detect_format`).

    `base` (a reader or a path) is the base model of a PEFT adapter: with it the adapter's `get` returns full
    adapted weights and its `delta` is checked against the base shapes. Other formats ignore it.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "peft":
        owned = base is not None and not isinstance(base, CheckpointReader)
        base_reader = open_checkpoint(base) if owned else base
        try:
            return PeftReader(path, base_reader, owns_base=owned)
        except BaseException:
            if owned:
                base_reader.close()
            raise
    readers = {"hf": SafetensorsReader, "torch": TorchReader, "flax": FlaxReader, "orbax": OrbaxReader, "t5x": T5xReader,
               "maxtext": MaxTextReader}
    return readers[fmt](path)
