"""Every bad input: a clear error naming the file, exit status 2 from the command line, nothing written."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from drm_jax.cli.main import main
from drm_jax.errors import CheckpointError
from drm_jax.io import open_checkpoint, write_checkpoint

TENSORS = {
    "encoder.block.0.layer.0.SelfAttention.q.weight": np.arange(24, dtype=np.float32).reshape(6, 4),
    "shared.weight": np.arange(40, dtype=np.float32).reshape(10, 4),
}


def _convert_fails(capsys, tmp_path: Path, src: Path, expect_in_message: str, to: str = "flax") -> str:
    """Run `drm-jax convert`, expect exit 2 with one error line naming the file, and no output at all."""
    before = sorted(p.name for p in tmp_path.iterdir())
    dst = tmp_path / "converted"
    assert main(["convert", str(src), str(dst), "--to", to]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("drm-jax: error: ") and "\n" not in err and "Traceback" not in err
    assert expect_in_message in err, err
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary directory left
    return err


def _safetensors_dir(tmp_path: Path, **kwargs) -> Path:
    return write_checkpoint(TENSORS, tmp_path / "model", **kwargs)


def test_truncated_safetensors(tmp_path, capsys):
    model = _safetensors_dir(tmp_path)
    path = model / "model.safetensors"
    os.truncate(path, path.stat().st_size - 10)
    err = _convert_fails(capsys, tmp_path, model, str(path))
    assert "truncated" in err


def test_truncated_safetensors_header(tmp_path, capsys):
    model = _safetensors_dir(tmp_path)
    path = model / "model.safetensors"
    os.truncate(path, 20)
    assert "truncated" in _convert_fails(capsys, tmp_path, model, str(path))


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    raw = json.dumps(header).encode()  # offsets are relative to the data, so the header may change length
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])


def test_header_lying_about_sizes(tmp_path, capsys):
    model = _safetensors_dir(tmp_path)
    path = model / "model.safetensors"
    _rewrite_header(path, lambda h: h["shared.weight"].update(shape=[10, 5]))  # 200 bytes claimed, 160 stored
    err = _convert_fails(capsys, tmp_path, model, str(path))
    assert "lies about sizes" in err and "shared.weight" in err


def test_header_pointing_past_the_end(tmp_path, capsys):
    model = _safetensors_dir(tmp_path)
    path = model / "model.safetensors"

    def move(header):
        begin, end = header["shared.weight"]["data_offsets"]
        header["shared.weight"]["data_offsets"] = [begin + 10_000, end + 10_000]

    _rewrite_header(path, move)
    err = _convert_fails(capsys, tmp_path, model, str(path))
    assert "truncated" in err and "shared.weight" in err


def test_corrupt_header(tmp_path, capsys):
    model = _safetensors_dir(tmp_path)
    path = model / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(data))
    assert "corrupt" in _convert_fails(capsys, tmp_path, model, str(path))


def test_missing_shard_named_by_index(tmp_path, capsys):
    model = _safetensors_dir(tmp_path, max_shard_size=100)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    missing = index["weight_map"]["shared.weight"]
    (model / missing).unlink()
    err = _convert_fails(capsys, tmp_path, model, "model.safetensors.index.json")
    assert "missing shard" in err and missing in err


def test_index_shard_path_escaping_directory(tmp_path, capsys):
    model = _safetensors_dir(tmp_path, max_shard_size=100)
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["shared.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    assert "invalid shard file name" in _convert_fails(capsys, tmp_path, model, str(index_path))


def test_unknown_format(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.gguf").write_bytes(b"GGUF")
    (model / "config.json").write_text("{}")
    assert "unknown checkpoint format" in _convert_fails(capsys, tmp_path, model, str(model))
    assert "no such file" in _convert_fails(capsys, tmp_path, tmp_path / "absent", str(tmp_path / "absent"))


def test_truncated_flax_msgpack(tmp_path, capsys):
    from flax import serialization

    model = tmp_path / "model"
    model.mkdir()
    data = serialization.to_bytes({"layer": {"kernel": np.ones((64, 64), np.float32)}})
    (model / "flax_model.msgpack").write_bytes(data[:-100])
    err = _convert_fails(capsys, tmp_path, model, str(model / "flax_model.msgpack"), to="hf")
    assert "truncated" in err


def test_corrupt_flax_msgpack(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "flax_model.msgpack").write_bytes(b"\x81\xa5layer\xc1garbage")
    assert "corrupt" in _convert_fails(capsys, tmp_path, model, str(model / "flax_model.msgpack"), to="hf")


def test_corrupt_torch_bin(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    model = tmp_path / "model"
    model.mkdir()
    torch.save({"a.weight": torch.ones(8, 8)}, model / "pytorch_model.bin")
    data = (model / "pytorch_model.bin").read_bytes()
    (model / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    _convert_fails(capsys, tmp_path, model, str(model / "pytorch_model.bin"))


def test_torch_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    model = tmp_path / "model"
    model.mkdir()
    torch.save({"a.weight": torch.ones(2), "hook": Path("/tmp")}, model / "pytorch_model.bin")  # arbitrary object
    assert "unsafe" in _convert_fails(capsys, tmp_path, model, str(model / "pytorch_model.bin"))


def _t5x_checkpoint(tmp_path: Path) -> Path:
    from drm_jax.io import CheckpointWriter

    with CheckpointWriter(tmp_path / "t5x", "t5x") as writer:
        writer.add("target.token_embedder.embedding", np.ones((10, 4), np.float32))
    return tmp_path / "t5x"


def _point_array_at(checkpoint_dir: Path, relative: str) -> None:
    from flax import serialization

    path = checkpoint_dir / "checkpoint"
    content = serialization.msgpack_restore(path.read_bytes())
    content["optimizer"]["target"]["token_embedder"]["embedding"]["kvstore"]["path"] = relative
    path.write_bytes(serialization.msgpack_serialize(content))


@pytest.mark.parametrize("relative", ["../outside", "/etc", "target.x/../../outside"])
def test_t5x_array_path_outside_checkpoint(tmp_path, capsys, relative):
    checkpoint = _t5x_checkpoint(tmp_path)
    outside = tmp_path / "outside"
    (checkpoint / "target.token_embedder.embedding").rename(outside)  # a real array out there
    _point_array_at(checkpoint, relative)
    err = _convert_fails(capsys, tmp_path, checkpoint, str(checkpoint / "checkpoint"), to="hf")
    assert "outside the checkpoint directory" in err


def test_t5x_symlink_escaping_checkpoint(tmp_path, capsys):
    checkpoint = _t5x_checkpoint(tmp_path)
    outside = tmp_path / "outside"
    (checkpoint / "target.token_embedder.embedding").rename(outside)
    (checkpoint / "target.token_embedder.embedding").symlink_to(outside)
    assert "outside the checkpoint directory" in _convert_fails(capsys, tmp_path, checkpoint, "checkpoint", to="hf")


def test_t5x_missing_and_corrupt_arrays(tmp_path, capsys):
    checkpoint = _t5x_checkpoint(tmp_path)
    array_dir = checkpoint / "target.token_embedder.embedding"
    (array_dir / ".zarray").write_text("not json")
    assert str(array_dir) in _convert_fails(capsys, tmp_path, checkpoint, "cannot open array", to="hf")
    for child in array_dir.iterdir():
        child.unlink()
    array_dir.rmdir()
    assert "missing" in _convert_fails(capsys, tmp_path, checkpoint, str(checkpoint / "checkpoint"), to="hf")


def test_t5x_output_of_a_non_t5_model_is_refused(tmp_path, capsys):
    model = write_checkpoint({"encoder.layer.0.attention.self.query.weight": np.ones((4, 4), np.float32)},
                             tmp_path / "model")
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _convert_fails(capsys, tmp_path, model, "T5X output supports T5 models only", to="t5x")


def test_existing_destination_needs_overwrite(tmp_path, capsys):
    model = _safetensors_dir(tmp_path)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    assert main(["convert", str(model), str(dst), "--to", "flax"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    # --force replaces only an earlier output, never the user's files
    assert main(["convert", str(model), str(dst), "--to", "flax", "--force"]) == 2
    assert "keep.txt" in capsys.readouterr().err and sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    (dst / "keep.txt").unlink()
    assert main(["convert", str(model), str(dst), "--to", "hf"]) == 0
    assert main(["convert", str(model), str(dst), "--to", "flax", "--force"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["flax_model.msgpack"]


def test_reader_errors_name_file_and_tensor(tmp_path):
    model = _safetensors_dir(tmp_path)
    with open_checkpoint(model) as reader:
        with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
            reader.get("nope")
        path = model / "model.safetensors"
        os.truncate(path, path.stat().st_size - 8)  # shrinks under an open reader
        last = max(reader.keys(), key=lambda n: reader._entry(n).end)
        with pytest.raises(CheckpointError, match=rf"{path.name}: truncated: tensor '{last}'"):
            reader.get(last)


def test_every_truncation_is_a_checkpoint_error(tmp_path):
    """Cut a flax msgpack and a safetensors file at every length: always CheckpointError naming the file."""
    from flax import serialization

    from drm_jax.io.flax_io import FlaxReader
    from drm_jax.io.safetensors_io import SafetensorsReader

    flax_bytes = serialization.to_bytes({"a": {"kernel": np.ones((3, 2), np.float32)}, "b": np.arange(3)})
    safetensors_bytes = (_safetensors_dir(tmp_path) / "model.safetensors").read_bytes()
    for reader_cls, data, name in ((FlaxReader, flax_bytes, "x.msgpack"), (SafetensorsReader, safetensors_bytes, "x.safetensors")):
        path = tmp_path / name
        for length in range(len(data)):
            path.write_bytes(data[:length])
            with pytest.raises(CheckpointError, match=name):
                reader_cls(path).close()


def test_flipped_bytes_never_crash_the_readers(tmp_path):
    """Random single-byte corruption: either a clean read or a CheckpointError naming the file."""
    from flax import serialization

    from drm_jax.io.flax_io import FlaxReader
    from drm_jax.io.safetensors_io import SafetensorsReader

    flax_bytes = serialization.to_bytes({"a": {"kernel": np.ones((3, 2), np.float32)}, "b": np.arange(3)})
    safetensors_bytes = (_safetensors_dir(tmp_path) / "model.safetensors").read_bytes()
    rng = np.random.default_rng(0)
    for reader_cls, data, name in ((FlaxReader, flax_bytes, "x.msgpack"), (SafetensorsReader, safetensors_bytes, "x.safetensors")):
        path = tmp_path / name
        for _ in range(300):
            corrupt = bytearray(data)
            corrupt[rng.integers(len(data))] = rng.integers(256)
            path.write_bytes(bytes(corrupt))
            try:
                with reader_cls(path) as reader:
                    for key in reader.keys():
                        reader.get(key)
            except CheckpointError as err:
                assert name in str(err)


def test_t5x_output_with_a_wrong_arch_names_the_checkpoint_and_the_request(tmp_path, capsys):
    model = write_checkpoint(TENSORS, tmp_path / "model")
    (model / "config.json").write_text(json.dumps({"model_type": "t5"}))
    dst = tmp_path / "converted"
    assert main(["convert", str(model), str(dst), "--to", "t5x", "--arch", "llama"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--arch 'llama' was asked" in err and "this checkpoint is 't5'" in err, err
    assert "\n" not in err and not dst.exists()
