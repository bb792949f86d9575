"""`drm-jax merge` with PEFT LoRA adapters as inputs: the merged model, and with --adapter-out one merged
adapter that PEFT loads over the base and that reproduces the merged model (docs/methods.md#lora-factored).

Tiny random Llama base (tests/cli/conftest.py), three PEFT adapters with random B; no downloads.
"""

import json

import numpy as np
import pytest

from drm_jax.cli.main import main

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(llama_family, lora_adapter, tmp_path_factory):
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("adapters")
    base = llama_family / "models" / "base"
    for t in range(3):
        lora_adapter(base, root / f"a{t}", TARGETS, r=2, alpha=4, seed=20 + t)
    return base, root


def _config(path, method: str, base, models: list[str], params: str):
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    lines += [f"  - model: {m}\n    parameters: {{weight: {w}}}" for m, w in zip(models, (0.6, 1.0, 1.4))]
    lines += ["parameters:", f"  {params}", "dtype: float32"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits.numpy()


def test_adapter_out_loads_in_peft_and_reproduces_the_merged_model(adapters, tmp_path, capsys):
    """DRM-H over three adapters (one given as base+adapter): the merged model (streamed, from the formed
    deltas) and the merged adapter (factored, rank K r = 6) give the same weights and logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, root = adapters
    models = [str(root / "a0"), f"{base}+{root / 'a1'}", str(root / "a2")]
    config = _config(tmp_path / "drm.yaml", "drm", base, models, "drop_rate: 0.7")
    assert main(["merge", str(config), str(tmp_path / "model"), "--quiet"]) == 0
    assert main(["merge", str(config), str(tmp_path / "adapter"), "--adapter-out"]) == 0
    # 2 layers x 3 target modules, all on DRM's linear path: none formed as an n x m delta
    note = capsys.readouterr().err
    assert "of 6 weights" in note and "(6 merged in factored form, 0 as concatenated factors, 0 formed" in note

    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 6 and written["lora_alpha"] == 6
    assert all(any(m.endswith(t) for m in written["target_modules"]) for t in TARGETS)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    want, got = _logits(merged, ids), _logits(loaded, ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    folded = {k: v.numpy() for k, v in loaded.merge_and_unload().state_dict().items()}
    for name, value in merged.state_dict().items():
        diff = np.abs(folded[name] - value.numpy()).max()
        assert diff <= 1e-5 * max(1.0, np.abs(value.numpy()).max()), name


def test_adapter_rank_truncates_and_reports(adapters, tmp_path, capsys):
    base, root = adapters
    config = _config(tmp_path / "ta.yaml", "task_arithmetic", base, [str(root / f"a{t}") for t in range(3)],
                     "lambda: 0.8")
    assert main(["merge", str(config), str(tmp_path / "low"), "--adapter-out", "--adapter-rank", "3"]) == 0
    assert json.loads((tmp_path / "low" / "adapter_config.json").read_text())["r"] == 3
    note = capsys.readouterr().err
    assert "rank-3 LoRA adapter" in note and "largest discarded energy" in note
    # the cut's warning, as one line of the command line's own, naming the weights
    assert "drm-jax: warning: merge_adapters: the rank cut discards more than 1%" in note
    assert "'model.layers." in note and "UserWarning" not in note
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "low" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{key}.lora_A.weight"].shape == (3, 32) and tensors[f"{key}.lora_B.weight"].shape == (32, 3)


def test_adapter_out_refuses_inputs_that_are_not_adapters_of_the_base(adapters, llama_family, tmp_path, capsys):
    base, root = adapters
    task = llama_family / "models" / "task_a"
    cases = {
        "model.yaml": ([str(root / "a0"), str(task)], "is not a PEFT LoRA adapter directory"),
        "other.yaml": ([str(root / "a0"), f"{task}+{root / 'a1'}"], "adapter over another model than base_model"),
    }
    for file, (models, message) in cases.items():
        config = _config(tmp_path / file, "ties", base, models, "density: 0.5")
        assert main(["merge", str(config), str(tmp_path / "out"), "--quiet", "--adapter-out"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
    config = _config(tmp_path / "ok.yaml", "ties", base, [str(root / "a0"), str(root / "a1")], "density: 0.5")
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet", "--adapter-rank", "2"]) == 2
    assert "--adapter-rank needs --adapter-out" in capsys.readouterr().err


def test_adapter_out_dry_run_prints_the_plan_and_writes_nothing(adapters, tmp_path, capsys):
    base, root = adapters
    config = _config(tmp_path / "ties.yaml", "ties", base, [str(root / "a0"), str(root / "a1")], "density: 0.5")
    out = tmp_path / "out"
    assert main(["merge", str(config), str(out), "--adapter-out", "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    # 2 adapters of rank 2: K r = 4; one line per adapted weight (2 layers x 3 target modules)
    assert printed[0] == (f"{out}: ties of 2 models into one rank-4 LoRA adapter of 6 weights (0 embeddings), "
                          f"float32; files adapter_config.json, adapter_model.safetensors")
    assert "  model.layers.0.self_attn.q_proj.weight: ranks 2 + 2 -> 4" in printed
    assert len([line for line in printed if line.startswith("  model.layers.")]) == 6
    assert printed[-1] == f"drm-jax: dry run: no problem found; nothing was written to {out}"
    assert main(["merge", str(config), str(out), "--adapter-out", "--adapter-rank", "3", "--dry-run"]) == 0
    assert "  model.layers.1.mlp.down_proj.weight: ranks 2 + 2 -> 3" in capsys.readouterr().out
    assert not out.exists()


def _broken_adapter(root, tmp_path, change):
    """A copy of adapter a0 with one factor replaced: change(tensors) edits its tensors in place."""
    import shutil

    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(root / "a0", broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    return broken


KEY = "base_model.model.model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize("change, message", [
    # A of another input size: 2-D and of one rank, but its update is not the base weight's shape
    (lambda t: t.update({f"{KEY}.lora_A.weight": np.zeros((2, 31), np.float32)}),
     "make an update of shape (32, 31), but the base weight 'model.layers.1.self_attn.v_proj.weight' has shape "
     "(32, 32)"),
    # A of rank 3 against B of rank 2
    (lambda t: t.update({f"{KEY}.lora_A.weight": np.zeros((3, 32), np.float32)}),
     "LoRA factors A (3, 32) and B (32, 2) are not a linear layer's or an embedding's"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_adapter_out_checks_the_factors_from_the_headers(adapters, tmp_path, capsys, change, message, dry_run):
    """Factors of the wrong kind of shape are refused at plan time, before any factor is read: one line naming
    the adapter's file and module, exit 2, no output (a dry run says the same)."""
    base, root = adapters
    broken = _broken_adapter(root, tmp_path, change)
    config = _config(tmp_path / "ta.yaml", "task_arithmetic", base, [str(root / "a1"), str(broken)], "lambda: 1.0")
    out = tmp_path / "out"
    assert main(["merge", str(config), str(out), "--quiet", "--adapter-out"] + ["--dry-run"] * dry_run) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and not captured.out
    assert f"{broken / 'adapter_model.safetensors'}: module 'model.layers.1.self_attn.v_proj': " in err
    assert message in err
    assert not out.exists()
