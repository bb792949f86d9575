"""Every input model seen under Hugging Face names and layout, whatever its format, and which weights are
stored (in, out).

A merge may mix formats (a Flax or T5X model merged into a Hugging Face base): readers name tensors in
their own convention (`drm_jax.io.architectures.FORMAT_NAMING`), so each reader is wrapped in an `HFView`
that maps names and moves axes (exact: axes only) with the formats' architecture tables. The engine then
sees one convention, and the output is a Hugging Face checkpoint. Orientation (which axis of a 2-D weight
is the output) comes from the same tables: only GPT-2's Conv1D weights are stored (in, out) under
Hugging Face names, and DRM must see their (out, in) transpose.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from drm_jax.errors import CheckpointError, quote
from drm_jax.io import architectures as arch_lib
from drm_jax.io.base import read_json
from drm_jax.io.model_files import safe_model_file


def read_model_config(reader: Any) -> dict | None:
    """config.json beside a checkpoint, or None."""
    directory = getattr(reader, "config_dir", None)
    if directory is None:
        return None
    path = safe_model_file(directory, "config.json")
    if path is None:
        return None
    config = read_json(path, "the model config")  # one line naming the file, deep nesting included
    return config if isinstance(config, dict) else None


def naming_of(reader: Any) -> str:
    return arch_lib.FORMAT_NAMING.get(getattr(reader, "format", "hf"), "hf")


def architecture_of(readers: list[Any]) -> str:
    """The architecture table to use: from the first config.json found, else from T5X names, else generic."""
    for reader in readers:
        config = read_model_config(reader)
        if config:
            return arch_lib.detect_architecture(config)
    for reader in readers:
        if naming_of(reader) == "t5x":
            return arch_lib.t5x_architecture(reader.keys())
    return "generic"


def _shape_after(move: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...], dtype) -> tuple[int, ...]:
    """The shape an axis-moving map gives, computed on a zero-stride view (no memory)."""
    return tuple(move(np.broadcast_to(np.zeros((), dtype), shape)).shape)


class HFView:
    """A reader seen under Hugging Face names and layout (a pass-through for Hugging Face formats).

    T5X entries outside the model (optimizer state, step) are left out.
    """

    def __init__(self, reader: Any, arch: str):
        self.reader = reader
        self.arch = arch
        self.naming = naming_of(reader)
        self.format = getattr(reader, "format", "hf")
        self.path = getattr(reader, "path", None)
        self.config_dir = getattr(reader, "config_dir", None)
        self._own: dict[str, str] = {}
        if self.naming == "hf":
            self._keys = list(reader.keys())
            self._own = {k: k for k in self._keys}
            return
        for name in reader.keys():
            if self.naming == "t5x" and not name.startswith(arch_lib.T5X_PREFIX):
                continue
            try:
                hf = arch_lib.hf_name_from(self.naming, arch, name, len(reader.shape(name)))
            except CheckpointError:
                continue  # not a model parameter (T5X bookkeeping)
            if hf in self._own:
                raise CheckpointError(f"{self.path}: tensors {self._own[hf]!r} and {quote(name)} both map to {hf!r}")
            self._own[hf] = name
        self._keys = list(self._own)

    def keys(self) -> list[str]:
        return list(self._keys)

    def _name(self, name: str) -> str:
        try:
            return self._own[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {quote(name)}") from None

    def _move(self, own: str) -> Callable[[np.ndarray], np.ndarray]:
        return lambda a: arch_lib.hf_array_from(self.naming, self.arch, own, a)

    def shape(self, name: str) -> tuple[int, ...]:
        own = self._name(name)
        shape = tuple(self.reader.shape(own))
        if self.naming == "hf":
            return shape
        return _shape_after(self._move(own), shape, np.float32)

    def dtype(self, name: str) -> np.dtype:
        return self.reader.dtype(self._name(name))

    def get(self, name: str) -> np.ndarray:
        own = self._name(name)
        array = self.reader.get(own)
        if self.naming == "hf":
            return array
        return np.ascontiguousarray(self._move(own)(array))

    def close(self) -> None:
        self.reader.close()


def layout_for(arch: str) -> Callable[[str, tuple[int, ...]], bool]:
    """The engine's layout callable for Hugging Face names: True where a 2-D weight is stored (in, out)."""

    def stored_in_out(name: str, shape: tuple[int, ...]) -> bool:
        return arch_lib.weight_orientation(arch, name, len(shape)) == "in_out"

    return stored_in_out


__all__ = ["HFView", "architecture_of", "layout_for", "naming_of", "read_model_config"]
