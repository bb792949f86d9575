"""Hostile checkpoint files (issue 15, classes 1, 3, 8, 10, 12, 13): each refused in one line naming the
file or tensor, exit 2, no traceback, no output, inputs unchanged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from .conftest import refused, tree_digest

EMBEDDING = "target.token_embedder.embedding"


@pytest.fixture
def alarm():
    """Fail (instead of hanging the suite) if a reader blocks on a FIFO for 60 s."""
    def timeout(signum, frame):
        raise AssertionError("blocked: a reader opened a FIFO")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def t5x_checkpoint(root: Path) -> Path:
    from drm_jax.io import CheckpointWriter

    with CheckpointWriter(root / "t5x", "t5x") as writer:
        writer.add(EMBEDDING, np.arange(40, dtype=np.float32).reshape(10, 4))
    return root / "t5x"


def convert_refused(capfd, src: Path, out: Path, names, inputs=None, to="hf") -> str:
    return refused(capfd, ["convert", src, out, "--to", to], out, inputs or [src.parent], names)


# -- class 1: links inside a T5X/zarr array that leave the checkpoint --------------------------------------
def _chunk(array_dir: Path) -> Path:
    return next(p for p in array_dir.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("what", ["chunk to a copy outside", "chunk to an absolute system file",
                                  "metadata to a copy outside", "directory outside"])
def test_t5x_links_leaving_the_checkpoint_are_refused(tmp_path, capfd, what):
    src = t5x_checkpoint(tmp_path / "in")
    array_dir = src / EMBEDDING
    outside = tmp_path / "in" / "outside"
    outside.mkdir()
    chunk = _chunk(array_dir)
    if what == "chunk to a copy outside":
        shutil.copy(chunk, outside / "stolen")
        chunk.unlink()
        chunk.symlink_to(outside / "stolen")
        link = chunk
    elif what == "chunk to an absolute system file":
        chunk.unlink()
        chunk.symlink_to("/etc/hostname")
        link = chunk
    elif what == "metadata to a copy outside":
        shutil.copy(array_dir / ".zarray", outside / "zarray")
        (array_dir / ".zarray").unlink()
        (array_dir / ".zarray").symlink_to(outside / "zarray")
        link = array_dir / ".zarray"
    else:
        (array_dir / "sub").symlink_to(outside, target_is_directory=True)
        link = array_dir / "sub"
    line = convert_refused(capfd, src, tmp_path / "out", [str(link), "symbolic link"], [tmp_path / "in"])
    assert "outside" in line or "directory" in line


def test_t5x_link_inside_the_checkpoint_is_read(tmp_path):
    from drm_jax.io import open_checkpoint

    src = t5x_checkpoint(tmp_path)
    chunk = _chunk(src / EMBEDDING)
    shutil.move(chunk, src / "kept-chunk")
    chunk.symlink_to(src / "kept-chunk")
    with open_checkpoint(src) as reader:
        np.testing.assert_array_equal(reader.get(EMBEDDING), np.arange(40, dtype=np.float32).reshape(10, 4))


@pytest.mark.parametrize("target", ["copy outside", "absolute system file"])
def test_orbax_links_leaving_the_checkpoint_are_refused(tmp_path, capfd, target):
    from drm_jax.io import CheckpointWriter

    src = tmp_path / "in" / "orbax"
    with CheckpointWriter(src, "orbax") as writer:
        writer.add("params.dense.kernel", np.ones((4, 4), np.float32))
    victim = next(p for p in sorted(src.rglob("*")) if p.is_file() and p.parent != src)
    if target == "copy outside":
        shutil.copy(victim, tmp_path / "in" / "stolen")
        destination = tmp_path / "in" / "stolen"
    else:
        destination = Path("/etc/hostname")
    victim.unlink()
    victim.symlink_to(destination)
    convert_refused(capfd, src, tmp_path / "out", [str(victim), "symbolic link"])


# -- class 10: header-claimed sizes beyond the bytes present -----------------------------------------------
@pytest.mark.parametrize("shape", [[2**40, 2**20], [2**24, 64]])
def test_zarr_shape_beyond_the_stored_bytes_is_refused(tmp_path, capfd, shape):
    src = t5x_checkpoint(tmp_path / "in")
    meta_path = src / EMBEDDING / ".zarray"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = shape
    meta_path.write_text(json.dumps(meta))
    convert_refused(capfd, src, tmp_path / "out", [EMBEDDING, "claims shape"])


# -- class 6 (convert side): a checkpoint with no tensors -------------------------------------------------
@pytest.mark.parametrize("corruption", ["empty tree", "no tree"])
def test_orbax_with_corrupt_metadata_is_refused(tmp_path, capfd, corruption):
    from drm_jax.io import CheckpointWriter

    src = tmp_path / "in" / "orbax"
    with CheckpointWriter(src, "orbax") as writer:
        writer.add("params.dense.kernel", np.ones((4, 4), np.float32))
    metadata = json.loads((src / "_METADATA").read_text())
    if corruption == "empty tree":
        metadata["tree_metadata"] = {}
    else:
        del metadata["tree_metadata"]
    (src / "_METADATA").write_text(json.dumps(metadata))
    convert_refused(capfd, src, tmp_path / "out", [str(src), "Orbax metadata"])


def test_empty_safetensors_is_refused_by_convert(tmp_path, capfd):
    from safetensors.numpy import save_file

    model = tmp_path / "in" / "model"
    model.mkdir(parents=True)
    save_file({}, str(model / "model.safetensors"))
    convert_refused(capfd, model, tmp_path / "out", [str(model), "no tensors"])


# -- class 3: torch zip records that do not hold their tensors ---------------------------------------------
def _torch_file(directory: Path, compress: bool = False) -> Path:
    import torch

    directory.mkdir(parents=True)
    path = directory / "pytorch_model.bin"
    torch.save({"a.weight": torch.arange(16.0).reshape(4, 4), "b.weight": torch.ones(3)}, path)
    if compress:
        with zipfile.ZipFile(path) as old, zipfile.ZipFile(directory / "z.bin", "w", zipfile.ZIP_DEFLATED) as new:
            for info in old.infolist():
                new.writestr(info.filename, old.read(info.filename))
        os.replace(directory / "z.bin", path)
    return path


def _shrink_record(path: Path, record_suffix: str, by: int) -> None:
    """Make one data record claim `by` fewer bytes in both zip headers (its storage then overruns it)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record_suffix))
    struct.pack_into("<II", data, info.header_offset + 18, info.file_size - by, info.file_size - by)
    at = data.find(b"PK\x01\x02")
    while at != -1:
        name_length = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46:at + 46 + name_length].decode() == info.filename:
            struct.pack_into("<II", data, at + 20, info.file_size - by, info.file_size - by)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("record, by", [("/data/0", 8), ("/data/1", 4), ("/data/0", 60)])
