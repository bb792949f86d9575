"""Classes 5, 6, 7 of issue 15: what the tensors say, not just their names and shapes.

5. A tensor relabelled to a dtype of another kind (same byte size) is refused, naming tensor and model.
6. A reference model with zero tensors is refused (it would give an empty output).
7. A merge whose result overflows (finite inputs, a huge weight, a cast to a narrower dtype) is refused,
   naming the merged tensor, before anything is written.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from .conftest import refused, write_merge_config

NAME = "model.layers.0.mlp.down_proj.weight"


def relabel(model_dir: Path, tensor: str, dtype: str) -> None:
    """Rewrite the safetensors header so `tensor` claims `dtype` (same byte size; data untouched)."""
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header[tensor]["dtype"] = dtype
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])


def set_tensor(model_dir: Path, tensor: str, value: float, dtype=np.float32) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors[tensor] = np.full(tensors[tensor].shape, value, dtype)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("who, dtype", [("task_b", "I32"), ("task_a", "U32"), ("base", "I32")])
def test_dtype_of_another_kind_is_refused(family, tmp_path, capfd, who, dtype):
    relabel(family / who, NAME, dtype)
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
    out = tmp_path / "out"
    line = refused(capfd, ["merge", config, out, "--quiet"], out, [family, config], [NAME, "dtype"])
    if who != "base":
        assert who in line


def test_float16_relabelled_int16_is_refused(family, tmp_path, capfd):
    set_tensor(family / "task_a", NAME, 0.25, np.float16)
    relabel(family / "task_a", NAME, "I16")
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
    out = tmp_path / "out"
    refused(capfd, ["merge", config, out, "--quiet"], out, [family, config], [NAME, "int16", "task_a"])


def _empty_safetensors(directory: Path) -> None:
    from safetensors.numpy import save_file

    for f in directory.glob("*.safetensors"):
        f.unlink()
    save_file({}, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _empty_flax(directory: Path) -> None:
    import msgpack

    for f in directory.glob("*.safetensors"):
        f.unlink()
    (directory / "flax_model.msgpack").write_bytes(msgpack.packb({}))


@pytest.mark.parametrize("make_empty", [_empty_safetensors, _empty_flax], ids=["safetensors", "flax"])
def test_reference_without_tensors_is_refused(family, tmp_path, capfd, make_empty):
    make_empty(family / "base")
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
    out = tmp_path / "out"
    refused(capfd, ["merge", config, out, "--quiet"], out, [family, config], ["base"])


def test_overflowing_merge_is_refused(family, tmp_path, capfd):
    # Finite inputs: base 0, both models 3e38; the sum of their deltas does not fit float32.
    set_tensor(family / "base", NAME, 0.0)
    for task in ("task_a", "task_b"):
        set_tensor(family / task, NAME, 3e38)
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b", "1.0", "1.0")
    out = tmp_path / "out"
    refused(capfd, ["merge", config, out, "--quiet"], out, [family, config], [NAME, "Inf"])


def test_huge_weight_is_refused(family, tmp_path, capfd):
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b", "1e39", "0.5")
    out = tmp_path / "out"
    line = refused(capfd, ["merge", config, out, "--quiet"], out, [family, config], [])
    assert NAME in line or "weight" in line, line


def test_cast_to_narrower_dtype_that_overflows_is_refused(family, tmp_path, capfd):
    for model in ("base", "task_a", "task_b"):
        set_tensor(family / model, NAME, 1e6)  # fits float32, not float16
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b",
                                extra="dtype: float16\n")
    out = tmp_path / "out"
    refused(capfd, ["merge", config, out, "--quiet"], out, [family, config], [NAME, "float16"])


def _add_empty_tensor(directory: Path, name: str, shape) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    tensors[name] = np.zeros(shape, np.float32)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("method, shape", [("drm", (0, 16)), ("knots_ties", (16, 0)), ("ties", (0,))])
def test_zero_size_tensor_is_refused(family, tmp_path, capfd, method, shape):
    # Issue 15, class 8: a zero-size tensor gave a traceback from the method's reductions.
    empty = "model.layers.0.mlp.extra.weight"
    for model in ("base", "task_a", "task_b"):
        _add_empty_tensor(family / model, empty, shape)
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b",
                                "0.5, density: 0.5", "0.5, density: 0.5")
    config.write_text(config.read_text().replace("task_arithmetic", method).replace("parameters: {lambda: 1.0}\n", ""))
    out = tmp_path / "out"
    refused(capfd, ["merge", config, out, "--quiet"], out, [family, config], [empty, "no elements"])
