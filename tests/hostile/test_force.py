"""Outputs and --force (issue 23, class 7): --force replaces only an empty directory or an earlier drm-jax
output, never an unrelated directory; a dangling-link OUT_DIR is refused before anything is merged, naming
--force; the model card shows model paths and config comments as text (no raw HTML, no way out of the
configuration's code block)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from drm_jax.errors import CheckpointError

from .conftest import refused, tree_digest, write_merge_config

# What an unrelated directory at OUT_DIR may hold: each is refused with --force, left byte-identical.
UNRELATED = {
    "a user's file": {"notes.txt": "my thesis"},
    "a git repository": {".git/HEAD": "ref: refs/heads/main", "model.safetensors": "not ours"},
    "config files, no weights": {"config.json": "{}", "README.md": "my project"},
    "weights and a user's file": {"model.safetensors": "x", "train.py": "print()"},
    "a user's folder": {"model.safetensors": "x", "data/part-0": "rows"},
    "a downloaded model": {"model.safetensors": "x", "config.json": "{}", "README.md": "---\nlicense: mit\n---\n"},
}


def _fill(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


@pytest.mark.parametrize("case", UNRELATED)
def test_force_never_replaces_an_unrelated_directory(tmp_path, capfd, family, case):
    out = tmp_path / "out"
    out.mkdir()
    _fill(out, UNRELATED[case])
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
    stranger = sorted(p.name for p in out.iterdir() if p.name not in ("model.safetensors", "config.json"))[0]
    refused(capfd, ["merge", config, out, "--force", "--quiet"], out, [family, config], [out, stranger, "--force"],
            out_existed=True)


@pytest.mark.parametrize("to", ["hf", "flax"])
def test_convert_force_never_replaces_an_unrelated_directory(tmp_path, capfd, family, to):
    out = tmp_path / "out"
    out.mkdir()
    _fill(out, {"notes.txt": "mine"})
    refused(capfd, ["convert", family / "base", out, "--to", to, "--force"], out, [family],
            ["notes.txt", "--force"], out_existed=True)


@pytest.mark.parametrize("command", ["merge", "convert"])
def test_force_never_replaces_a_file(tmp_path, capfd, family, command):
    out = tmp_path / "out"
    out.write_text("a user's file named like the output")
    if command == "merge":
        config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
        argv, inputs = ["merge", config, out, "--force", "--quiet"], [family, config]
    else:
        argv, inputs = ["convert", family / "base", out, "--to", "hf", "--force"], [family]
    refused(capfd, argv, out, inputs, [out, "not a directory"], out_existed=True)


@pytest.mark.parametrize("flags", [[], ["--no-write-model-card", "--no-copy-tokenizer"]])
def test_force_replaces_an_earlier_output(tmp_path, capfd, family, flags):
    from drm_jax.cli.main import main

    out = tmp_path / "out"
    first = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
    assert main(["merge", str(first), str(out), "--quiet", "--max-shard-size", "4KB", *flags]) == 0
    before = tree_digest([out])
    second = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b", wa="0.2")
    assert main(["merge", str(second), str(out), "--quiet", "--force"]) == 0, capfd.readouterr().err
    after = tree_digest([out])
    assert after != before and not any("-of-" in Path(name).name for name in after)  # the old shards are gone


@pytest.mark.parametrize("command", ["merge", "convert"])
def test_dangling_link_output_is_refused_before_merging(tmp_path, capfd, family, monkeypatch, command):
    import drm_jax.config.merge

    def no_merge(*args, **kwargs):
        raise AssertionError("merged before refusing the output")

    monkeypatch.setattr(drm_jax.config.merge, "open_views", no_merge)
    out = tmp_path / "out"
    os.symlink(tmp_path / "nowhere", out)
    if command == "merge":
        config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
        argv, inputs = ["merge", config, out, "--quiet"], [family, config]
    else:
        argv, inputs = ["convert", family / "base", out, "--to", "hf"], [family]
    line = refused(capfd, argv, out, inputs, [out, "nowhere", "--force"], out_existed=True)
    assert "overwrite=True" not in line
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()


def test_dangling_link_output_is_replaced_with_force(tmp_path, capfd, family):
    from drm_jax.cli.main import main

    out = tmp_path / "out"
    os.symlink(tmp_path / "nowhere", out)
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b")
    assert main(["merge", str(config), str(out), "--quiet", "--force"]) == 0, capfd.readouterr().err
    assert not out.is_symlink() and (out / "model.safetensors").is_file()


def test_api_overwrite_refuses_an_unrelated_directory(tmp_path):
    from drm_jax.io import write_checkpoint

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"notes\.txt.*overwrite=True"):
        write_checkpoint({"a": np.ones(2, np.float32)}, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    write_checkpoint({"a": np.ones(2, np.float32)}, out, "orbax")
    write_checkpoint({"a": np.zeros(2, np.float32)}, out, "flax", overwrite=True)  # an earlier output
    assert sorted(p.name for p in out.iterdir()) == ["flax_model.msgpack"]


HOSTILE_COMMENT = "# ``` closes the block?\n# <script>alert('comment')</script>\n"


def test_model_card_escapes_paths_and_comments(tmp_path, capfd, family):
    from drm_jax.cli.main import main

    odd = family / "m<img src=x onerror=alert(1)>[link](evil)"
    shutil.copytree(family / "task_a", odd)
    config = write_merge_config(tmp_path, family / "base", odd, family / "task_b", extra=HOSTILE_COMMENT)
    out = tmp_path / "out"
    assert main(["merge", str(config), str(out), "--quiet"]) == 0, capfd.readouterr().err
    readme = (out / "README.md").read_text()
    body = readme.split("### Configuration", 1)
    assert "<img" not in body[0] and "[link](evil)" not in body[0]
    assert "&lt;img src=x onerror=alert(1)&gt;\\[link\\](evil)" in body[0]
    fence = re.search(r"^(`{3,})yaml$", body[1], re.MULTILINE).group(1)
    assert len(fence) > 3 and readme.rstrip().endswith("\n" + fence)
    block = body[1].split(fence + "yaml\n", 1)[1].rsplit("\n" + fence, 1)[0]
    assert block == config.read_text().rstrip()  # the comment is inside, whole, as given
    assert (out / "mergekit_config.yml").read_text() == config.read_text()


def test_model_card_path_with_a_newline_stays_one_line(tmp_path, capfd, family):
    from drm_jax.config.card import generate_card
    from drm_jax.config.schema import load_config

    odd = family / "task\n# Injected heading"
    shutil.copytree(family / "task_a", odd)
    config = write_merge_config(tmp_path, family / "base", json.dumps(str(odd)), family / "task_b")
    card = generate_card(load_config(config), "out")
    assert "\n# Injected heading" not in card.split("### Configuration")[0]
    assert "task\\\\n# Injected heading" in card