def test_truncated_torch_record_is_refused(tmp_path, capfd, record, by):
    path = _torch_file(tmp_path / "in" / "model")
    _shrink_record(path, record, by)
    convert_refused(capfd, path.parent, tmp_path / "out", [str(path), "truncated"])


def test_compressed_torch_record_is_refused(tmp_path, capfd):
    path = _torch_file(tmp_path / "in" / "model", compress=True)
    convert_refused(capfd, path.parent, tmp_path / "out", [str(path)])


# -- class 13: pickles that would run code: our one line, never torch's advice -------------------------------
class _Payload:
    def __reduce__(self):
        return (print, ("the payload ran",))


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy pickle", "zip"])
def test_pickle_payload_gets_our_one_line_only(tmp_path, legacy):
    import torch

    model = tmp_path / "in" / "model"
    model.mkdir(parents=True)
    torch.save({"w": torch.ones(2), "x": _Payload()}, model / "pytorch_model.bin",
               _use_new_zipfile_serialization=not legacy)
    before = tree_digest([tmp_path / "in"])
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "drm_jax.cli.main", "convert", str(model), str(out), "--to", "hf"],
                            capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "weights_only" not in result.stderr and "Traceback" not in result.stderr
    assert "the payload ran" not in result.stdout + result.stderr
    assert str(model / "pytorch_model.bin") in lines[0] and "unsafe" in lines[0]
    assert not out.exists() and tree_digest([tmp_path / "in"]) == before


