"""Lazy reading of flax msgpack files: the tree structure is parsed, array bytes are left on disk.

`flax.serialization.msgpack_restore` decodes a whole file into memory. For checkpoints larger than memory
we walk the msgpack encoding ourselves (https://github.com/msgpack/msgpack/blob/master/spec.md) and
replace every array by a `LazyArray` that records where its bytes are. Flax encodes an array as the
msgpack extension type 1 (3 for a numpy scalar) whose payload is itself msgpack: the tuple
`(shape, dtype_name, raw_bytes)`. Arrays above 2**30 bytes are split by flax into
`{"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {"0": flat_chunk, ...}}`; those become a
`ChunkedLazyArray`. Everything else (dicts, lists, numbers, strings) is decoded normally; it is small.

Every length is checked against the file size, so a truncated or corrupt file raises CheckpointError
naming the file instead of reading garbage.
"""

from __future__ import annotations

import dataclasses
import io
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from drm_jax.errors import CheckpointError, quote
from drm_jax.io.base import file_size, read_exact
from drm_jax.io.dtypes import dtype_from_name

# flax.serialization._MsgpackExtType
EXT_NDARRAY = 1
EXT_NATIVE_COMPLEX = 2
EXT_NPSCALAR = 3
CHUNKED_MARKER = "__msgpack_chunked_array__"
_MAX_DEPTH = 128

# msgpack markers (big-endian lengths and numbers).
_CONSTANTS = {0xC0: None, 0xC2: False, 0xC3: True}
_SIZED = {  # marker -> (kind, struct format of its length)
    0xC4: ("bin", ">B"), 0xC5: ("bin", ">H"), 0xC6: ("bin", ">I"),
    0xD9: ("str", ">B"), 0xDA: ("str", ">H"), 0xDB: ("str", ">I"),
    0xDC: ("array", ">H"), 0xDD: ("array", ">I"),
    0xDE: ("map", ">H"), 0xDF: ("map", ">I"),
    0xC7: ("ext", ">B"), 0xC8: ("ext", ">H"), 0xC9: ("ext", ">I"),
}
_NUMBERS = {
    0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
    0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
}
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}  # marker -> payload length
_BYTES_MARKERS = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I", 0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}  # bin, or raw str


