"""Hugging Face safetensors: sharded writing, dtypes kept, and lazy reads that touch one tensor's bytes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import drm_jax.io.safetensors_io as safetensors_io
from drm_jax.errors import CheckpointError
from drm_jax.io import CheckpointWriter, open_checkpoint, write_checkpoint


def _tensors(count: int = 6, rows: int = 64, cols: int = 256) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {f"layers.{i}.proj.weight": rng.normal(size=(rows, cols)).astype(np.float32) for i in range(count)}
    tensors["norm.weight"] = rng.normal(size=(cols,)).astype(ml_dtypes.bfloat16)
    tensors["step"] = np.asarray(7, dtype=np.int64)  # 0-d stays 0-d
    return tensors


def test_sharded_writer_index_and_values(tmp_path):
    tensors = _tensors()
    shard_limit = 3 * 64 * 256 * 4  # three float32 matrices per shard
    write_checkpoint(tensors, tmp_path / "out", max_shard_size=shard_limit)

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for shard in shards:  # no shard above the limit (every tensor here is smaller than it)
        assert (tmp_path / "out" / shard).stat().st_size < shard_limit + 4096
    assert not list(tmp_path.glob(".out.tmp-*")) and not list((tmp_path / "out").glob("*.part"))

    from safetensors import safe_open

    with open_checkpoint(tmp_path / "out") as reader:
        assert reader.format == "hf" and sorted(reader.keys()) == sorted(tensors)
        for name, expected in tensors.items():
            assert reader.shape(name) == expected.shape and reader.dtype(name) == expected.dtype
            got = reader.get(name)
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
            # The files are ordinary safetensors: the reference reader agrees (via torch for bf16).
            with safe_open(str(tmp_path / "out" / index["weight_map"][name]), "pt") as handle:
                reference = handle.get_tensor(name).float().numpy()
            np.testing.assert_array_equal(reference, expected.astype(np.float32))


def test_single_file_when_under_the_limit_and_config_copied(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "bert"}')
    (source / "tokenizer.json").write_text("{}")
    with CheckpointWriter(tmp_path / "out", copy_from=source) as writer:
        writer.add("a.weight", np.ones((2, 3), np.float16))
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    with open_checkpoint(tmp_path / "out") as reader:
        assert reader.config_dir == tmp_path / "out"
        assert reader.get("a.weight").dtype == np.float16


class _CountingFile:
    """Wraps an unbuffered file and counts the bytes actually read through it."""

    total = 0

    def __init__(self, handle):
        self._handle = handle

    def readinto(self, buffer):
        count = self._handle.readinto(buffer)
        _CountingFile.total += count or 0
        return count

    def read(self, size=-1):
        data = self._handle.read(size)
        _CountingFile.total += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._handle, name)


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def test_reading_one_tensor_touches_only_its_bytes(tmp_path, monkeypatch):
    # ~4 MiB over 4 shards; the tensor read is 4 KiB.
    rng = np.random.default_rng(1)
    big = {f"big.{i}.weight": rng.normal(size=(512, 512)).astype(np.float32) for i in range(4)}
    small = rng.normal(size=(32, 32)).astype(np.float32)
    write_checkpoint({**big, "small.weight": small}, tmp_path / "ckpt", max_shard_size=2**20)
    assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) == 5

    real_open = safetensors_io.open_binary
    monkeypatch.setattr(safetensors_io, "open_binary", lambda path: _CountingFile(real_open(path)))
    with open_checkpoint(tmp_path / "ckpt") as reader:
        header_bytes = _CountingFile.total
        assert header_bytes < 5 * 4096  # opening reads headers only
        _CountingFile.total = 0
        before = _rchar() if sys.platform.startswith("linux") else None
        got = reader.get("small.weight")
        after = _rchar() if before is not None else None
        assert _CountingFile.total == small.nbytes  # exactly the tensor's bytes
        if before is not None:  # the kernel agrees: no read-ahead of other tensors
            assert after - before < small.nbytes + 8192
    np.testing.assert_array_equal(got, small)


def test_existing_output_refused_then_replaced_with_overwrite(tmp_path):
    out = tmp_path / "out"
    write_checkpoint({"a": np.zeros(2, np.float32)}, out)
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        write_checkpoint({"a": np.ones(2, np.float32)}, out)
    write_checkpoint({"a": np.ones(2, np.float32)}, out, overwrite=True)
    with open_checkpoint(out) as reader:
        np.testing.assert_array_equal(reader.get("a"), np.ones(2, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or backup left


def test_failure_inside_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "new" / "out", max_shard_size=16) as writer:
            writer.add("a", np.zeros(8, np.float32))
            writer.add("b", np.zeros(8, np.float32))  # first shard already on disk
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # temporary directory and the parent it created are gone


def test_tensors_are_read_into_aligned_buffers(tmp_path):
    """Every tensor lands 64-byte aligned, whatever its offset in the file: JAX's CPU backend then reads it
    in place instead of copying it (drm_jax.buffers)."""
    tensors = {"odd": np.arange(3, dtype=np.float32), **_tensors(count=3)}  # 12 bytes: later offsets misaligned
    write_checkpoint(tensors, tmp_path / "out")
    with open_checkpoint(tmp_path / "out") as reader:
        for name, want in tensors.items():
            got = reader.get(name)
            assert got.ctypes.data % 64 == 0, name
            np.testing.assert_array_equal(got, want)
