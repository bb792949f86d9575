"""Every config of examples/configs runs as a new user runs it (issue 27, point 2): the README's one command
makes the tiny models they name, then `drm-jax merge CONFIG OUT` from another folder exits 0, writes a
checkpoint, and says nothing but its progress and summary (no warning)."""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from drm_jax.cli.main import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))


def _make_tiny_models():
    spec = importlib.util.spec_from_file_location("make_tiny_models", EXAMPLES / "make_tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    """A copy of examples/configs with the tiny models made where the README's command makes them."""
    root = tmp_path_factory.mktemp("examples") / "configs"
    root.mkdir()
    for config in CONFIGS:
        shutil.copy(config, root / config.name)
    assert _make_tiny_models().main([str(root / "models")]) == 0
    return root


def test_the_tiny_models_are_the_ones_the_configs_name(examples):
    import yaml

    named = set()
    for config in CONFIGS:
        raw = yaml.safe_load(config.read_text())
        named |= {m["model"] for m in raw.get("models", [])} | {raw.get("base_model")} - {None}
    assert named and all((examples / name / "model.safetensors").is_file() for name in named), named


@pytest.mark.parametrize("config", [c.name for c in CONFIGS])
def test_example_config_runs_as_a_new_user_runs_it(config, examples, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the configs' folder: the models are found beside the config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["merge", str(examples / config), "merged"]) == 0
    said = capsys.readouterr()
    assert "warning" not in (said.out + said.err).lower(), said
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert " tensors into merged" in said.out  # the summary a user reads
    assert load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
