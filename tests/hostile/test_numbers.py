"""Numbers and indices no float or model can hold (issue 23, class 5): a 400-digit weight, lambda, adapter
r or size; layer indices past config.json's count, spelt twice ("layers.0" and "layers.00") or of 5,000
digits; a step directory named with a digit int() refuses. Each is one line (a DrmJaxError in the API),
never an OverflowError or ValueError traceback."""

from __future__ import annotations


import numpy as np
import pytest

from .conftest import TASKS, lora_adapter_dir, refused, write_merge_config

HUGE = "1" + "0" * 400  # an integer beyond float's range: float(HUGE) raises OverflowError


def _config(family, tmp_path, **kwargs):
    return write_merge_config(tmp_path, family / "base", family / TASKS[0], family / TASKS[1], **kwargs)


@pytest.mark.parametrize("where, kwargs, key", [
    ("weight", {"wa": HUGE}, "weight"),
    ("lambda", {"extra": f"parameters: {{lambda: {HUGE}}}\n"}, "lambda"),
    ("gradient", {"wa": f"[0.5, {HUGE}]"}, "weight"),
])
def test_yaml_integer_beyond_float_is_one_line(family, tmp_path, capfd, where, kwargs, key):
    config = _config(family, tmp_path, **kwargs)
    if where == "lambda":  # replace the config's own parameters block
        text = config.read_text().replace("parameters: {lambda: 1.0}\n", "")
        config.write_text(text)
    out = tmp_path / "out"
    line = refused(capfd, ["merge", config, out], out, [config, family], [key])
    assert "finite" in line and len(line) < 500


@pytest.mark.parametrize("field", ["r", "lora_alpha"])
def test_adapter_config_integer_beyond_float_is_one_line(family, tmp_path, capfd, field):
    adapter = lora_adapter_dir(tmp_path)
    text = (adapter / "adapter_config.json").read_text()
    (adapter / "adapter_config.json").write_text(text.replace(f'"{field}": 2', f'"{field}": {HUGE}'))
    config = _config(family, tmp_path)
    config.write_text(config.read_text().replace(str(family / TASKS[0]), f"{family / 'base'}+{adapter}"))
    out = tmp_path / "out"
    refused(capfd, ["merge", config, out], out, [config, family, adapter], ["adapter_config.json", field])


@pytest.mark.parametrize("argv", [
    ["merge", "{config}", "{out}", "--max-memory", HUGE],
    ["merge", "{config}", "{out}", "--max-shard-size", "1" + "0" * 30 + "GB"],
    ["merge", "{config}", "{out}", "--out-shard-size", "9" * 5000],
    ["convert", "{base}", "{out}", "--to", "flax", "--max-shard-size", "1e999"],
    ["convert", "{base}", "{out}", "--to", "flax", "--max-shard-size", HUGE],
])
def test_size_options_beyond_any_memory_are_refused(family, tmp_path, capfd, argv):
    from drm_jax.cli.main import main

    config, out = _config(family, tmp_path), tmp_path / "out"
    argv = [a.format(config=config, out=out, base=family / "base") for a in argv]
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal of an option value
        main(argv)
    err = capfd.readouterr().err
    assert exit_info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("drm-jax: error: ") and "larger than any" in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_api_number_beyond_float_raises_drm_jax_error():
    import drm_jax
    from drm_jax import LoraWeight
    from drm_jax.errors import DrmJaxError

    base = {"w": np.zeros((4, 4), np.float32)}
    models = [{"w": np.ones((4, 4), np.float32)}, {"w": -np.ones((4, 4), np.float32)}]
    for kwargs, name in ((dict(lambda_=10**400), "lambda_"), (dict(coefficients=[10**400, 1.0]), "coefficients"),
                         (dict(coefficients=10**400), "coefficients")):
        with pytest.raises(DrmJaxError, match=name):
            drm_jax.merge(base, models, method="task_arithmetic", **kwargs)
    adapters = [{"w": LoraWeight(np.ones((4, 1), np.float32), np.ones((1, 4), np.float32))}] * 2
    for coefficients in (10**400, [1.0, 10**400]):
        with pytest.raises(DrmJaxError, match="coefficients"):
            drm_jax.merge_adapters(base, adapters, method="task_arithmetic", coefficients=coefficients)


# -- layer indices ------------------------------------------------------------------------------------------
def _add_layer_tensor(family, name: str) -> None:
    """Add tensor `name` (a copy of layer 0's up_proj) to every model of the family."""
    from safetensors.numpy import load_file, save_file

    for model in ("base", *TASKS):
        path = family / model / "model.safetensors"
        tensors = load_file(str(path))
        tensors[name] = tensors["model.layers.0.mlp.up_proj.weight"]
        save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("index, needle", [
    ("1", "num_hidden_layers is 1"),  # a second layer where config.json counts one
    ("00", "layer index '00'"),  # layer 0 spelt twice
    ("7" * 5000, "at most 6 digits"),
])
def test_layer_index_that_does_not_fit_is_one_line(family, tmp_path, capfd, index, needle):
    name = f"model.layers.{index}.mlp.up_proj.weight"
    _add_layer_tensor(family, name)
    config = _config(family, tmp_path, wa="[0.2, 0.8]")  # a gradient reads every tensor's layer index
    out = tmp_path / "out"
    line = refused(capfd, ["merge", config, out], out, [config, family], [needle, name[:20]])
    assert len(line) < 700


@pytest.mark.parametrize("step", ["\u00b2", "\u0663", "12\u00b2"])
def test_step_directory_named_with_an_odd_digit_is_one_line(tmp_path, capfd, step):
    src = tmp_path / "src"
    (src / step).mkdir(parents=True)
    (src / "1").mkdir()
    out = tmp_path / "out"
    refused(capfd, ["convert", src, out, "--to", "flax"], out, [src], [str(src), "unknown checkpoint format"])