# -- class 12: FIFOs and other non-regular files named like checkpoint files -------------------------------
def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("name", ["model.safetensors", "weights.safetensors", "model-00001-of-00001.safetensors"])
def test_fifo_named_like_a_safetensors_file_is_refused(tmp_path, capfd, alarm, name):
    model = tmp_path / "in" / "model"
    model.mkdir(parents=True)
    if name.startswith("model-"):
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    fifo = _fifo(model / name)
    convert_refused(capfd, model, tmp_path / "out", [str(fifo) if name != "model.safetensors" else name, "FIFO"])


def test_fifo_given_as_the_source_is_refused(tmp_path, capfd, alarm):
    fifo = _fifo(tmp_path / "in.safetensors")
    refused(capfd, ["convert", fifo, tmp_path / "out", "--to", "hf"], tmp_path / "out", [], [str(fifo)])


def test_fifo_as_index_or_adapter_config_is_refused(tmp_path, capfd, alarm, tiny_family):
    model = tmp_path / "in" / "model"
    shutil.copytree(tiny_family / "base", model)
    (model / "model.safetensors").unlink()
    fifo = _fifo(model / "model.safetensors.index.json")
    convert_refused(capfd, model, tmp_path / "out", [str(fifo), "FIFO"])


# -- class 8: JSON too deep, config.json of the wrong types, bad PEFT patterns ------------------------------
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json"])
def test_deeply_nested_json_is_refused(tmp_path, capfd, tiny_family, file):
    model = tmp_path / "in" / "model"
    shutil.copytree(tiny_family / "base", model)
    (model / file).write_text('{"weight_map": ' + DEEP + "}" if file.endswith("index.json") else DEEP)
    convert_refused(capfd, model, tmp_path / "out", [file, "nested too deeply"])


def test_deeply_nested_safetensors_header_is_refused(tmp_path, capfd):
    model = tmp_path / "in" / "model"
    model.mkdir(parents=True)
    header = DEEP.encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    convert_refused(capfd, model, tmp_path / "out", ["model.safetensors", "nested too deeply"])


@pytest.mark.parametrize("config", [{"architectures": 5}, {"architectures": {"a": 1}, "model_type": None},
                                    {"model_type": ["llama"]}])
def test_config_json_with_wrong_types_still_converts(tmp_path, capfd, tiny_family, config):
    # A config.json of the wrong types tells us nothing: generic names, not a traceback.
    from drm_jax.cli.main import main

    model = tmp_path / "model"
    shutil.copytree(tiny_family / "base", model)
    (model / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(model), str(tmp_path / "out"), "--to", "flax"]) == 0
    assert "Traceback" not in capfd.readouterr().err


def _adapter(root: Path, config_updates: dict) -> Path:
    from safetensors.numpy import save_file

    adapter = root / "adapter"
    adapter.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((2, 16), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((16, 2), np.float32)},
              str(adapter / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **config_updates}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


@pytest.mark.parametrize("field, value, needle", [
    ("rank_pattern", ["q_proj", 4], "rank_pattern"),
    ("rank_pattern", {"q_proj": "four"}, "rank_pattern['q_proj']"),
    ("alpha_pattern", {"q_proj": 0}, "alpha_pattern['q_proj']"),
    ("alpha_pattern", {"(q_proj": 8}, "not a valid pattern"),
    ("r", True, "r must be"),
])
def test_malformed_peft_patterns_are_refused(tmp_path, capfd, tiny_family, field, value, needle):
    adapter = _adapter(tmp_path / "in", {field: value})
    out = tmp_path / "out"
    refused(capfd, ["convert", adapter, out, "--to", "hf", "--base", tiny_family / "base"], out,
            [tmp_path / "in", tiny_family], ["adapter_config.json", needle])
