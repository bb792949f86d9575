"""Hostile output paths and failing disks (issue 15, classes 2, 8 and 9, and the umask).

An output that is, holds or sits inside any input (models, adapters, the config file; links followed) is
refused before anything is touched, even with --force. A full or read-only disk gives one line and leaves
no temporary directory. A relative Orbax destination works. Output directories follow the umask.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from .conftest import leftovers, refused, write_merge_config


# -- class 2: convert --force and merge --force never touch an input ----------------------------------------
@pytest.mark.parametrize("case", ["dst is the parent of src", "dst is the folder of a src file", "dst inside src",
                                  "dst is a link to src", "dst is the src itself"])
def test_convert_never_overwrites_its_source(tmp_path, capfd, tiny_family, case):
    model = tmp_path / "in" / "model"
    shutil.copytree(tiny_family / "base", model)
    src, dst = model, tmp_path / "in"
    if case == "dst is the folder of a src file":
        src, dst = model / "model.safetensors", model
    elif case == "dst inside src":
        dst = model / "converted"
    elif case == "dst is a link to src":
        dst = tmp_path / "link"
        dst.symlink_to(model, target_is_directory=True)
    elif case == "dst is the src itself":
        dst = model
    existed = dst.exists() or dst.is_symlink()
    line = refused(capfd, ["convert", src, dst, "--to", "hf", "--force"], dst, [tmp_path / "in"],
                   ["overlaps", str(dst)], out_existed=existed)
    assert "destination" in line


def test_convert_never_overwrites_the_base_of_an_adapter(tmp_path, capfd, tiny_family):
    from .test_checkpoint_files import _adapter

    adapter = _adapter(tmp_path / "in", {})
    base = tmp_path / "in" / "base"
    shutil.copytree(tiny_family / "base", base)
    refused(capfd, ["convert", adapter, base, "--to", "hf", "--force", "--base", base], base, [tmp_path / "in"],
            ["overlaps", str(base)], out_existed=True)


@pytest.mark.parametrize("case", ["out is the config's folder", "out is a link to the config's folder",
                                  "config is a link into out", "out is the parent of a model"])
def test_merge_never_removes_an_input(tmp_path, capfd, family, case):
    configs = tmp_path / "configs"
    configs.mkdir()
    config = write_merge_config(configs, family / "base", family / "task_a", family / "task_b")
    out = configs
    if case == "out is a link to the config's folder":
        out = tmp_path / "link"
        out.symlink_to(configs, target_is_directory=True)
    elif case == "config is a link into out":
        out = tmp_path / "elsewhere"
        out.mkdir()
        (out / "real.yaml").write_text(config.read_text())
        config.unlink()
        config.symlink_to(out / "real.yaml")
    elif case == "out is the parent of a model":
        out = family
    refused(capfd, ["merge", config, out, "--force", "--quiet"], out, [family, configs],
            ["overlaps", str(out)], out_existed=True)


# -- class 8: a full or read-only disk -----------------------------------------------------------------------
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _safetensor_error(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")


@pytest.mark.parametrize("failure", [_no_space, _safetensor_error], ids=["OSError", "SafetensorError"])
@pytest.mark.parametrize("command", ["merge", "convert"])
def test_disk_full_while_writing_safetensors(tmp_path, capfd, family, monkeypatch, failure, command):
    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", failure)
    out = tmp_path / "out"
    if command == "merge":
        config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
        argv, inputs = ["merge", config, out, "--quiet"], [family, config]
    else:
        argv, inputs = ["convert", family / "base", out, "--to", "hf"], [family]
    line = refused(capfd, argv, out, inputs, ["No space left on device"])
    assert out.name in line


@pytest.mark.parametrize("to", ["flax", "config files"])
def test_disk_full_in_convert_other_writes(tmp_path, capfd, family, monkeypatch, to):
    if to == "flax":
        monkeypatch.setattr(Path, "write_bytes", _no_space)
        argv = ["convert", family / "base", tmp_path / "out", "--to", "flax"]
    else:  # the config files copied beside the weights
        monkeypatch.setattr(shutil, "copy2", _no_space)
        argv = ["convert", family / "base", tmp_path / "out", "--to", "hf"]
    refused(capfd, argv, tmp_path / "out", [family], ["No space left on device"])


@pytest.mark.parametrize("command", ["merge", "convert"])
def test_read_only_destination(tmp_path, capfd, family, monkeypatch, command):
    import tempfile

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    out = tmp_path / "ro" / "out"
    if command == "merge":
        config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
        argv, inputs = ["merge", config, out, "--quiet"], [family, config]
    else:
        argv, inputs = ["convert", family / "base", out, "--to", "flax"], [family]
    refused(capfd, argv, out, inputs, ["Read-only file system", str(out.parent)])
    assert not out.parent.exists()  # the parent it created is gone again


# -- class 9: convert --to orbax with a relative destination ----------------------------------------------
def test_relative_orbax_destination_is_written(tmp_path, capfd, family, monkeypatch):
    from drm_jax.cli.main import main
    from drm_jax.io import open_checkpoint

    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(family / "base"), "rel/orbax_out", "--to", "orbax"]) == 0
    assert "Traceback" not in capfd.readouterr().err
    with open_checkpoint(tmp_path / "rel" / "orbax_out") as orbax, open_checkpoint(family / "base") as hf:
        assert len(orbax.keys()) == len(hf.keys())
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == ["orbax_out"]
    assert not any(".orbax-item" in p.name for p in (tmp_path / "rel" / "orbax_out").iterdir())


def test_failing_relative_orbax_write_leaves_nothing(tmp_path, capfd, family, monkeypatch):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(family / "base" / "model.safetensors"))
    tensors["model.empty.weight"] = np.zeros((0, 4), np.float32)  # Orbax refuses zero-size arrays
    save_file(tensors, str(family / "base" / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.chdir(tmp_path)
    refused(capfd, ["convert", family / "base", "rel_out", "--to", "orbax"], tmp_path / "rel_out", [family],
            ["Orbax"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


# -- output directories follow the umask ---------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_directory_mode_follows_the_umask(tmp_path, capfd, family, umask):
    from drm_jax.cli.main import main

    previous = os.umask(umask)
    try:
        assert main(["convert", str(family / "base"), str(tmp_path / "out"), "--to", "flax"]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert leftovers(tmp_path / "out") == []
