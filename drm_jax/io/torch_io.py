"""PyTorch checkpoints (`pytorch_model.bin`, sharded `pytorch_model-0000i-of-0000K.bin` + index, `.pt`).

Loaded with `torch.load(weights_only=True)`, so a checkpoint can never run code, and `mmap=True` so
tensors stay on disk until `get` copies one out. (Old non-zip `.bin` files cannot be memory-mapped; they
are loaded whole.) A file whose top level wraps the weights (`{"state_dict": {...}}`, `{"model": {...}}`)
is unwrapped; nested dicts of tensors are flattened with dotted names.

torch is an optional dependency (`pip install drm-jax[torch]`); it is imported only when such a file is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from drm_jax.errors import CheckpointError
from drm_jax.io.base import IndexedReader, config_dir

TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_WRAPPER_KEYS = ("state_dict", "model", "module")


def _import_torch():
    try:
        import torch
    except ImportError as err:
        raise CheckpointError("reading PyTorch .bin/.pt checkpoints needs torch: pip install 'drm-jax[torch]'") from err
    return torch


def _numpy_dtype(torch_dtype) -> np.dtype:
    """numpy dtype for a torch dtype; bf16 and fp8, which numpy lacks, come from ml_dtypes."""
    torch = _import_torch()
    special = {
        torch.bfloat16: ml_dtypes.bfloat16,
        torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
        torch.float8_e5m2: ml_dtypes.float8_e5m2,
    }
    if torch_dtype in special:
        return np.dtype(special[torch_dtype])
    return np.dtype(torch.empty((), dtype=torch_dtype).numpy().dtype)


def tensor_to_numpy(tensor) -> np.ndarray:
    """Copy a CPU torch tensor to numpy, keeping its dtype (bf16 -> ml_dtypes.bfloat16, bit-exact)."""
    torch = _import_torch()
    tensor = tensor.detach().cpu().contiguous()
    dtype = _numpy_dtype(tensor.dtype)
    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        bits = torch.int16 if tensor.dtype == torch.bfloat16 else torch.uint8
        return tensor.view(bits).numpy().copy().view(dtype)
    return tensor.numpy().copy()


def _flatten_tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    torch = _import_torch()
    if isinstance(obj, torch.Tensor):
        return {prefix: obj} if prefix else {}
    if isinstance(obj, dict):
        flat: dict[str, Any] = {}
        for key, value in obj.items():
            flat.update(_flatten_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {}  # epochs, optimizer hyper-parameters, ...


def _unwrap(obj: Any) -> Any:
    torch = _import_torch()
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj


def load_torch_file(path: Path) -> dict[str, Any]:
    """{name: torch.Tensor} of one .bin/.pt file, memory-mapped when the file format allows it."""
    torch = _import_torch()
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing") from err
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on bad files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint (corrupt, truncated or unsafe): {first_line}") from err
    return _flatten_tensors(_unwrap(obj))


class TorchReader(IndexedReader):
    """A PyTorch checkpoint file, a directory with pytorch_model.bin, or a sharded one with its index."""

    format = "torch"

    def __init__(self, path: Path) -> None:
        path = Path(path)
        directory = path.parent if path.is_file() else path
        super().__init__(path, config_dir(directory))
        self._by_name: dict[str, Any] = {}  # name -> (file, tensor)
        for file in self._files(path, directory):
            for name, tensor in load_torch_file(file).items():
                self._by_name[name] = (file, tensor)

    @staticmethod
    def _files(path: Path, directory: Path) -> list[Path]:
        if path.is_file() and not path.name.endswith(".index.json"):
            return [path]
        index_path = path if path.is_file() else directory / TORCH_INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index_path}: cannot read index: {err}") from err
            files = []
            for shard_name in dict.fromkeys(weight_map.values()):
                if not isinstance(shard_name, str) or Path(shard_name).name != shard_name:
                    raise CheckpointError(f"{index_path}: invalid shard file name {shard_name!r}")
                if not (directory / shard_name).is_file():
                    raise CheckpointError(f"{index_path}: missing shard {shard_name!r}")
                files.append(directory / shard_name)
            return files
        if (directory / TORCH_NAME).is_file():
            return [directory / TORCH_NAME]
        candidates = sorted(p for p in directory.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file())
        if len(candidates) == 1:
            return candidates
        raise CheckpointError(f"{path}: no {TORCH_NAME} (or several .bin/.pt files without {TORCH_INDEX_NAME})")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._record(name)[1].shape)

    def dtype(self, name: str) -> np.dtype:
        return _numpy_dtype(self._record(name)[1].dtype)

    def get(self, name: str) -> np.ndarray:
        file, tensor = self._record(name)
        try:
            return tensor_to_numpy(tensor)
        except (RuntimeError, OSError) as err:  # e.g. the mapped file shrank under us
            raise CheckpointError(f"{file}: cannot read tensor {name!r}: {err}") from err

    def close(self) -> None:
        self._by_name.clear()
