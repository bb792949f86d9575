"""Bad input to `drm-jax merge`: one line naming the file, tensor or key; exit 2; no traceback; no output
directory (nor temporary directory) left behind; inputs untouched."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from drm_jax.cli.main import main

CONFIG = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
parameters: {{lambda: 1.0}}
"""


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _broken_copy(llama_family: Path, tmp_path: Path, edit) -> Path:
    """A copy of task_b whose safetensors file went through `edit(tensors) -> tensors`."""
    from safetensors.numpy import load_file, save_file

    target = tmp_path / "broken"
    shutil.copytree(llama_family / "models" / "task_b", target)
    tensors = load_file(str(target / "model.safetensors"))
    save_file(edit(tensors), str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _truncate(path: Path) -> Path:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    return path


def _with(tensors, name, value):
    tensors = dict(tensors)
    tensors[name] = value
    return tensors


NAME = "model.layers.1.mlp.down_proj.weight"
CASES = {
    # case: (how task_b is broken, what the message must contain)
    "missing path": (lambda fam, tmp: tmp / "no_such_model", ["models[1]", "no_such_model", "does not exist"]),
    "truncated file": (lambda fam, tmp: _truncate(_broken_copy(fam, tmp, lambda t: t)),
                       ["model.safetensors", "truncated"]),
    "missing tensor": (lambda fam, tmp: _broken_copy(fam, tmp, lambda t: {k: v for k, v in t.items() if k != NAME}),
                       [NAME, "missing", "models[1]"]),
    "shape differs": (lambda fam, tmp: _broken_copy(fam, tmp, lambda t: _with(t, NAME, t[NAME][:, :-1].copy())),
                      [NAME, "shape", "models[1]"]),
    "nan": (lambda fam, tmp: _broken_copy(fam, tmp, lambda t: _with(t, NAME, np.where(
        np.arange(t[NAME].size).reshape(t[NAME].shape) == 7, np.nan, t[NAME]).astype(t[NAME].dtype))),
            [NAME, "NaN", "models[1]"]),
    "inf": (lambda fam, tmp: _broken_copy(fam, tmp, lambda t: _with(t, NAME, np.full_like(t[NAME], np.inf))),
            [NAME, "Inf", "models[1]"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_model_input(case, llama_family, tmp_path, capsys):
    make, needles = CASES[case]
    broken = make(llama_family, tmp_path)
    models = llama_family / "models"
    before = _digest(models), (_digest(broken) if broken.exists() else None)
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.format(base=models / "base", a=models / "task_a", b=broken))
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    assert main(["merge", str(config), str(out_parent / "merged")]) == 2
    err = capsys.readouterr().err
    message = err.replace("\r", "\n").strip().splitlines()[-1]
    assert message.startswith("drm-jax: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in message, (needle, message)
    assert list(out_parent.iterdir()) == []  # neither the output nor a temporary directory
    assert (_digest(models), _digest(broken) if broken.exists() else None) == before


@pytest.mark.parametrize("text, needle", [
    ("merge_method: tie\nbase_model: b\nmodels: [a]\n", "merge_method"),
    ("merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: {densty: 0.5}\n", "parameters.densty"),
    ("merge_method: ties\nbase_model: b\nmodels: [a\n", "not valid YAML at line"),
    ("merge_method: drm\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: abc}\n",
     "models[0].parameters.weight"),
])
def test_bad_config(text, needle, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["merge", str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(config) in err and needle in err, err
    assert not (tmp_path / "out").exists()


def test_output_inside_an_input_is_refused(llama_family, tmp_path, capsys):
    models = llama_family / "models"
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.format(base=models / "base", a=models / "task_a", b=models / "task_b"))
    before = _digest(models)
    assert main(["merge", str(config), str(models / "task_a"), "--force"]) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert _digest(models) == before


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    """The installed entry point (a fresh process): unknown method -> exit 2, one line on stderr."""
    config = tmp_path / "c.yaml"
    config.write_text("merge_method: frankenslerp\nbase_model: b\nmodels: [a]\n")
    result = subprocess.run([sys.executable, "-m", "drm_jax.cli.main", "merge", str(config), str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "merge_method" in result.stderr and "frankenslerp" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_unavailable_device_is_one_line(tmp_path, capsys):
    import jax

    def present(kind):
        try:
            return bool(jax.devices(kind))
        except RuntimeError:
            return False

    absent = next(kind for kind in ("tpu", "gpu") if not present(kind))  # a machine has at most one
    config = tmp_path / "c.yaml"
    config.write_text("merge_method: linear\nmodels: [a, b]\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--device", absent]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--device {absent}" in err and not (tmp_path / "out").exists()
