"""The same config through mergekit and through `drm-jax merge` gives the same tensors (optional: skipped
when mergekit is not installed; `pip install mergekit`, or `pip install --no-deps mergekit immutables` to
keep torch and jax as they are)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from drm_jax.cli.main import main

pytestmark = pytest.mark.optional

CONFIGS = {
    "linear": """merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: 0.5}}
parameters: {{normalize: {normalize}}}
dtype: float32
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: 0.5}}
parameters: {{lambda: 0.8, normalize: {normalize}}}
dtype: float32
""",
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: {density_a}}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.5}}
parameters: {{lambda: 0.9, normalize: {normalize}}}
dtype: float32
""",
}
CASES = [
    ("linear", {"normalize": "true"}),
    ("linear", {"normalize": "false"}),
    ("task_arithmetic", {"normalize": "false"}),
    ("task_arithmetic", {"normalize": "true"}),
    ("ties", {"normalize": "true", "density_a": 0.5}),  # one density: the engine's own trim
    ("ties", {"normalize": "true", "density_a": 0.3}),  # per-model densities: trimmed while reading
    ("ties", {"normalize": "false", "density_a": 0.8}),
]


def _load(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in CASES])
def test_same_tensors_as_mergekit(method, options, llama_family, tmp_path):
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    models = llama_family / "models"
    text = CONFIGS[method].format(base=models / "base", a=models / "task_a", b=models / "task_b", **options)
    config = tmp_path / "config.yaml"
    config.write_text(text)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mergekit"),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    assert main(["merge", str(config), str(tmp_path / "ours"), "--quiet"]) == 0
    theirs, ours = _load(tmp_path / "mergekit"), _load(tmp_path / "ours")
    assert set(theirs) == set(ours)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-6, err_msg=name)
