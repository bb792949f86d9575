"""A user's method registered with `drm_jax.methods.register` is a method of the command line too (same
process): `drm-jax merge` runs a YAML `merge_method: <name>` and `drm-jax methods` lists it."""

import numpy as np
import yaml

import drm_jax
from drm_jax import math as m
from drm_jax.cli.main import main

SCALED_SUM = drm_jax.MergeMethod(linear=m.chain(m.scale_by_coefficients(), m.sum_tasks(), m.scale()),
                                 other=m.chain(m.scale_by_coefficients(), m.sum_tasks(), m.scale()))


def _config(path, method, **parameters):
    path.write_text(yaml.safe_dump({"merge_method": method, "base_model": "models/base",
                                    "models": [{"model": "models/task_a"}, {"model": "models/task_b"}],
                                    "parameters": parameters, "dtype": "float32"}))
    return str(path)


def test_a_registered_composition_runs_from_yaml_and_is_listed(llama_family, tmp_path, monkeypatch, capsys,
                                                                   read_output):
    monkeypatch.chdir(llama_family)
    drm_jax.methods.register("scaled_sum", SCALED_SUM)
    try:
        ours = _config(tmp_path / "ours.yaml", "scaled_sum", lambda_=0.5)
        theirs = _config(tmp_path / "theirs.yaml", "task_arithmetic", **{"lambda": 0.5})
        assert main(["merge", ours, str(tmp_path / "ours"), "--quiet"]) == 0
        assert main(["merge", theirs, str(tmp_path / "theirs"), "--quiet"]) == 0
        assert main(["methods", "scaled_sum"]) == 0
        listing = capsys.readouterr().out
    finally:
        drm_jax.methods.unregister("scaled_sum")
    assert "scaled_sum: a composition of drm_jax.math stages" in listing and "lambda_" in listing
    got, want = read_output(tmp_path / "ours"), read_output(tmp_path / "theirs")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
