"""`drm-jax merge` with the inputs and options the other command-line tests do not reach: models in T5X,
Orbax, Flax and torch `.bin` form, mergekit's `model+adapter` references, `tokenizer_source: <model>`,
`out_dtype`, `--devices` beyond the devices present, and an interrupt (exit 130, nothing left behind).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from drm_jax.cli.main import main
from drm_jax.io import writer as writer_module


def _config(path: Path, base: Path, a: str | Path, b: str | Path, extra: str = "") -> Path:
    path.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                    f"  - model: {a}\n    parameters: {{weight: 0.7}}\n"
                    f"  - model: {b}\n    parameters: {{weight: 0.3}}\n{extra}")
    return path


def _merge(tmp_path: Path, label: str, base: Path, a, b, extra: str = "", *flags: str) -> Path:
    out = tmp_path / label
    assert main(["merge", str(_config(tmp_path / f"{label}.yaml", base, a, b, extra)), str(out), "--quiet",
                 *flags]) == 0
    return out


def _torch_bin_copy(model_dir: Path, target: Path) -> Path:
    """The same weights as a torch pytorch_model.bin (config and tokenizer kept)."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(str(model_dir / "model.safetensors")), target / "pytorch_model.bin")
    return target


@pytest.mark.parametrize("family, source_format", [("t5_family", "t5x"), ("llama_family", "orbax"),
                                                   ("llama_family", "flax"), ("llama_family", "torch_bin")])
def test_other_input_formats_merge_like_their_hugging_face_originals(family, source_format, request, tmp_path,
                                                                       read_output, capsys):
    models = request.getfixturevalue(family) / "models"
    converted = tmp_path / f"task_a_{source_format}"
    if source_format == "torch_bin":
        _torch_bin_copy(models / "task_a", converted)
    else:
        assert main(["convert", str(models / "task_a"), str(converted), "--to", source_format]) == 0
        assert not list(converted.glob("*.safetensors"))  # really another format
    capsys.readouterr()
    hf = read_output(_merge(tmp_path, "hf", models / "base", models / "task_a", models / "task_b"))
    other = read_output(_merge(tmp_path, "other", models / "base", converted, models / "task_b"))
    assert set(other) == set(hf)
    for name in hf:
        np.testing.assert_array_equal(other[name], hf[name], err_msg=name)


def test_model_plus_adapter_reference(llama_family, lora_adapter, tmp_path, read_output):
    """`base+adapter` (mergekit's form) is the adapter merged into that model: here, as a task model."""
    models = llama_family / "models"
    lora_delta = lora_adapter(models / "task_a", tmp_path / "adapter", ["v_proj"], r=2, alpha=4, seed=5)
    got = read_output(_merge(tmp_path, "out", models / "base", f"{models / 'task_a'}+{tmp_path / 'adapter'}",
                             models / "task_b"))
    plain = read_output(_merge(tmp_path, "plain", models / "base", models / "task_a", models / "task_b"))
    name = "model.layers.0.self_attn.v_proj.weight"
    # task_a's delta gains scaling * B @ A, weighted 0.7
    np.testing.assert_allclose(got[name], plain[name] + 0.7 * lora_delta("model.layers.0.self_attn.v_proj"),
                               rtol=1e-5, atol=1e-6)
    untouched = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(got[untouched], plain[untouched])


def test_tokenizer_source_names_a_model(llama_family, tmp_path):
    models = llama_family / "models"
    out = _merge(tmp_path, "out", models / "base", models / "task_a", models / "task_b",
                 f"tokenizer_source: {models / 'task_b'}\n")
    # the stub tokenizer files record the directory they were written for
    assert json.loads((out / "tokenizer_config.json").read_text())["source"] == "task_b"
    default = _merge(tmp_path, "default", models / "base", models / "task_a", models / "task_b")
    assert json.loads((default / "tokenizer_config.json").read_text())["source"] == "base"


def test_out_dtype_sets_the_written_dtype(llama_family, tmp_path, read_output):
    from safetensors import safe_open

    models = llama_family / "models"
    out = _merge(tmp_path, "out", models / "base", models / "task_a", models / "task_b",
                 "dtype: float32\nout_dtype: float16\n")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    full = read_output(_merge(tmp_path, "f32", models / "base", models / "task_a", models / "task_b",
                              "dtype: float32\n"))
    half = read_output(out)
    for name, value in full.items():  # the float32 merge, rounded once to float16
        np.testing.assert_array_equal(half[name], value.astype(np.float16).astype(np.float32), err_msg=name)


def test_more_devices_than_present_is_one_line(llama_family, tmp_path, capsys):
    import jax

    present = len(jax.devices("cpu"))
    models = llama_family / "models"
    config = _config(tmp_path / "c.yaml", models / "base", models / "task_a", models / "task_b")
    assert main(["merge", str(config), str(tmp_path / "out"), "--device", "cpu", "--devices", str(present + 1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--devices {present + 1}" in err and f"only {present}" in err, err
    assert not (tmp_path / "out").exists()


def test_interrupt_exits_130_and_leaves_nothing(llama_family, tmp_path, monkeypatch, capsys):
    models = llama_family / "models"
    config = _config(tmp_path / "c.yaml", models / "base", models / "task_a", models / "task_b")
    original = writer_module.CheckpointWriter.add
    added = []

    def add(self, name, array):  # Ctrl-C arrives while the output is being written
        original(self, name, array)
        added.append(name)
        if len(added) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(writer_module.CheckpointWriter, "add", add)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    assert main(["merge", str(config), str(out_parent / "merged"), "--quiet", "--max-shard-size", "4KB"]) == 130
    assert len(added) == 3
    assert "interrupted" in capsys.readouterr().err
    assert list(out_parent.iterdir()) == []  # neither the output nor a temporary directory


def test_convert_arch_overrides_the_detected_architecture(llama_family, tmp_path, capsys):
    """Without config.json nothing says the weights are Llama's: --arch llama gives the same Flax file
    as the conversion that detects it, and the generic table gives another."""
    source = llama_family / "models" / "task_a"
    bare = tmp_path / "bare"
    shutil.copytree(source, bare, ignore=shutil.ignore_patterns("config.json"))
    for label, src, extra in (("detected", source, []), ("arch", bare, ["--arch", "llama"]), ("generic", bare, [])):
        assert main(["convert", str(src), str(tmp_path / label), "--to", "flax", *extra]) == 0
    capsys.readouterr()
    read = lambda label: (tmp_path / label / "flax_model.msgpack").read_bytes()  # noqa: E731
    assert read("arch") == read("detected")
    assert read("generic") != read("detected")
