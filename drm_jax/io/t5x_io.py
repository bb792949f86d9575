"""Legacy T5X checkpoints: a `checkpoint` msgpack file plus one zarr TensorStore directory per array.

Layout (t5x.checkpoints, VERSION 3), in a directory `checkpoint_<step>/`:
  checkpoint                       flax msgpack of {"version": 3, "optimizer": {"target": params,
                                   "state": {...}}}; a large array's leaf is a TensorStore spec dict
                                   {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file",
                                   "path": "target.encoder.layers_0.attention.query.kernel"}, "metadata": ...}
                                   whose path is relative to the checkpoint directory; small arrays are inline.
  target.encoder.layers_0....kernel/   zarr array (.zarray + gzip chunks), bf16 stored natively.

Read with tensorstore (not with t5x). Only the model parameters (`optimizer.target`) are exposed, named
"target.<path>". Every array path is checked at open time: it must be a relative path that stays inside
the checkpoint directory (no "..", no absolute path, no symlink out) and exist, and it must be a local
file store (a checkpoint never makes us read elsewhere or over the network). The files inside an array
directory are checked the same way (regular files, no link leaving the checkpoint directory), and the
shape its metadata claims must fit the bytes stored (`drm_jax.io.base.check_claimed_size`). Every chunk
must be present: a missing chunk file is refused when the tensor is read (tensorstore would fill it with
the fill value, zeros).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from drm_jax.errors import CheckpointError, quote
from drm_jax.io.base import (CheckpointReader, check_claimed_size, config_dir, is_step_number, open_binary, step_order,
                             tree_bytes)
from drm_jax.io.dtypes import as_numpy_dtype
from drm_jax.io.msgpack_lazy import ChunkedLazyArray, LazyArray, scan_msgpack
from drm_jax.io.nested import flatten_tree, unflatten_names

T5X_CHECKPOINT_FILE = "checkpoint"
T5X_VERSION = 3
# t5x's chunk target: large enough to keep object stores happy, small enough to bound memory.
_CHUNK_BYTES = 64 * 2**20
_ARRAY_DRIVERS = ("zarr", "zarr3", "n5")
_LOCAL_KVSTORES = ("file", "gfile")
# Deflate (zarr's gzip and zlib codecs) expands at most 1032-fold; a little headroom for chunk headers.
_MAX_EXPANSION = 1100


def is_msgpack_map(path: Path) -> bool:
    """Whether the file starts like a msgpack map (a T5X `checkpoint`, unlike TensorFlow's text file)."""
    try:
        with open(path, "rb") as handle:
            first = handle.read(1)
    except OSError:
        return False
    return bool(first) and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))


def find_t5x_checkpoint(path: Path) -> Path | None:
    """The `checkpoint` file of a T5X checkpoint given as that file, its directory, or a model directory
    holding `checkpoint_<step>` directories (the latest step); None if there is none."""
    path = Path(path)
    if path.is_file():
        return path if path.name == T5X_CHECKPOINT_FILE and is_msgpack_map(path) else None
    candidate = path / T5X_CHECKPOINT_FILE
    if candidate.is_file() and is_msgpack_map(candidate):
        return candidate
    if path.is_dir():
        steps = [c for c in path.iterdir() if c.is_dir() and c.name.startswith("checkpoint_")
                 and is_step_number(c.name[len("checkpoint_"):])]
        for step in sorted(steps, key=lambda c: step_order(c.name[len("checkpoint_"):]), reverse=True):
            candidate = step / T5X_CHECKPOINT_FILE
            if candidate.is_file() and is_msgpack_map(candidate):
                return candidate
    return None


def _is_tensorstore_spec(node: Any) -> bool:
    return isinstance(node, dict) and "driver" in node and ("kvstore" in node or "path" in node)


