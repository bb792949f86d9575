"""The sign election's tie rule through `drm-jax merge`: the recipe must pick each method's own rule.

The hand-built case of tests/core/test_sign_ties.py (entry 0's task sum is exactly 0, the other entries are
negative), written as tiny safetensors checkpoints: mergekit's `ties` and `dare_ties` give the tie to +,
DRM and KnOTS-TIES (SPEC step 7) to the sign of the sum of the elected signs, here -.
"""

from __future__ import annotations

import numpy as np
import pytest

from drm_jax.cli.main import main

TENSORS = {"base": [0.0, 0.0, 0.0], "task_a": [1.0, -2.0, -1.0], "task_b": [-1.0, -1.0, -1.0]}


@pytest.mark.parametrize("method, parameters, want", [
    ("ties", "{density: 1.0}", [1.0, -1.5, -1.0]),
    ("dare_ties", "{density: 1.0}", [1.0, -3.0, -2.0]),  # mergekit's dare_ties sums (normalize: false)
    ("drm", "{}", [-1.0, -1.5, -1.0]),
    ("knots_ties", "{}", [-1.0, -1.5, -1.0]),
])
def test_tie_rule_of_each_method_through_the_command_line(method, parameters, want, tmp_path):
    from safetensors.numpy import load_file, save_file

    for name, values in TENSORS.items():
        (tmp_path / name).mkdir()
        save_file({"block.bias": np.array(values, np.float32)}, str(tmp_path / name / "model.safetensors"),
                  metadata={"format": "pt"})
    config = tmp_path / "c.yaml"
    config.write_text(f"merge_method: {method}\nbase_model: {tmp_path / 'base'}\n"
                      f"models: [{tmp_path / 'task_a'}, {tmp_path / 'task_b'}]\nparameters: {parameters}\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    np.testing.assert_allclose(load_file(str(tmp_path / "out" / "model.safetensors"))["block.bias"], want,
                               rtol=0, atol=1e-7)
