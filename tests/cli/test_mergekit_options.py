"""A mergekit user's habits on `drm-jax merge` (issue 27, point 1): every option of mergekit-yaml 0.1.5 is
honored, or accepted with one line saying what it means here, or refused with its reason; models named
by a Hugging Face Hub id (`org/name[@revision]`) are found in a cache laid out as the Hub lays it out
(never the network: HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from drm_jax.cli.main import main
from drm_jax.cli.mergekit_options import NOTES

HIDDEN, VOCAB = 8, 16
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
          "intermediate_size": HIDDEN, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
          "vocab_size": VOCAB, "torch_dtype": "float32", "tie_word_embeddings": False}

# mergekit-yaml 0.1.5's options (mergekit/options.py, MergeOptions), as a mergekit user types them.
FLAGS = ["lazy-unpickle", "low-cpu-memory", "read-to-gpu", "multi-gpu", "clone-tensors", "async-write",
         "allow-crimes", "copy-tokenizer", "write-model-card", "safe-serialization", "quiet", "cuda",
         "trust-remote-code", "unsafe-truncate-embeddings"]
VALUED = {"lora-merge-cache": "lora_cache", "lora-merge-dtype": "bfloat16", "write-threads": "2",
          "num-threads": "2", "out-shard-size": "5B", "random-seed": "3", "transformers-cache": "hub",
          "device": "cpu"}
FIELDS = {f.replace("-", "_") for f in FLAGS + list(VALUED)} | {"verbosity", "gpu_rich"}


def _tensors(seed: int) -> dict[str, np.ndarray]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN), "model.layers.0.input_layernorm.weight": (HIDDEN,),
              "model.layers.0.post_attention_layernorm.weight": (HIDDEN,)}
    shapes.update({f"model.layers.0.self_attn.{p}_proj.weight": (HIDDEN, HIDDEN) for p in "qkvo"})
    shapes.update({f"model.layers.0.mlp.{p}_proj.weight": (HIDDEN, HIDDEN) for p in ("gate", "up", "down")})
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """base, task_a, task_b: one-layer Llama safetensors checkpoints with config.json."""
    root = tmp_path_factory.mktemp("family")
    for seed, name in enumerate(("base", "task_a", "task_b")):
        (root / name).mkdir()
        save_file(_tensors(seed), str(root / name / "model.safetensors"))
        (root / name / "config.json").write_text(json.dumps(CONFIG))
    return root


def _config(path: Path, method: str, models: list[str], base: str, **parameters) -> Path:
    raw = {"merge_method": method, "base_model": base,
           "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.6}} for m in models],
           "dtype": "float32"}
    if method == "task_arithmetic":
        raw["models"] = [{"model": m, "parameters": {"weight": 0.5}} for m in models]
    if parameters:
        raw["parameters"] = parameters
    path.write_text(yaml.safe_dump(raw))
    return path


def _merged(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same(a: Path, b: Path) -> None:
    x, y = _merged(a), _merged(b)
    assert x.keys() == y.keys() and x
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_the_option_list_is_mergekit_0_1_5s():
    options = pytest.importorskip("mergekit.options")
    assert set(options.MergeOptions.model_fields) == FIELDS


def test_every_option_is_accepted_and_says_what_it_means(family, tmp_path, capsys):
    config = _config(tmp_path / "linear.yaml", "task_arithmetic", [str(family / "task_a"), str(family / "task_b")],
                     str(family / "base"))
    assert main(["merge", str(config), str(tmp_path / "plain"), "--quiet"]) == 0
    capsys.readouterr()
    flags = [f"--{f}" for f in FLAGS if f not in ("cuda", "quiet", "trust-remote-code", "unsafe-truncate-embeddings")]
    flags += ["--no-safe-serialization", "--no-cuda", "--no-trust-remote-code", "--no-quiet", "-v", "-j", "2"]
    flags += [x for k, v in VALUED.items() if k not in ("num-threads", "random-seed") for x in (f"--{k}", v)]
    assert main(["merge", str(config), str(tmp_path / "mergekit"), *flags]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("drm-jax: note: ")]
    assert sorted(notes) == sorted(f"drm-jax: note: {text}" for text in NOTES.values())  # one line each
    assert "error" not in err and "Traceback" not in err
    _same(tmp_path / "plain", tmp_path / "mergekit")  # none of them changes the merge


def test_notes_are_quiet_under_quiet(family, tmp_path, capsys):
    config = _config(tmp_path / "linear.yaml", "task_arithmetic", [str(family / "task_a"), str(family / "task_b")],
                     str(family / "base"))
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet", "--lazy-unpickle", "--low-cpu-memory"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv, device", [(["--cuda"], "gpu"), (["--gpu-rich"], "gpu"), (["--device", "cuda"], "gpu"),
                                          (["--device", "cuda:1"], "gpu"), (["--device", "auto"], None),
                                          (["--device", "cuda", "--cuda"], "gpu"), (["--device", "cpu", "--cuda"], "cpu")])
def test_cuda_is_device_gpu(argv, device):
    import argparse

    from drm_jax.cli import merge as merge_command
    from drm_jax.cli.mergekit_options import apply_mergekit_options

    parser = argparse.ArgumentParser()
    merge_command.register(parser.add_subparsers())
    args = parser.parse_args(["merge", "config.yaml", "out", *argv])
    notes = []
    apply_mergekit_options(args, notes.append)
    assert args.device == device
    assert any("--device gpu" in n for n in notes) == (device == "gpu" and "--device" not in argv)


@pytest.mark.parametrize("flag, reason", [("--trust-remote-code", "never runs code from a model repository"),
                                          ("--unsafe-truncate-embeddings", "tokenizer_source")])
def test_refused_options_say_why(flag, reason, family, tmp_path, capsys):
    config = _config(tmp_path / "linear.yaml", "task_arithmetic", [str(family / "task_a"), str(family / "task_b")],
                     str(family / "base"))
    assert main(["merge", str(config), str(tmp_path / "out"), flag]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"drm-jax: error: {flag}: refused") and reason in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_random_seed_seeds_the_random_methods_where_the_config_gives_none(family, tmp_path, capsys):
    models, base = [str(family / "task_a"), str(family / "task_b")], str(family / "base")
    unseeded = _config(tmp_path / "dare.yaml", "dare_linear", models, base)
    seeded = _config(tmp_path / "dare3.yaml", "dare_linear", models, base, seed=3)
    assert main(["merge", str(unseeded), str(tmp_path / "flag3"), "--quiet", "--random-seed", "3"]) == 0
    assert main(["merge", str(seeded), str(tmp_path / "config3"), "--quiet"]) == 0
    assert main(["merge", str(unseeded), str(tmp_path / "default"), "--quiet"]) == 0
    _same(tmp_path / "flag3", tmp_path / "config3")
    flag3, default = _merged(tmp_path / "flag3"), _merged(tmp_path / "default")
    assert any(not np.array_equal(flag3[n], default[n]) for n in flag3)  # the seed reached the masks
    # the config's own seed wins, and a method without random draws says the flag is unused
    assert main(["merge", str(seeded), str(tmp_path / "both"), "--random-seed", "5"]) == 0
    assert "the config's own parameters.seed is used" in capsys.readouterr().err
    _same(tmp_path / "both", tmp_path / "config3")
    linear = _config(tmp_path / "linear.yaml", "task_arithmetic", models, base)
    assert main(["merge", str(linear), str(tmp_path / "linear"), "--random-seed", "5"]) == 0
    assert "--random-seed 5: method 'task_arithmetic' draws nothing at random; unused" in capsys.readouterr().err


# -- models named by a Hugging Face Hub id -------------------------------------------------------------------
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root: Path, repo_id: str, model: Path) -> Path:
    """`model`'s files in a Hub cache at `root`: blobs by content hash, a snapshot of links, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for f in model.iterdir():
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        os.symlink(Path("..", "..", "blobs", digest), snapshot / f.name)
    return root


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)


