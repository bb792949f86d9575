"""`drm-jax merge` with `merge_method: wudi` (streamed through the checkpoint writer) equals drm_jax.merge of
the same models; `regmean` and `regmean_plusplus` in a config are refused in one line naming what is missing
(docs/methods.md#wudi, #regmean, #regmean-plus-plus)."""

import numpy as np
import pytest
import yaml

import drm_jax
from drm_jax.cli.main import main


def _config(path, method, **parameters):
    path.write_text(yaml.safe_dump({"merge_method": method, "base_model": "models/base",
                                    "models": [{"model": "models/task_a"}, {"model": "models/task_b"}],
                                    "parameters": parameters, "dtype": "float32"}))
    return str(path)


def test_a_wudi_config_equals_the_python_merge(llama_family, tmp_path, monkeypatch, read_output):
    monkeypatch.chdir(llama_family)
    config = _config(tmp_path / "wudi.yaml", "wudi", iter_num=6, learning_rate=1e-3)
    assert main(["merge", config, str(tmp_path / "out"), "--quiet"]) == 0
    base = read_output(llama_family / "models" / "base")
    models = [read_output(llama_family / "models" / t) for t in ("task_a", "task_b")]
    want = drm_jax.merge(base, models, method="wudi", iter_num=6, learning_rate=1e-3)
    got = read_output(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not np.allclose(got[name], np.mean([m[name] for m in models], axis=0), atol=1e-4)  # not the mean


@pytest.mark.parametrize("method, says", [("regmean", "regmean needs per-leaf data (grams)"),
                                          ("regmean_plusplus", "drm_jax.regmean_plusplus")])
def test_regmean_configs_are_refused_in_one_line(llama_family, tmp_path, monkeypatch, capsys, method, says):
    monkeypatch.chdir(llama_family)
    out = tmp_path / "out"
    assert main(["merge", _config(tmp_path / "c.yaml", method), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
