"""Multi-stage merges (mergekit-multi's format, `drm_jax.config.stages`): the same tensors as mergekit-multi,
stages run in dependency order whatever their order in the file, intermediates kept in --intermediate-dir or
removed, and the refusals (cycle, missing name, duplicate name) one line before any tensor is read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import drm_jax
from drm_jax.cli.main import main
from drm_jax.errors import ConfigError

# The final (unnamed) merge first, its inputs after it: the stages run in dependency order, not file order.
STAGES = """merge_method: linear
models:
  - model: mid
    parameters: {{weight: 0.6}}
  - model: {models}/task_b
    parameters: {{weight: 0.4}}
dtype: float32
---
name: mid
merge_method: ties
base_model: {models}/base
models:
  - model: first
    parameters: {{weight: 1.0, density: 0.7}}
  - model: {models}/task_a
    parameters: {{weight: 0.5, density: 0.7}}
dtype: float32
---
name: first
merge_method: task_arithmetic
base_model: {models}/base
models:
  - model: {models}/task_a
    parameters: {{weight: 0.7}}
  - model: {models}/task_b
    parameters: {{weight: 0.5}}
dtype: float32
"""

_MERGEKIT_MULTI = """
import sys
from mergekit.scripts.multimerge import main
main([sys.argv[1], "--out-path", sys.argv[2], "-I", sys.argv[3], "--no-lazy", "--quiet", "--no-lazy-unpickle",
      "--no-write-model-card", "--no-copy-tokenizer"], standalone_mode=False)
