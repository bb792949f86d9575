"""Hugging Face safetensors checkpoints: a lazy, validating reader and a streaming sharded writer.

File layout (the safetensors format): 8 bytes little-endian header length N, N bytes of JSON header
`{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
tensor bytes, offsets relative to the end of the header. A model directory holds `model.safetensors`, or
shards `model-00001-of-0000K.safetensors` plus `model.safetensors.index.json` mapping names to shards.

Reading parses only headers and checks them against the file sizes before any tensor is read (a header
that lies about sizes, a truncated file and a missing shard are reported at open time, naming the file),
then `get` reads exactly one tensor's byte range. We parse headers ourselves because
`safetensors.safe_open(framework="numpy")` cannot return bfloat16; writing uses `safetensors.numpy`, which
writes ml_dtypes bfloat16 as BF16.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from drm_jax.errors import CheckpointError, quote
from drm_jax.io.base import IndexedReader, config_dir, file_size, open_binary, parse_json, read_exact, read_json
from drm_jax.io.dtypes import SAFETENSORS_DTYPES

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
# safetensors itself refuses headers above 100 MB; a bigger length field means a corrupt file.
MAX_HEADER_BYTES = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file (`begin`/`end` are absolute file offsets)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _parse_entry(path: Path, name: str, raw: object, data_start: int, data_size: int) -> TensorEntry:
    """Validate one header entry against the dtype size and the bytes actually present in the file."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt header: entry for tensor {quote(name)} is not an object")
    code = raw.get("dtype")
    if code not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {quote(name)} has unsupported dtype {quote(code)}")
    shape = raw.get("shape")
    offsets = raw.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: corrupt header: tensor {quote(name)} has invalid shape {quote(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{path}: corrupt header: tensor {quote(name)} has invalid data_offsets {quote(offsets)}")
    dtype = SAFETENSORS_DTYPES[code]
    needed = math.prod(shape) * dtype.itemsize
    stored = offsets[1] - offsets[0]
    if stored != needed:
        raise CheckpointError(
            f"{path}: header lies about sizes: tensor {quote(name)} ({code} {tuple(shape)}) needs {needed} bytes "
            f"but data_offsets {offsets} span {stored}"
        )
    if offsets[1] > data_size:
        raise CheckpointError(
            f"{path}: truncated: tensor {quote(name)} needs data bytes {offsets[0]}..{offsets[1]} but the file "
            f"holds only {data_size} data bytes"
        )
    return TensorEntry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_no_overlap(path: Path, entries: Mapping[str, TensorEntry]) -> None:
    ordered = sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end))
    for (name_a, a), (name_b, b) in zip(ordered, ordered[1:]):
        if b.begin < a.end:
            raise CheckpointError(f"{path}: corrupt header: tensors {name_a!r} and {name_b!r} overlap")


