"""Hostile merge configs (issue 15, class 4 and the seed of class 8): YAML alias bombs, recursive aliases,
nesting too deep, huge values quoted in errors, a FIFO as the config, and a seed JAX cannot take."""

from __future__ import annotations

import os
import time

import pytest

from .conftest import refused, write_merge_config


def _bomb(levels: int, fan: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * fan)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]")
    return "\n".join(lines)


@pytest.mark.parametrize("levels, where", [(9, "merge_method"), (7, "base_model"), (8, "models")])
def test_alias_bomb_is_refused_small(tmp_path, capfd, levels, where):
    config = tmp_path / "bomb.yaml"
    config.write_text(_bomb(levels) + f"\n{where}: *l{levels - 1}\n")
    assert config.stat().st_size < 1000
    from drm_jax.config.schema import load_config
    from drm_jax.errors import ConfigError

    started = time.monotonic()
    with pytest.raises(ConfigError):
        load_config(config)
    assert time.monotonic() - started < 5  # refused from the node graph: 9**levels values never built
    line = refused(capfd, ["merge", config, tmp_path / "out"], tmp_path / "out", [config], [str(config)])
    assert len(line) < 500 and "expands to more than" in line


def test_alias_expansion_under_the_bound_quotes_a_bounded_prefix(tmp_path, capfd):
    # 9**4 = 6561 values: within the bound, but a wrong type: the error quotes only a prefix of it.
    config = tmp_path / "medium.yaml"
    config.write_text(_bomb(4) + "\nmerge_method: *l3\n")
    line = refused(capfd, ["merge", config, tmp_path / "out"], tmp_path / "out", [config], ["merge_method"])
    assert len(line) < 700


@pytest.mark.parametrize("text, needle", [
    ("a: &a [*a]\nmerge_method: ties\n", "recursive"),
    ("merge_method: " + "[" * 20000 + "]" * 20000 + "\n", "nested too deeply"),
    ("merge_method: " + "x" * 600_000 + "\n", "merge_method"),
    ("merge_method: ties\nparameters: {seed: " + "9" * 5000 + "}\n", "converted"),
])
def test_hostile_yaml_values_get_one_bounded_line(tmp_path, capfd, text, needle):
    config = tmp_path / "hostile.yaml"
    config.write_text(text)
    line = refused(capfd, ["merge", config, tmp_path / "out"], tmp_path / "out", [config], [str(config), needle])
    assert len(line) < 700


def test_config_that_is_a_fifo_is_refused(tmp_path, capfd):
    fifo = tmp_path / "merge.yaml"
    os.mkfifo(fifo)
    refused(capfd, ["merge", fifo, tmp_path / "out"], tmp_path / "out", [], [str(fifo), "regular file"])


@pytest.mark.parametrize("seed", [2**32, 2**64, 10**30])
def test_seed_out_of_range_is_refused(tmp_path, capfd, family, seed):
    config = write_merge_config(tmp_path, family / "base", family / "task_a", family / "task_b",
                                "0.5, density: 0.5", "0.5, density: 0.5")
    config.write_text(config.read_text().replace("task_arithmetic", "dare_ties")
                      .replace("{lambda: 1.0}", f"{{lambda: 1.0, seed: {seed}}}"))
    refused(capfd, ["merge", config, tmp_path / "out", "--quiet"], tmp_path / "out", [family, config],
            ["parameters.seed"])
