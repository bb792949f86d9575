"""`drm-jax merge CONFIG OUT --dry-run` (`merge_config(..., dry_run=True)`): every mistake it can see without
tensor data is one line and exit 2, in seconds, with the readers instrumented so that reading any tensor's
data fails the test; every example config it accepts then merges; the plan it prints and returns."""

from __future__ import annotations

import shutil
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

import drm_jax
from drm_jax.cli.main import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "configs"
SECONDS = 5.0  # the bound for a dry run on the test checkpoints

TIES = """merge_method: {method}
base_model: {models}/base
models:
  - model: {models}/task_a
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.5}}
{extra}"""

SLICES = """merge_method: passthrough
slices:
  - sources:
      - model: {models}/task_a
        layer_range: [0, 1]
  - sources:
      - model: {models}/task_b
        layer_range: [1, {stop}]
"""


def _model_copy(llama_family: Path, tmp_path: Path, edit=None, tokenizer: bool = True) -> Path:
    """A copy of task_b whose tensors went through `edit(tensors) -> tensors`, without its tokenizer files
    if `tokenizer` is False."""
    from safetensors.numpy import load_file, save_file

    target = tmp_path / "task_b_copy"
    shutil.copytree(llama_family / "models" / "task_b", target)
    if edit is not None:
        path = target / "model.safetensors"
        save_file(edit(load_file(str(path))), str(path), metadata={"format": "pt"})
    if not tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (target / name).unlink(missing_ok=True)
    return target


def _edited(name: str, shape: tuple[int, ...]):
    def edit(tensors):
        return {**tensors, name: np.zeros(shape, tensors[name].dtype)}
    return edit


def _larger_vocabulary(tensors):
    return {**tensors, **{n: np.zeros((72,) + tensors[n].shape[1:], tensors[n].dtype)
                          for n in ("model.embed_tokens.weight", "lm_head.weight")}}


def _dry_run(config: Path, out: Path, monkeypatch, capsys, tensor_reads_refused) -> tuple[int, str, float]:
    with tensor_reads_refused(monkeypatch):
        start = time.perf_counter()
        code = main(["merge", str(config), str(out), "--dry-run"])
        seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    return code, captured.out + captured.err, seconds


# case: (the config's text, how task_b is made, what the one line must say)
CASES = {
    "method typo": (TIES.replace("{method}", "tie"), None, "merge_method: unknown method 'tie'"),
    "layer range past the end": (SLICES.replace("{stop}", "5"), None, "layer_range"),
    "mismatched shape in one model": (
        TIES.replace("{method}", "ties"), lambda fam, tmp: _model_copy(
            fam, tmp, _edited("model.layers.1.mlp.down_proj.weight", (32, 16))),
        "tensor 'model.layers.1.mlp.down_proj.weight' has shape (32, 16) in models[1]"),
    "vocabulary size mismatch": (
        TIES.replace("{method}", "ties"), lambda fam, tmp: _model_copy(fam, tmp, _larger_vocabulary),
        "has shape (72, 32) in models[1]"),
    "tokenizer_source without a tokenizer": (
        TIES.replace("{method}", "ties").replace("{extra}", "tokenizer_source: {b}\n"),
        lambda fam, tmp: _model_copy(fam, tmp, tokenizer=False), "task_b_copy"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_mistake_is_one_line_without_reading_tensors(case, llama_family, tmp_path, monkeypatch, capsys,
                                                      tensor_reads_refused):
    text, make_b, needle = CASES[case]
    models = llama_family / "models"
    b = make_b(llama_family, tmp_path) if make_b is not None else models / "task_b"
    config = tmp_path / "config.yaml"
    config.write_text(text.format(models=models, b=b, extra="", stop=5))
    code, output, seconds = _dry_run(config, tmp_path / "out", monkeypatch, capsys, tensor_reads_refused)
    assert code == 2, output
    assert needle in output and output.count("\n") == 1 and "Traceback" not in output, output
    assert seconds < SECONDS
    assert not (tmp_path / "out").exists()


def test_too_little_disk_is_one_line(llama_family, tmp_path, monkeypatch, capsys, tensor_reads_refused):
    models = llama_family / "models"
    config = tmp_path / "config.yaml"
    config.write_text(TIES.format(method="ties", models=models, b=models / "task_b", extra=""))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**6, 10**6 - 1000, 1000))
    code, output, seconds = _dry_run(config, tmp_path / "out", monkeypatch, capsys, tensor_reads_refused)
    assert code == 2 and output.count("\n") == 1, output
    assert "needs about" in output and "only 1.0 kB is free" in output, output
    assert seconds < SECONDS
    # the merge itself refuses it the same way, before writing anything
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    assert "only 1.0 kB is free" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_plan_counts_the_merge(llama_family, tmp_path, monkeypatch, tensor_reads_refused):
    """The plan's numbers are the merge's: tensors per role equal the merge's counts, the output's size
    is the tensor bytes the merge writes."""
    models = llama_family / "models"
    config = tmp_path / "config.yaml"
    config.write_text(TIES.format(method="ties", models=models, b=models / "task_b", extra="dtype: float32\n"))
    with tensor_reads_refused(monkeypatch):
        plan = drm_jax.merge_config(config, tmp_path / "out", dry_run=True)["plan"]
    assert not (tmp_path / "out").exists()
    result = drm_jax.merge_config(config, tmp_path / "out")
    assert plan["roles"] == result["counts"]
    from safetensors.numpy import load_file
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert plan["output_bytes"] == sum(a.nbytes for a in written.values())
    assert plan["groups"] >= 1 and plan["programs"] >= 1 and plan["peak_memory_bytes"] >= plan["output_bytes"]


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_are_accepted_in_seconds(example, llama_family, tmp_path, monkeypatch, capsys,
                                          tensor_reads_refused):
    """(tests/cli/test_merge_command.py's `llama_outputs` then merges each example the dry run accepted.)"""
    monkeypatch.chdir(llama_family)  # the examples name models/base, models/task_a, models/task_b
    code, output, seconds = _dry_run(EXAMPLES / example, tmp_path / "out", monkeypatch, capsys,
                                     tensor_reads_refused)
    assert code == 0, output
    assert "dry run: no problem found" in output and "tensors:" in output and seconds < SECONDS
    assert not (tmp_path / "out").exists()
