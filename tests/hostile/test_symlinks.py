"""No file from outside the inputs reaches an output (issue 23, class 2): a side file (tokenizer.json copied
as is, chat_template.jinja, config.json, generation_config.json) that is a symbolic link out of its model
directory is refused in one line naming it, and the secret it points at appears nowhere. A Hugging Face
cache snapshot, whose files are links into the repository's blobs/, still merges."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from drm_jax.errors import UnsafeFileError
from drm_jax.io.model_files import safe_model_file

from .conftest import refused, write_merge_config
from .test_remote_code import add_tokenizer

SECRET = "HF_TOKEN=hf_secret_that_must_never_leak"


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "elsewhere" / "secret.txt"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


def _link(path: Path, target: Path) -> None:
    path.unlink(missing_ok=True)
    os.symlink(target, path)


# (model, file made a link to the secret, extra config lines, the command)
CASES = {
    "tokenizer.json copied as is": ("base", "tokenizer.json", "", "merge"),
    "chat_template.jinja, chat_template auto": ("task_b", "chat_template.jinja", "chat_template: auto\n", "merge"),
    "chat_template.jinja of the reference": ("base", "chat_template.jinja", "chat_template: chatml\n", "merge"),
    "tokenizer.json, tokenizer_source union": ("task_a", "tokenizer.json", "tokenizer_source: union\n", "merge"),
    "generation_config.json": ("base", "generation_config.json", "", "merge"),
    "config.json": ("base", "config.json", "", "merge"),
    "tokenizer.json in convert": ("base", "tokenizer.json", "", "convert"),
    "generation_config.json in convert": ("base", "generation_config.json", "", "convert"),
}


@pytest.mark.parametrize("case", CASES)
def test_link_out_of_the_model_directory_is_refused(tmp_path, capfd, family, secret, case):
    model, name, extra, command = CASES[case]
    for directory in ("base", "task_a", "task_b"):
        add_tokenizer(family / directory)
    _link(family / model / name, secret)
    out = tmp_path / "out"
    if command == "merge":
        config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b", extra=extra)
        argv, inputs = ["merge", config, out, "--quiet"], [family, config, secret]
    else:
        argv, inputs = ["convert", family / model, out, "--to", "hf"], [family, secret]
    line = refused(capfd, argv, out, inputs, [family / model / name, "outside the model directory"])
    assert SECRET not in line


def test_link_inside_the_model_directory_is_followed(tmp_path, capfd, family):
    """A link to another file of the same model directory is that directory's own file."""
    from drm_jax.cli.main import main

    add_tokenizer(family / "base")
    (family / "base" / "tokenizer.json").rename(family / "base" / "real-tokenizer.json")
    _link(family / "base" / "tokenizer.json", Path("real-tokenizer.json"))
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0, capfd.readouterr().err
    copied = tmp_path / "out" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_bytes() == (family / "base" / "real-tokenizer.json").read_bytes()


def _hf_cache_snapshot(root: Path, model: Path, repo: str = "models--org--tiny") -> Path:
    """`model` laid out as the Hugging Face cache does: snapshots/<rev>/<file> -> ../../blobs/<name>."""
    snapshot = root / repo / "snapshots" / "0123abc"
    blobs = root / repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, entry in enumerate(sorted(model.iterdir())):
        (blobs / f"blob{i}").write_bytes(entry.read_bytes())
        os.symlink(Path("..") / ".." / "blobs" / f"blob{i}", snapshot / entry.name)
    return snapshot


@pytest.mark.parametrize("chat_template", ["", "chat_template: auto\n"])
def test_hugging_face_cache_snapshot_merges(tmp_path, capfd, family, chat_template):
    from drm_jax.cli.main import main

    for directory in ("base", "task_a", "task_b"):
        add_tokenizer(family / directory)
    cache = tmp_path / "hub"
    base = _hf_cache_snapshot(cache, family / "base")
    config = write_merge_config(tmp_path, base, family / "task_a", family / "task_b", extra=chat_template)
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0, capfd.readouterr().err
    out = tmp_path / "out"
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]  # re-saved with a chat template
    assert vocab == json.loads((family / "base" / "tokenizer.json").read_text())["model"]["vocab"]
    assert (out / "generation_config.json").read_bytes() == (family / "base" / "generation_config.json").read_bytes()


def test_snapshot_link_into_another_repository_is_refused(tmp_path, capfd, family, secret):
    """Only the snapshot's own repository's blobs/ are explained by the cache layout."""
    add_tokenizer(family / "base")
    cache = tmp_path / "hub"
    base = _hf_cache_snapshot(cache, family / "base")
    other = cache / "models--someone--else" / "blobs"
    other.mkdir(parents=True)
    (other / "stolen").write_text(SECRET)
    _link(base / "tokenizer.json", other / "stolen")
    config = write_merge_config(tmp_path, base, family / "task_a", family / "task_b")
    out = tmp_path / "out"
    refused(capfd, ["merge", config, out, "--quiet"], out, [family, cache, config], [base / "tokenizer.json"])


def test_safe_model_file_rules(tmp_path, secret):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert safe_model_file(model, "config.json") == (model / "config.json").resolve()
    assert safe_model_file(model, "tokenizer.json") is None  # absent: nothing to copy
    _link(model / "tokenizer.json", secret)
    with pytest.raises(UnsafeFileError, match="outside the model directory"):
        safe_model_file(model, "tokenizer.json")
    _link(model / "tokenizer.json", model / "missing.json")
    with pytest.raises(UnsafeFileError, match="broken or looping"):
        safe_model_file(model, "tokenizer.json")
    _link(model / "tokenizer.json", model / "sub")
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        safe_model_file(model, "tokenizer.json")
    os.mkfifo(model / "vocab.txt")
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        safe_model_file(model, "vocab.txt")
    _link(model / "sub" / "escape", Path("..") / ".." / "elsewhere" / "secret.txt")
    with pytest.raises(UnsafeFileError, match="outside the model directory"):
        safe_model_file(model, "sub/escape")