@dataclasses.dataclass(frozen=True)
class LazyArray:
    """An array inside a msgpack file: `nbytes` raw C-order bytes at absolute `offset`."""

    path: Path
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, handle: io.RawIOBase, what: str) -> np.ndarray:
        raw = read_exact(handle, self.offset, self.nbytes, path=self.path, what=what)
        return raw.view(self.dtype).reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class ChunkedLazyArray:
    """A flax chunked array: flat chunks concatenated, then reshaped to `shape`."""

    shape: tuple[int, ...]
    chunks: tuple[LazyArray, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.chunks[0].dtype

    def read(self, handle: io.RawIOBase, what: str) -> np.ndarray:
        return np.concatenate([chunk.read(handle, what).reshape(-1) for chunk in self.chunks]).reshape(self.shape)


class _Walker:
    """Recursive-descent msgpack decoder over a buffered file, skipping array payloads."""

    def __init__(self, path: Path, handle: io.BufferedReader, size: int) -> None:
        self.path = path
        self.handle = handle
        self.size = size

    def _corrupt(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupt msgpack at byte {self.handle.tell()}: {what}")

    def _position_with_room(self, count: int, what: str) -> int:
        """The current offset, after checking that `count` more bytes (of `what`) fit in the file."""
        position = self.handle.tell()
        if position + count > self.size:
            raise CheckpointError(
                f"{self.path}: truncated: {what} needs bytes {position}..{position + count} but the file has "
                f"{self.size}"
            )
        return position

    def _take(self, count: int) -> bytes:
        position = self._position_with_room(count, "msgpack")
        data = self.handle.read(count)
        if len(data) != count:
            raise CheckpointError(f"{self.path}: truncated at byte {position + len(data)}")
        return data

    def _skip(self, count: int) -> int:
        """Skip `count` bytes; returns the offset where they start."""
        position = self._position_with_room(count, "an array")
        self.handle.seek(position + count)
        return position

    def _unpack(self, fmt: str) -> int | float:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def value(self, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise self._corrupt("nesting too deep")
        marker = self._take(1)[0]
        if marker <= 0x7F:
            return marker
        if marker >= 0xE0:
            return marker - 0x100
        if 0x80 <= marker <= 0x8F:
            return self._map(marker & 0x0F, depth)
        if 0x90 <= marker <= 0x9F:
            return self._array(marker & 0x0F, depth)
        if 0xA0 <= marker <= 0xBF:
            return self._str(marker & 0x1F)
        if marker in _CONSTANTS:
            return _CONSTANTS[marker]
        if marker in _SIZED:
            kind, fmt = _SIZED[marker]
            count = int(self._unpack(fmt))
            if kind == "bin":
                return self._take(count)
            if kind == "str":
                return self._str(count)
            if kind == "array":
                return self._array(count, depth)
            if kind == "map":
                return self._map(count, depth)
            return self._ext(count)
        if marker in _NUMBERS:
            return self._unpack(_NUMBERS[marker])
        if marker in _FIXEXT:
            return self._ext(_FIXEXT[marker])
        raise self._corrupt(f"invalid marker byte 0x{marker:02x}")

    def _str(self, count: int) -> str:
        try:
            return self._take(count).decode("utf-8")
        except UnicodeDecodeError as err:
            raise self._corrupt(f"invalid UTF-8 string ({err})") from err

    def _array(self, count: int, depth: int) -> list:
        return [self.value(depth + 1) for _ in range(count)]

    def _map(self, count: int, depth: int) -> dict:
        result = {}
        for _ in range(count):
            key = self.value(depth + 1)
            if isinstance(key, (list, dict)):
                raise self._corrupt("unhashable map key")
            result[key] = self.value(depth + 1)
        if result.get(CHUNKED_MARKER) is True:
            return self._chunked(result)
        return result

    def _chunked(self, node: dict) -> ChunkedLazyArray:
        try:
            shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
            chunks = tuple(node["chunks"][str(i)] for i in range(len(node["chunks"])))
        except (KeyError, TypeError, ValueError) as err:
            raise self._corrupt(f"malformed chunked array ({err})") from err
        if not chunks or not all(isinstance(c, LazyArray) for c in chunks):
            raise self._corrupt("chunked array without array chunks")
        if sum(c.nbytes for c in chunks) != math.prod(shape) * chunks[0].dtype.itemsize:
            raise self._corrupt(f"chunked array sizes do not add up to shape {shape}")
        return ChunkedLazyArray(shape, chunks)

    def _ext(self, length: int) -> Any:
        code = struct.unpack(">b", self._take(1))[0]
        start = self.handle.tell()
        end = start + length
        if end > self.size:
            raise CheckpointError(
                f"{self.path}: truncated: an extension value needs bytes {start}..{end} but the file has {self.size}"
            )
        if code in (EXT_NDARRAY, EXT_NPSCALAR):
            array = self._ndarray(end)
            if self.handle.tell() != end:
                raise self._corrupt("array payload does not fill its extension value")
            return array
        payload = self._take(length)
        if code == EXT_NATIVE_COMPLEX:
            import msgpack

            try:
                real, imag = msgpack.unpackb(payload)
                return complex(real, imag)
            except (ValueError, TypeError, msgpack.UnpackException) as err:
                raise self._corrupt(f"invalid complex number ({err})") from err
        raise self._corrupt(f"unknown msgpack extension type {code}")

    def _ndarray(self, end: int) -> LazyArray:
        """Parse flax's `(shape, dtype_name, raw_bytes)` payload, leaving the raw bytes unread."""
        marker = self._take(1)[0]
        if marker != 0x93:  # fixarray of 3
            raise self._corrupt("array payload is not a (shape, dtype, bytes) triple")
        shape = self.value()
        dtype_name = self.value()
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise self._corrupt(f"invalid array shape {quote(shape)}")
        try:
            dtype = dtype_from_name(dtype_name if isinstance(dtype_name, (str, bytes)) else "?")
        except ValueError as err:
            raise self._corrupt(str(err)) from err
        bin_marker = self._take(1)[0]
        fmt = _BYTES_MARKERS.get(bin_marker)
        if fmt is None:
            raise self._corrupt("array payload has no byte string")
        nbytes = int(self._unpack(fmt))
        needed = math.prod(shape) * dtype.itemsize
        if nbytes != needed:
            raise CheckpointError(
                f"{self.path}: header lies about sizes: an array of {dtype.name} {tuple(shape)} needs {needed} bytes "
                f"but the file declares {nbytes}"
            )
        if self.handle.tell() + nbytes > end:
            raise self._corrupt("array bytes overrun their extension value")
        offset = self._skip(nbytes)
        return LazyArray(self.path, offset, nbytes, tuple(shape), dtype)


def scan_msgpack(path: Path) -> Any:
    """The decoded tree of a flax msgpack file, with arrays as LazyArray / ChunkedLazyArray leaves."""
    path = Path(path)
    size = file_size(path)
    try:
        with open(path, "rb") as handle:
            walker = _Walker(path, handle, size)
            tree = walker.value()
            if handle.tell() != size:
                raise CheckpointError(f"{path}: corrupt: {size - handle.tell()} trailing bytes after the msgpack value")
            return tree
    except OSError as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from err

