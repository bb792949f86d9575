"""Models given as `model+lora` (a PEFT LoRA adapter over a model), through `mergekit-yaml` and `drm-jax merge`
on the same tiny Llama checkpoints and adapters, every tensor compared (float32, 1e-5 of each tensor's
largest magnitude). mergekit merges the adapter into the model with PEFT first (its --lora-merge-cache);
drm_jax applies it while reading (drm_jax.io.peft_io)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from drm_jax.cli.main import main

pytestmark = pytest.mark.optional


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("mergekit")
    root = tmp_path_factory.mktemp("lora_family")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(root / "base", safe_serialization=True)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    gen = torch.Generator().manual_seed(7)
    tuned = transformers.LlamaForCausalLM(config).eval()
    tuned.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in state.items()})
    tuned.save_pretrained(root / "task", safe_serialization=True)
    for seed, (name, targets, r, alpha) in enumerate([("lora_attn", ["q_proj", "v_proj"], 4, 8),
                                                      ("lora_mlp", ["up_proj", "down_proj", "o_proj"], 2, 6)]):
        torch.manual_seed(10 + seed)
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base").eval(),
                                    peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
        with torch.no_grad():  # PEFT starts B at zero: give both factors values
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(0.1 * torch.randn(p.shape))
        model.save_pretrained(root / name)
    return root


CONFIGS = {
    "linear_model_plus_lora": {
        "merge_method": "linear",
        "models": [{"model": "base+lora_attn", "parameters": {"weight": 0.6}},
                   {"model": "task", "parameters": {"weight": 0.4}}],
        "dtype": "float32",
    },
    "task_arithmetic_two_loras": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "base+lora_attn", "parameters": {"weight": 1.0}},
                   {"model": "base+lora_mlp", "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    },
    "ties_lora_and_model": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "task+lora_mlp", "parameters": {"weight": 0.7, "density": 0.6}},
                   {"model": "base+lora_attn", "parameters": {"weight": 0.5, "density": 0.8}}],
        "parameters": {"normalize": True},
        "dtype": "float32",
    },
}

_DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
cache, args = sys.argv[1], sys.argv[2:]
for config, out in zip(args[::2], args[1::2]):
    main([config, out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--no-lazy-unpickle",
          "--lora-merge-cache", cache], standalone_mode=False)
"""


def _localized(raw: dict, root: Path) -> dict:
    def path(ref: str) -> str:
        return "+".join(str(root / part) for part in ref.split("+"))

    out = dict(raw)
    out["models"] = [{**m, "model": path(m["model"])} for m in raw["models"]]
    if "base_model" in raw:
        out["base_model"] = path(raw["base_model"])
    return out


def _load(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def outputs(family, tmp_path_factory):
    work = tmp_path_factory.mktemp("lora_runs")
    args, runs = [], {}
    for name, raw in CONFIGS.items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_localized(raw, family), sort_keys=False))
        theirs, ours = work / f"mk_{name}", work / f"ours_{name}"
        args += [str(path), str(theirs)]
        runs[name] = (path, theirs, ours)
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(work / "lora_cache"), *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: (theirs, ours, main(["merge", str(path), str(ours), "--quiet"]))
            for name, (path, theirs, ours) in runs.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_plus_lora_agrees_with_mergekit(name, outputs, family):
    theirs_dir, ours_dir, code = outputs[name]
    assert code == 0
    theirs, ours = _load(theirs_dir), _load(ours_dir)
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    base = _load(family / "base")
    adapted = 0
    for tensor, want in theirs.items():
        got = ours[tensor]
        assert got.shape == want.shape and got.dtype == want.dtype, tensor
        scale = max(float(np.max(np.abs(want))), 1e-12)
        assert np.max(np.abs(got.astype(np.float64) - want)) <= 1e-5 * scale, tensor
        adapted += int(tensor.endswith(("q_proj.weight", "up_proj.weight")) and not np.allclose(want, base[tensor]))
    assert adapted > 0  # the adapters did change the merged weights
