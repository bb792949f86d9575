"""PyTorch checkpoints (`pytorch_model.bin`, sharded `pytorch_model-0000i-of-0000K.bin` + index, `.pt`).

Loaded with `torch.load(weights_only=True)`, so a checkpoint can never run code, and `mmap=True` so
tensors stay on disk until `get` copies one out. (Old non-zip `.bin` files cannot be memory-mapped; they
are loaded whole.) A file whose top level wraps the weights (`{"state_dict": {...}}`, `{"model": {...}}`)
is unwrapped; nested dicts of tensors are flattened with dotted names.

torch is an optional dependency (`pip install drm-jax[torch]`); it is imported only when such a file is read.
"""

from __future__ import annotations

import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from drm_jax.errors import CheckpointError, quote
from drm_jax.io.base import IndexedReader, config_dir, read_json, require_regular_file

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


# torch's weights-only refusal names the global it would not load; the rest of its message is advice to
# load with weights_only=False, which would run the checkpoint's code: we never repeat it.
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported (?:global|operand)[^A-Za-z0-9_]*(?:GLOBAL\s+)?([\w.]+)")
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


def _refusal(path: Path, err: Exception) -> CheckpointError:
    text = str(err)
    if "weights_only" in text or "Weights only load failed" in text or "Unsupported global" in text:
        found = _UNSUPPORTED_GLOBAL.search(text)
        what = f" ({found.group(1)})" if found else ""
        return CheckpointError(f"{path}: refused as unsafe: the pickle holds objects other than tensors{what}; drm-jax loads "
                               f"PyTorch files weights-only and never runs their code (save it as safetensors)")
    first_line = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return CheckpointError(f"{path}: cannot read PyTorch checkpoint (corrupt, truncated or unsafe): {first_line[:200]}")


def load_torch_file(path: Path) -> dict[str, Any]:
    """{name: torch.Tensor} of one .bin/.pt file, memory-mapped when the file format allows it.

    Zip files (torch >= 1.6) are checked record by record against the tensors they hold (`_check_records`).
    torch's own warnings are silenced: the user gets one line from us, or nothing.
    """
    torch = _import_torch()
    require_regular_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                mapped = True
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
                mapped = False
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing") from None
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on bad files
            raise _refusal(path, err) from None
    tensors = _flatten_tensors(_unwrap(obj))
    if mapped:
        _check_records(path, tensors)
    return tensors


def _data_records(path: Path) -> dict[int, tuple[str, int]]:
    """{absolute file offset of the data: (record name, record size)} of a torch zip's tensor records."""
    records = {}
    size = require_regular_file(path).st_size
    try:
        with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
            for info in archive.infolist():
                if "/data/" not in info.filename:
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{path}: data record {info.filename!r} is compressed; torch maps "
                                          f"records as stored bytes, so its tensor would be garbage")
                handle.seek(info.header_offset)
                local = handle.read(_ZIP_LOCAL_HEADER.size)
                if len(local) < _ZIP_LOCAL_HEADER.size or local[:4] != b"PK\x03\x04":
                    raise CheckpointError(f"{path}: data record {info.filename!r}: bad zip local header")
                _, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(local)
                start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length
                if start + info.file_size > size:
                    raise CheckpointError(f"{path}: truncated: data record {info.filename!r} needs bytes "
                                          f"{start}..{start + info.file_size} but the file ends at {size}")
                records[start] = (info.filename, info.file_size)
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: cannot read the zip records: {err}") from None
    return records


def _check_records(path: Path, tensors: dict[str, Any]) -> None:
    """Every tensor's storage lies inside its own zip record, whole.

    torch maps the file once and slices each storage at its record's offset for the size the pickle
    claims, so a record shorter than that claim silently yields the next record's bytes. Storages sit at
    `map base + record offset`: the base is found from one storage, then every storage must start at a
    record and fit in it.
    """
    storages: dict[int, tuple[int, str]] = {}  # data pointer -> (bytes, first tensor using it)
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage()
        if storage.nbytes():
            storages.setdefault(storage.data_ptr(), (storage.nbytes(), name))
    if not storages:
        return
    records = _data_records(path)
    lowest = min(storages)
    for offset in sorted(records):
        base = lowest - offset
        if all(pointer - base in records for pointer in storages):
            break
    else:
        raise CheckpointError(f"{path}: corrupt: the tensors' storages do not match the zip's data records")
    for pointer, (nbytes, name) in storages.items():
        record, record_size = records[pointer - base]
        if nbytes > record_size:
            raise CheckpointError(f"{path}: truncated: tensor {quote(name)} needs {nbytes} bytes but its data record "
                                  f"{record!r} holds {record_size}")


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
            index = read_json(index_path, "index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: index has no weight_map")
            files = []
            for shard_name in dict.fromkeys(weight_map.values()):
                if not isinstance(shard_name, str) or Path(shard_name).name != shard_name:
                    raise CheckpointError(f"{index_path}: invalid shard file name {quote(shard_name)}")
                if not (directory / shard_name).exists():
                    raise CheckpointError(f"{index_path}: missing shard {quote(shard_name)}")
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
            raise CheckpointError(f"{file}: cannot read tensor {quote(name)}: {err}") from err

    def close(self) -> None:
        self._by_name.clear()