def resolve_array_dir(checkpoint_file: Path, name: str, spec: dict) -> tuple[str, Path]:
    """(array driver, absolute array directory) of a T5X TensorStore spec, refusing anything that is not a
    local path inside the checkpoint directory."""
    driver = spec.get("driver")
    if driver not in _ARRAY_DRIVERS:
        raise CheckpointError(f"{checkpoint_file}: tensor {name!r} uses unsupported TensorStore driver {quote(driver)}")
    kvstore = spec.get("kvstore")
    if isinstance(kvstore, str):
        raise CheckpointError(f"{checkpoint_file}: tensor {name!r} points to {quote(kvstore)}; only relative local paths are read")
    kvstore = kvstore or {}
    if not isinstance(kvstore, dict) or kvstore.get("driver", "file") not in _LOCAL_KVSTORES:
        raise CheckpointError(
            f"{checkpoint_file}: tensor {name!r} is stored in {kvstore.get('driver') if isinstance(kvstore, dict) else kvstore!r}; "
            "only local files are read"
        )
    relative = kvstore.get("path") or spec.get("path")  # tensorstore >= 0.1.14 puts it in the kvstore
    if not isinstance(relative, str) or not relative:
        raise CheckpointError(f"{checkpoint_file}: tensor {name!r} has no array path in its TensorStore spec")
    root = checkpoint_file.parent.resolve()
    if Path(relative).is_absolute() or "://" in relative:
        raise CheckpointError(
            f"{checkpoint_file}: tensor {name!r} array path {quote(relative)} points outside the checkpoint directory {root}"
        )
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise CheckpointError(
            f"{checkpoint_file}: tensor {name!r} array path {quote(relative)} points outside the checkpoint directory {root}"
        )
    if target == root or not target.is_dir():
        raise CheckpointError(f"{checkpoint_file}: tensor {name!r}: array directory {quote(relative)} is missing")
    return driver, target


def _open_store(driver: str, directory: Path):
    import tensorstore as ts

    # A chunk file that is not there is an error, not the fill value: t5x writes every chunk (its specs set
    # no fill_value), so a missing one is a checkpoint cut short, which tensorstore would read as zeros.
    return ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(directory) + "/"},
                    "fill_missing_data_reads": False}, open=True).result()


def _missing_chunk(array_dir: Path, err: Exception) -> str | None:
    """The chunk file (relative to the array directory) a tensorstore read error says is missing, or None."""
    match = re.search(r'NOT_FOUND: chunk .* stored at local file "(.*)" is missing', str(err))
    if match is None:
        return None
    try:
        return str(Path(match.group(1)).relative_to(array_dir))
    except ValueError:
        return match.group(1)