class SafetensorsFile:
    """One safetensors file: header parsed and validated on open, tensors read one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        size = file_size(self.path)
        self._handle = open_binary(self.path)
        try:
            self.entries, self.metadata = self._read_header(size)
        except BaseException:
            self._handle.close()
            raise

    def _read_header(self, size: int) -> tuple[dict[str, TensorEntry], dict[str, str]]:
        if size < 8:
            raise CheckpointError(f"{self.path}: truncated: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", bytes(read_exact(self._handle, 0, 8, path=self.path, what="header")))
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{self.path}: corrupt: header length field says {header_len} bytes")
        if 8 + header_len > size:
            raise CheckpointError(
                f"{self.path}: truncated: header claims {header_len} bytes but the file has {size - 8} after "
                "the length field"
            )
        raw_header = bytes(read_exact(self._handle, 8, header_len, path=self.path, what="header"))
        header = parse_json(raw_header, self.path, "header (corrupt, not JSON)")
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt header: not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        entries = {
            name: _parse_entry(self.path, name, raw, data_start, size - data_start) for name, raw in header.items()
        }
        _check_no_overlap(self.path, entries)
        return entries, metadata if isinstance(metadata, dict) else {}

    def read(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        raw = read_exact(self._handle, entry.begin, entry.end - entry.begin, path=self.path, what=f"tensor {quote(name)}")
        return raw.view(entry.dtype).reshape(entry.shape)

    def close(self) -> None:
        self._handle.close()


def _shard_path(index_path: Path, shard_name: object) -> Path:
    """The shard file named by an index, refusing names that leave the checkpoint directory."""
    if not isinstance(shard_name, str) or not shard_name or Path(shard_name).name != shard_name:
        raise CheckpointError(f"{index_path}: invalid shard file name {quote(shard_name)} in weight_map")
    return index_path.parent / shard_name


def _read_index(index_path: Path) -> dict[str, str]:
    index = read_json(index_path, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: index has no weight_map")
    return weight_map


class SafetensorsReader(IndexedReader):
    """A Hugging Face safetensors checkpoint: one file, a directory, or a sharded directory with an index."""

    format = "hf"

    def __init__(self, path: Path) -> None:
        path = Path(path)
        files, index_path = self._locate(path)
        directory = files[0].parent if files else index_path.parent
        super().__init__(path, config_dir(directory))
        self._files: dict[Path, SafetensorsFile] = {}
        try:
            if index_path is None:
                self._open_file(files[0])
                self._by_name = {name: files[0] for name in self._files[files[0]].entries}  # name -> its file
            else:
                self._by_name = self._open_index(index_path)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _locate(path: Path) -> tuple[list[Path], Path | None]:
        if path.is_file():
            if path.name.endswith(".index.json"):
                return [], path
            return [path], None
        if (path / SAFETENSORS_INDEX_NAME).is_file():
            return [], path / SAFETENSORS_INDEX_NAME
        if (path / SAFETENSORS_NAME).is_file():
            return [path / SAFETENSORS_NAME], None
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) == 1:
            return candidates, None
        if not candidates:
            raise CheckpointError(f"{path}: no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME}")
        raise CheckpointError(f"{path}: several .safetensors files but no {SAFETENSORS_INDEX_NAME}")

    def _open_file(self, path: Path) -> SafetensorsFile:
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def _open_index(self, index_path: Path) -> dict[str, Path]:
        weight_map = _read_index(index_path)
        where: dict[str, Path] = {}
        for name, shard_name in weight_map.items():
            shard = _shard_path(index_path, shard_name)
            if not shard.exists():
                raise CheckpointError(f"{index_path}: missing shard {quote(shard_name)} (named for tensor {quote(name)})")
            if name not in self._open_file(shard).entries:
                raise CheckpointError(f"{shard}: tensor {quote(name)} is listed in {index_path.name} but not in this shard")
            where[name] = shard
        return where

    def _entry(self, name: str) -> TensorEntry:
        return self._files[self._record(name)].entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name).dtype

    def get(self, name: str) -> np.ndarray:
        return self._files[self._record(name)].read(name)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()


def shard_file_name(index: int, count: int) -> str:
    """Hugging Face's shard naming: model-00001-of-00003.safetensors (1-based)."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_header_only(path: Path, tensors: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """A safetensors file with the header of `tensors` ({name: (shape, dtype)}) and its data left as a hole
    (a sparse file on most filesystems: the size the header promises, no data written). A stand-in whose
    names, shapes and dtypes a reader checks exactly as a real file's; reading its tensors gives zeros.
    Used by multi-stage dry runs for the output of a stage that did not run."""
    codes = {np.dtype(d): code for code, d in SAFETENSORS_DTYPES.items()}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in tensors.items():
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": codes[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


class SafetensorsShardWriter:
    """Streams tensors into safetensors shards of at most `max_shard_size` bytes of tensor data.

    A shard is written (through `safetensors.numpy.save_file`) as soon as the next tensor would push it
    past the limit, so at most one shard is held in memory; a tensor larger than the limit gets a shard of
    its own. `finish()` names the shards Hugging Face's way and writes `model.safetensors.index.json`, or
    a single `model.safetensors` when everything fit in one shard.
    """

    def __init__(self, directory: Path, max_shard_size: int) -> None:
        if max_shard_size <= 0:
            raise CheckpointError(f"max_shard_size must be positive, got {max_shard_size}")
        self.directory = Path(directory)
        self.max_shard_size = int(max_shard_size)
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # (temporary file, names) in write order
        self._total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_size:
            self._flush()
        # save_file reads the raw buffer, so it must be C-contiguous (np.ascontiguousarray would turn a 0-d
        # array into 1-d).
        self._pending[name] = array if array.flags.c_contiguous else array.copy(order="C")
        self._pending_bytes += array.nbytes
        self._total_bytes += array.nbytes

    def _flush(self) -> None:
        from safetensors.numpy import save_file

        part = self.directory / f".shard-{len(self._shards) + 1:05d}.safetensors.part"
        try:
            save_file(self._pending, str(part), metadata={"format": "pt"})
        except Exception as err:  # SafetensorError (not an OSError) on a full disk, OSError, ...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{self.directory}: cannot write a safetensors shard: {first}") from None
        self._shards.append((part, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finish(self) -> list[Path]:
        """Write the last shard, give the shards their final names, write the index; returns the files."""
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            final = self.directory / SAFETENSORS_NAME
            self._shards[0][0].rename(final)
            return [final]
        weight_map: dict[str, str] = {}
        files = []
        for number, (part, names) in enumerate(self._shards, start=1):
            final_name = shard_file_name(number, len(self._shards))
            part.rename(self.directory / final_name)
            files.append(self.directory / final_name)
            weight_map.update({name: final_name for name in names})
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        index_path = self.directory / SAFETENSORS_INDEX_NAME
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return [index_path, *files]

