"""`drm_jax.merge_config` runs a config from Python exactly as `drm-jax merge` does: every file of the output
(weights, config.json, tokenizer, model card, mergekit_config.yml) is byte-identical, for example configs of
the repository (examples/configs on the tiny Llama family, tests/mergekit/configs on a 4-layer Llama built
with numpy), and for a config given as a path, as YAML text or as a dict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

import drm_jax
from drm_jax.cli.main import main
from drm_jax.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "configs"
MERGEKIT_CONFIGS = REPO / "tests" / "mergekit" / "configs"
LAYERS, HIDDEN, FFN, VOCAB = 4, 16, 16, 32  # one shape for every layer weight: few programs to compile


def _llama(seed: int, base: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A 4-layer Llama's tensors under Hugging Face names: `base` plus seeded noise, or random."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        shapes.update({layer + f"self_attn.{p}_proj.weight": (HIDDEN, HIDDEN) for p in "qkvo"})
        shapes.update({layer + "mlp.gate_proj.weight": (FFN, HIDDEN), layer + "mlp.up_proj.weight": (FFN, HIDDEN),
                       layer + "mlp.down_proj.weight": (HIDDEN, FFN), layer + "input_layernorm.weight": (HIDDEN,),
                       layer + "post_attention_layernorm.weight": (HIDDEN,)})
    rng = np.random.default_rng(seed)
    noise = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    return noise if base is None else {n: base[n] + 0.02 * noise[n] for n in shapes}


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> Path:
    """base, task_a, task_b, task_c: safetensors + config.json, no tokenizer (the mergekit configs' names)."""
    root = tmp_path_factory.mktemp("llama4")
    base = _llama(0)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "torch_dtype": "float32",
              "tie_word_embeddings": False}
    for seed, name in enumerate(("base", "task_a", "task_b", "task_c")):
        (root / name).mkdir()
        save_file(base if name == "base" else _llama(seed, base), str(root / name / "model.safetensors"))
        (root / name / "config.json").write_text(json.dumps(config))
    return root


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _same_as_the_command_line(config: Path, tmp_path: Path, *flags: str, **options) -> dict[str, bytes]:
    """Run `drm-jax merge` and merge_config (outputs named alike: the model card names the folder)."""
    assert main(["merge", str(config), str(tmp_path / "cli" / "merged"), "--quiet", *flags]) == 0
    result = drm_jax.merge_config(config, tmp_path / "api" / "merged", **options)
    assert result["output"] == tmp_path / "api" / "merged"
    cli, api = _files(tmp_path / "cli" / "merged"), _files(tmp_path / "api" / "merged")
    assert cli.keys() == api.keys()
    for name in cli:
        assert cli[name] == api[name], name
    assert any(n.endswith(".safetensors") for n in cli)
    return api


# drm: a tokenizer_source and a model card; passthrough: a method that takes no base. The other examples
# differ only in the method's numbers, which `drm-jax merge` and merge_config pass on alike.
@pytest.mark.parametrize("name", ["drm", "passthrough"])
def test_example_config_equals_the_command_line(name, llama_family, tmp_path, monkeypatch):
    monkeypatch.chdir(llama_family)  # the examples name models/base, models/task_a, models/task_b
    files = _same_as_the_command_line(EXAMPLES / f"{name}.yaml", tmp_path)
    assert {"tokenizer.json", "README.md", "mergekit_config.yml"} <= files.keys()


# slices with per-tensor gradients and filters (gradient-slerp), slices of different models (orcamini), a
# plain weighted sum (linear). ties, bio-merge and arcee_fusion plan as these do and cost 15-45 s of
# compilation each on a shared 2-core machine (16 programs for ties.yml).
@pytest.mark.parametrize("name", ["gradient-slerp.yml", "linear.yml", "orcamini-platy-44layer.yml"])
def test_mergekit_example_config_equals_the_command_line(name, llama4, tmp_path):
    config = tmp_path / name
    config.write_text((MERGEKIT_CONFIGS / name).read_text())
    for model in ("base", "task_a", "task_b", "task_c"):  # relative to the config's folder
        (tmp_path / model).symlink_to(llama4 / model)
    _same_as_the_command_line(config, tmp_path, "--devices", "1", devices=1)


def test_options_mirror_the_flags(llama4, tmp_path):
    config = tmp_path / "linear.yml"
    config.write_text((MERGEKIT_CONFIGS / "linear.yml").read_text().replace("model: task_", f"model: {llama4}/task_"))
    files = _same_as_the_command_line(config, tmp_path, "--max-shard-size", "8KB", "--no-write-model-card",
                                      max_shard_size="8KB", write_model_card=False)
    assert "README.md" not in files and "model.safetensors.index.json" in files
    # YAML text and a dict (paths relative to the working directory) give the same tensors
    text = config.read_text()
    drm_jax.merge_config(text, tmp_path / "text" / "merged", max_shard_size=8_000, write_model_card=False)
    drm_jax.merge_config(yaml.safe_load(text), tmp_path / "dict" / "merged", max_shard_size=8_000,
                         write_model_card=False)
    assert _files(tmp_path / "text" / "merged") == files == _files(tmp_path / "dict" / "merged")


def test_errors_are_one_line_drm_jax_errors_and_leave_nothing(llama4, tmp_path):
    out = tmp_path / "out"
    raw = {"merge_method": "linear", "models": [{"model": str(llama4 / "task_a")}, {"model": str(llama4 / "task_b")}]}
    with pytest.raises(ConfigError, match="merge_methd: unknown key"):
        drm_jax.merge_config({**raw, "merge_methd": "ties"}, out)
    with pytest.raises(ConfigError, match="adapter-rank needs --adapter-out"):
        drm_jax.merge_config(raw, out, adapter_rank=4)
    with pytest.raises(ConfigError, match="not a size"):
        drm_jax.merge_config(raw, out, max_memory="lots")
    with pytest.raises(CheckpointError, match="does not exist"):
        drm_jax.merge_config({**raw, "models": [{"model": str(tmp_path / "nowhere")}, raw["models"][1]]}, out)
    with pytest.raises(ConfigError, match="must be a path, YAML text, a dict"):
        drm_jax.merge_config(42, out)
    assert not out.exists() and not list(tmp_path.glob(".*"))