@pytest.mark.parametrize("name", ["org/tiny-b", "org/tiny-b@main", f"org/tiny-b@{REVISION}"])
def test_a_hub_id_is_read_from_the_local_cache(name, family, tmp_path, monkeypatch, offline):
    cache = _hub_cache(tmp_path / "hub", "org/tiny-b", family / "task_b")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    local = _config(tmp_path / "local.yaml", "task_arithmetic", [str(family / "task_a"), str(family / "task_b")],
                    str(family / "base"))
    hub = _config(tmp_path / "hub.yaml", "task_arithmetic", [str(family / "task_a"), name], str(family / "base"))
    assert main(["merge", str(local), str(tmp_path / "local_out"), "--quiet"]) == 0
    assert main(["merge", str(hub), str(tmp_path / "hub_out"), "--quiet"]) == 0
    _same(tmp_path / "local_out", tmp_path / "hub_out")


def test_transformers_cache_names_the_hub_cache(family, tmp_path, offline):
    cache = _hub_cache(tmp_path / "elsewhere", "org/tiny-b", family / "task_b")
    hub = _config(tmp_path / "hub.yaml", "task_arithmetic", [str(family / "task_a"), "org/tiny-b"], str(family / "base"))
    assert main(["merge", str(hub), str(tmp_path / "out"), "--quiet", "--transformers-cache", str(cache)]) == 0
    assert _merged(tmp_path / "out")


def test_a_hub_id_missing_offline_is_one_line_naming_it(family, tmp_path, capsys, monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    hub = _config(tmp_path / "hub.yaml", "task_arithmetic", [str(family / "task_a"), "org/absent@v2"], str(family / "base"))
    assert main(["merge", str(hub), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "'org/absent'" in err and "revision 'v2'" in err and "HF_HUB_OFFLINE" in err
    assert "huggingface-cli download org/absent --revision v2" in err
    assert not (tmp_path / "out").exists()


def test_a_hub_base_model_is_the_reference_whose_files_are_copied(family, tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "org/tiny-base", family / "base")))
    local = _config(tmp_path / "local.yaml", "task_arithmetic", [str(family / "task_a"), str(family / "task_b")],
                    str(family / "base"))
    hub = _config(tmp_path / "hub.yaml", "task_arithmetic", [str(family / "task_a"), str(family / "task_b")],
                  "org/tiny-base")
    assert main(["merge", str(local), str(tmp_path / "local_out"), "--quiet"]) == 0
    assert main(["merge", str(hub), str(tmp_path / "hub_out"), "--quiet"]) == 0
    _same(tmp_path / "local_out", tmp_path / "hub_out")
    assert json.loads((tmp_path / "hub_out" / "config.json").read_text())["model_type"] == "llama"  # via its blob
    assert "https://huggingface.co/org/tiny-base" in (tmp_path / "hub_out" / "README.md").read_text()