class T5xReader(CheckpointReader):
    """A legacy T5X checkpoint; tensor names are "target.<flax path>" (e.g. target.encoder.layers_0....kernel)."""

    format = "t5x"

    def __init__(self, path: Path) -> None:
        path = Path(path)
        checkpoint_file = find_t5x_checkpoint(path)
        if checkpoint_file is None:
            raise CheckpointError(f"{path}: not a T5X checkpoint (no msgpack file named {T5X_CHECKPOINT_FILE!r})")
        directory = checkpoint_file.parent
        super().__init__(path, config_dir(directory))
        self.checkpoint_file = checkpoint_file
        tree = scan_msgpack(checkpoint_file)
        target = self._target(tree)
        self._inline: dict[str, LazyArray | ChunkedLazyArray] = {}
        self._stores: dict[str, tuple[Path, Any]] = {}
        self._declared: dict[str, str] = {}  # dtype named by the spec (T5X version 2 stored bf16 as uint16)
        self._handle = None
        leaves = flatten_tree(target, "target", is_leaf=_is_tensorstore_spec)
        for name, leaf in leaves.items():
            if isinstance(leaf, (LazyArray, ChunkedLazyArray)):
                self._inline[name] = leaf
            elif _is_tensorstore_spec(leaf):
                driver, array_dir = resolve_array_dir(checkpoint_file, name, leaf)
                # Chunk files too must be the checkpoint's own regular files (no link out, no FIFO).
                stored = tree_bytes(array_dir, directory)
                try:
                    store = _open_store(driver, array_dir)
                except Exception as err:  # tensorstore raises ValueError on bad metadata
                    raise CheckpointError(f"{array_dir}: cannot open array for tensor {name!r}: {err}") from None
                check_claimed_size(array_dir, name, tuple(store.domain.shape), as_numpy_dtype(store.dtype), stored,
                                   _MAX_EXPANSION)
                self._stores[name] = (array_dir, store)
                if isinstance(leaf.get("dtype"), str):
                    self._declared[name] = leaf["dtype"]
        self._order = [name for name in leaves if name in self._inline or name in self._stores]

    def _target(self, tree: Any) -> Any:
        if isinstance(tree, dict) and isinstance(tree.get("optimizer"), dict) and "target" in tree["optimizer"]:
            return tree["optimizer"]["target"]
        if isinstance(tree, dict) and "target" in tree:
            return tree["target"]
        raise CheckpointError(f"{self.checkpoint_file}: not a T5X checkpoint (no optimizer.target tree)")

    def keys(self) -> list[str]:
        return list(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._inline or name in self._stores

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._inline:
            return self._inline[name].shape
        if name in self._stores:
            return tuple(int(d) for d in self._stores[name][1].domain.shape)
        raise self._unknown(name)

    def dtype(self, name: str) -> np.dtype:
        if name in self._inline:
            return self._inline[name].dtype
        if name not in self._stores:
            raise self._unknown(name)
        stored = as_numpy_dtype(self._stores[name][1].dtype)
        if stored == np.uint16 and self._declared.get(name) == "bfloat16":
            return np.dtype(ml_dtypes.bfloat16)
        return stored

    def get(self, name: str) -> np.ndarray:
        if name in self._inline:
            if self._handle is None:
                self._handle = open_binary(self.checkpoint_file)
            return self._inline[name].read(self._handle, f"tensor {name!r}")
        if name not in self._stores:
            raise self._unknown(name)
        array_dir, store = self._stores[name]
        try:
            array = np.asarray(store.read().result())
        except Exception as err:  # corrupt, truncated or missing chunk
            missing = _missing_chunk(array_dir, err)
            if missing is not None:
                raise CheckpointError(f"{array_dir}: tensor {name!r}: chunk file {quote(missing)} is missing; a "
                                      f"checkpoint must hold every chunk of its arrays") from None
            raise CheckpointError(f"{array_dir}: cannot read tensor {name!r}: {err}") from err
        return array.view(self.dtype(name))  # same itemsize: only relabels T5X v2's uint16-coded bf16

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._stores.clear()


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> list[int]:
    """Halve the largest axis until a chunk is at most _CHUNK_BYTES."""
    chunks = [max(1, d) for d in shape]
    while math.prod(chunks) * itemsize > _CHUNK_BYTES and max(chunks) > 1:
        axis = chunks.index(max(chunks))
        chunks[axis] = (chunks[axis] + 1) // 2
    return chunks


class T5xWriter:
    """Writes a legacy T5X checkpoint into `directory`: each array goes to its zarr directory as it is
    added (streaming); `finish()` writes the `checkpoint` msgpack referencing them.

    Names are "target.<path>" (a name without the "target." or "state." prefix is put under target).
    0-d arrays are stored inline in the msgpack, as t5x does for unpartitioned scalars.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._leaves: dict[str, Any] = {}

    def add(self, name: str, array: np.ndarray) -> None:
        import tensorstore as ts

        full = name if name.startswith(("target.", "state.")) else f"target.{name}"
        if full in self._leaves:
            raise CheckpointError(f"tensor {full!r} is given twice")
        if array.ndim == 0:
            self._leaves[full] = np.asarray(array)
            return
        spec = {
            "driver": "zarr",
            "dtype": array.dtype.name,
            "kvstore": {"driver": "file", "path": full},
            "metadata": {"shape": list(array.shape), "chunks": _chunk_shape(array.shape, array.dtype.itemsize),
                         "compressor": {"id": "gzip"}},
        }
        absolute = {**spec, "kvstore": {"driver": "file", "path": str(self.directory / full) + "/"}}
        try:
            store = ts.open(absolute, create=True, delete_existing=True).result()
            store.write(np.ascontiguousarray(array)).result()
        except Exception as err:
            raise CheckpointError(f"{self.directory / full}: cannot write tensor {full!r}: {err}") from err
        self._leaves[full] = spec

    def finish(self) -> Path:
        from flax import serialization

        tree = unflatten_names(self._leaves)
        state = tree.get("state", {})
        state.setdefault("step", np.asarray(0, dtype=np.int32))
        content = {"version": T5X_VERSION, "optimizer": {"target": tree.get("target", {}), "state": state}}
        path = self.directory / T5X_CHECKPOINT_FILE
        path.write_bytes(serialization.msgpack_serialize(content, in_place=True))
        return path
