"""`drm-jax merge` writes its output atomically: into a temporary directory renamed into place at the end.

A merge that fails part-way with --force over an existing output leaves that output byte-identical, and
while a --force merge is writing, the output directory only ever holds the old, complete checkpoint.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from drm_jax.cli.main import main
from drm_jax.io import writer as writer_module

CONFIG = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
"""
# small shards, so that shard files are written to disk long before the last tensor is merged
SHARDS = ("--max-shard-size", "4KB", "--quiet", "--force")


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _config(tmp_path: Path, models: Path, task_b: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.format(base=models / "base", a=models / "task_a", b=task_b))
    return path


@pytest.fixture
def existing_output(llama_family, tmp_path):
    """A finished merge in tmp_path/outputs/merged (plus a stale shard of an earlier one), and its digest."""
    out = tmp_path / "outputs" / "merged"
    models = llama_family / "models"
    assert main(["merge", str(_config(tmp_path, models, models / "task_b")), str(out), *SHARDS]) == 0
    (out / "model-00099-of-00099.safetensors").write_text("a stale shard")
    return out, _digest(out)


def _spy_on_adds(monkeypatch, check):
    """Call check() after every tensor the writer receives; returns the list of names added."""
    added = []
    original = writer_module.CheckpointWriter.add

    def add(self, name, array):
        original(self, name, array)
        added.append(name)
        check()

    monkeypatch.setattr(writer_module.CheckpointWriter, "add", add)
    return added


def test_failed_force_merge_leaves_the_old_output_byte_identical(existing_output, llama_family, tmp_path,
                                                                 monkeypatch, capsys):
    out, before = existing_output
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(llama_family / "models" / "task_b", broken)
    tensors = load_file(str(broken / "model.safetensors"))
    added = _spy_on_adds(monkeypatch, lambda: None)
    # find the tensor the merge writes last, then poison it: the error comes late in the merge
    models = llama_family / "models"
    assert main(["merge", str(_config(tmp_path, models, models / "task_b")), str(tmp_path / "probe"), *SHARDS]) == 0
    last = added[-1]
    added.clear()
    tensors[last] = np.full_like(tensors[last], np.nan)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()

    assert main(["merge", str(_config(tmp_path, models, broken)), str(out), *SHARDS]) == 2
    assert last in capsys.readouterr().err
    assert len(added) >= 5  # the failure came after tensors (and so shards) had been written
    assert _digest(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]  # no temporary directory left


def test_output_is_never_partial_while_a_force_merge_writes(existing_output, llama_family, tmp_path, monkeypatch):
    out, before = existing_output
    models = llama_family / "models"
    seen = []
    added = _spy_on_adds(monkeypatch, lambda: seen.append(_digest(out) == before))
    assert main(["merge", str(_config(tmp_path, models, models / "task_a")), str(out), *SHARDS]) == 0
    assert len(added) >= 10 and all(seen)  # at every tensor written, the old checkpoint was untouched
    after = _digest(out)
    assert "model-00099-of-00099.safetensors" not in after and after != before  # then replaced as a whole
    assert "model.safetensors.index.json" in after
