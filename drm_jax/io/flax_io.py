"""Flax msgpack checkpoints, as transformers 4.x Flax models saved them (`flax_model.msgpack`).

The file is `flax.serialization.to_bytes(params)`: a nested dict of arrays (`kernel` (in, out),
`embedding`, LayerNorm `scale` and `bias`, ...). transformers also wrote sharded Flax checkpoints: shards
`flax_model-00001-of-0000K.msgpack`, each a flat dict with "a/b/c" keys, plus
`flax_model.msgpack.index.json`; both read to the same dotted names ("encoder.layer.0....kernel").

Reading is lazy (see msgpack_lazy); writing buffers the tree and serializes it with flax.serialization
(a msgpack value needs its whole structure up front).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from drm_jax.errors import CheckpointError, quote
from drm_jax.io.base import IndexedReader, config_dir, open_binary, read_json
from drm_jax.io.msgpack_lazy import ChunkedLazyArray, LazyArray, scan_msgpack
from drm_jax.io.nested import flatten_tree, unflatten_names

FLAX_NAME = "flax_model.msgpack"
FLAX_INDEX_NAME = "flax_model.msgpack.index.json"


def _array_leaves(tree: object) -> dict[str, LazyArray | ChunkedLazyArray]:
    """The array leaves of a scanned tree by dotted name (numbers and strings are not tensors)."""
    return {
        name: leaf for name, leaf in flatten_tree(tree).items() if isinstance(leaf, (LazyArray, ChunkedLazyArray))
    }


class FlaxReader(IndexedReader):
    """A Flax msgpack checkpoint: a .msgpack file, or a directory with flax_model.msgpack (or its index)."""

    format = "flax"

    def __init__(self, path: Path) -> None:
        path = Path(path)
        directory = path.parent if path.is_file() else path
        super().__init__(path, config_dir(directory))
        self._by_name: dict[str, LazyArray | ChunkedLazyArray] = {}
        self._handles: dict[Path, object] = {}
        index_path = path if path.name.endswith(".index.json") else directory / FLAX_INDEX_NAME
        if path.is_file() and not path.name.endswith(".index.json"):
            self._by_name = _array_leaves(scan_msgpack(path))
        elif index_path.is_file():
            self._by_name = self._scan_index(index_path)
        elif (directory / FLAX_NAME).is_file():
            self._by_name = _array_leaves(scan_msgpack(directory / FLAX_NAME))
        else:
            raise CheckpointError(f"{path}: no {FLAX_NAME}")

    @staticmethod
    def _scan_index(index_path: Path) -> dict[str, LazyArray | ChunkedLazyArray]:
        index = read_json(index_path, "index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: index has no weight_map")
        leaves: dict[str, LazyArray | ChunkedLazyArray] = {}
        for shard_name in dict.fromkeys(weight_map.values()):
            if not isinstance(shard_name, str) or Path(shard_name).name != shard_name:
                raise CheckpointError(f"{index_path}: invalid shard file name {quote(shard_name)}")
            shard = index_path.parent / shard_name
            if not shard.exists():
                raise CheckpointError(f"{index_path}: missing shard {quote(shard_name)}")
            leaves.update(_array_leaves(scan_msgpack(shard)))
        missing = [name for name in weight_map if name.replace("/", ".") not in leaves]
        if missing:
            raise CheckpointError(f"{index_path}: tensor {missing[0]!r} is in the index but in none of its shards")
        return leaves

    def shape(self, name: str) -> tuple[int, ...]:
        return self._record(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self._record(name).dtype

    def get(self, name: str) -> np.ndarray:
        leaf = self._record(name)
        file = leaf.chunks[0].path if isinstance(leaf, ChunkedLazyArray) else leaf.path
        if file not in self._handles:
            self._handles[file] = open_binary(file)
        return leaf.read(self._handles[file], f"tensor {name!r}")

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def write_flax_msgpack(tensors: Mapping[str, np.ndarray], path: Path) -> Path:
    """Write dotted-name tensors as one nested-dict flax msgpack file (flax.serialization.to_bytes layout)."""
    from flax import serialization

    tree = unflatten_names(tensors)
    data = serialization.msgpack_serialize(tree, in_place=True)
    Path(path).write_bytes(data)
    return Path(path)