"""


def _write(tmp_path: Path, llama_family: Path, text: str = STAGES) -> Path:
    config = tmp_path / "stages.yaml"
    config.write_text(text.format(models=llama_family / "models"))
    return config


@pytest.fixture
def no_tensor_reads(monkeypatch, tensor_reads_refused):
    with tensor_reads_refused(monkeypatch):
        yield


def test_multi_stage_agrees_with_mergekit_multi(llama_family, tmp_path, read_output):
    pytest.importorskip("mergekit")
    config = _write(tmp_path, llama_family)
    theirs, their_stages = tmp_path / "mergekit_out", tmp_path / "mergekit_stages"
    proc = subprocess.run([sys.executable, "-c", _MERGEKIT_MULTI, str(config), str(theirs), str(their_stages)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, our_stages = tmp_path / "ours", tmp_path / "stages"
    assert main(["merge", str(config), str(ours), "--intermediate-dir", str(our_stages), "--quiet"]) == 0
    for mine, reference in ((ours, theirs), (our_stages / "mid", their_stages / "mid"),
                            (our_stages / "first", their_stages / "first")):
        a, b = read_output(mine), read_output(reference)
        assert sorted(a) == sorted(b)
        for name in b:
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5, err_msg=f"{mine.name}: {name}")
    # the final stage differs from its inputs (the comparison above compared merges, not copies)
    assert not np.allclose(read_output(ours)["model.layers.0.mlp.up_proj.weight"],
                           read_output(our_stages / "mid")["model.layers.0.mlp.up_proj.weight"])


def test_temporary_intermediates_are_removed(llama_family, tmp_path, read_output):
    config = _write(tmp_path, llama_family)
    out = tmp_path / "out" / "merged"
    result = drm_jax.merge_config(config, out)
    assert [s["name"] for s in result["stages"]] == ["first", "mid", None]  # dependency order
    assert result["output"] == out and read_output(out)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["merged"]  # no intermediate left


@pytest.mark.parametrize("text,needle", [
    ("name: a\nmerge_method: linear\nmodels: [{{model: b}}, {{model: {models}/task_a}}]\n---\n"
     "name: b\nmerge_method: linear\nmodels: [{{model: a}}, {{model: {models}/task_b}}]\n",
     "stages form a cycle: 'a' -> 'b' -> 'a'"),
    ("name: first\nmerge_method: linear\nmodels: [{{model: {models}/task_a}}, {{model: {models}/task_b}}]\n---\n"
     "merge_method: linear\nmodels: [{{model: frist}}, {{model: {models}/task_b}}]\n",
     "'frist' is neither the name of a stage (stages: 'first') nor an existing path"),
    ("name: a\nmerge_method: linear\nmodels: [{{model: {models}/task_a}}, {{model: {models}/task_b}}]\n---\n"
     "name: a\nmerge_method: linear\nmodels: [{{model: {models}/task_a}}, {{model: {models}/base}}]\n",
     "document 2: name: duplicate stage name 'a' (also document 1)"),
    ("merge_method: linear\nmodels: [{{model: {models}/task_a}}, {{model: {models}/task_b}}]\n---\n"
     "merge_method: linear\nmodels: [{{model: {models}/task_a}}, {{model: {models}/base}}]\n",
     "a second document without a name"),
    ("name: a\nmerge_method: linear\nmodels: [{{model: {models}/task_a}}, {{model: {models}/task_b}}]\n---\n"
     "name: c\nmerge_method: linera\nmodels: [{{model: a}}, {{model: {models}/base}}]\n",
     "stage 'c': merge_method: unknown method 'linera'"),
])
def test_refusals_are_one_line_before_any_tensor_is_read(text, needle, llama_family, tmp_path, capsys,
                                                        no_tensor_reads):
    config = _write(tmp_path, llama_family, text)
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["stages.yaml"]  # no intermediate folder either
    with pytest.raises(ConfigError):
        drm_jax.merge_config(config.read_text(), tmp_path / "out")  # the same config given as text


def test_dry_run_checks_later_stages_against_the_earlier_outputs(llama_family, tmp_path, capsys, no_tensor_reads):
    """Stage `first` keeps one layer; the final stage merges it with a two-layer model: the dry run sees the
    missing layer through `first`'s stand-in (its header without data), as the merge would."""
    text = ("name: first\nmerge_method: passthrough\nslices:\n  - sources:\n      - model: {models}/task_a\n"
            "        layer_range: [0, 1]\n---\n"
            "merge_method: linear\nmodels: [{{model: {models}/task_a}}, {{model: first}}]\n")
    config = _write(tmp_path, llama_family, text)
    assert main(["merge", str(config), str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "tensor 'model.layers.1." in err and "is missing from models[1]" in err and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["stages.yaml"]
    good = config.read_text().replace("layer_range: [0, 1]", "layer_range: [0, 2]")
    config.write_text(good)
    result = drm_jax.merge_config(config, tmp_path / "out", dry_run=True)
    assert [s["name"] for s in result["stages"]] == ["first", None]
    assert result["stages"][0]["plan"]["roles"]["other"] > 0 and result["plan"]["output_bytes"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["stages.yaml"]  # nothing written


def test_stage_names_are_replaced_wherever_a_model_goes(llama_family, tmp_path):
    """base_model, models, slice sources, tokenizer_source and NAME+LORA name a stage's output folder."""
    from drm_jax.config.stages import plan_stages

    models = llama_family / "models"
    documents = [
        {"name": "first", "merge_method": "linear", "models": [{"model": str(models / "task_a")},
                                                               {"model": str(models / "task_b")}]},
        {"name": "sliced", "merge_method": "passthrough",
         "slices": [{"sources": [{"model": "first", "layer_range": [0, 2]}]}]},
        {"merge_method": "task_arithmetic", "base_model": "first", "tokenizer_source": "first",
         "models": [{"model": "sliced", "parameters": {"weight": 1.0}},
                    {"model": f"first+{models / 'task_a'}", "parameters": {"weight": 0.5}}]},
    ]
    stages = plan_stages(documents, None, tmp_path / "out", tmp_path / "stages")
    assert [(s.name, s.needs, s.final) for s in stages] == [
        ("first", (), False), ("sliced", ("first",), False), (None, ("first", "sliced"), True)]
    first, final = str(tmp_path / "stages" / "first"), stages[-1].config
    assert stages[1].config.slices[0].sources[0].model == first
    assert final.base_model == first and final.tokenizer_source == first
    assert [m.model for m in final.models] == [str(tmp_path / "stages" / "sliced"), f"{first}+{models / 'task_a'}"]
    assert stages[-1].out_dir == tmp_path / "out" and stages[0].out_dir == tmp_path / "stages" / "first"


def test_existing_intermediate_is_refused_before_any_stage_runs(llama_family, tmp_path, capsys, no_tensor_reads):
    config = _write(tmp_path, llama_family)
    (tmp_path / "stages" / "mid").mkdir(parents=True)
    (tmp_path / "stages" / "mid" / "notes.txt").write_text("mine")
    assert main(["merge", str(config), str(tmp_path / "out"), "-I", str(tmp_path / "stages"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "mid" in err and "not empty" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["mid"]  # stage 'first' did not run
    assert not (tmp_path / "out").exists()


def test_intermediate_dir_of_a_single_merge_is_named_in_a_warning(llama_family, tmp_path):
    models = llama_family / "models"
    single = f"merge_method: linear\nmodels: [{{model: {models}/task_a}}, {{model: {models}/task_b}}]\n"
    with pytest.warns(UserWarning, match="--intermediate-dir: the config is a single merge"):
        drm_jax.merge_config(single, tmp_path / "out", intermediate_dir=tmp_path / "stages", dry_run=True)
    assert not (tmp_path / "stages").exists()
