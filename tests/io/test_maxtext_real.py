"""Against a real MaxText 0.2.5: checkpoints written by its own trainer are read, converted and merged, and
MaxText loads the merged checkpoint.

Optional: MaxText needs Python >= 3.12, which the project's environment need not be. Set
DRM_JAX_MAXTEXT_PYTHON to an interpreter with `maxtext==0.2.5` installed (README, "MaxText"); elsewhere
every test here skips. The interpreter runs MaxText's trainer on the CPU (synthetic data, a 2-layer
Llama-style model of width 16, 3 steps, a checkpoint after each) into pytest's tmp_path, and once more for
one step from the merged checkpoint (`load_parameters_path`). The training run's rotary embedding is
MaxText's LLaMA one (`rope_type=llama3.1` without the frequency scaling): the interleaved layout its converter
writes. The second run rotates halves (`rope_type=default`, MaxText's default), so its loss is that of the
merged checkpoint converted with `--maxtext-rope halves`: both layouts are checked against MaxText's forward.

MaxText's synthetic batch is drawn from PRNGKey(0) under its `unsafe_rbg` PRNG; the step-k loss MaxText
logs (`metrics_file`) is that of the parameters checkpointed at step k - 1, so the converted Hugging Face
model must give the same cross-entropy on the same tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from drm_jax.cli.main import main
from drm_jax.io import open_checkpoint
from drm_jax.io.detect import detect_format
from drm_jax.io.orbax_io import OrbaxReader

PYTHON_VARIABLE = "DRM_JAX_MAXTEXT_PYTHON"
VOCAB, WIDTH, MLP, LAYERS, HEADS, KV_HEADS, HEAD_DIM, LENGTH = 32, 16, 24, 2, 4, 2, 4, 16
MODEL = [f"vocab_size={VOCAB}", f"base_emb_dim={WIDTH}", f"base_mlp_dim={MLP}", f"base_num_decoder_layers={LAYERS}",
         f"base_num_query_heads={HEADS}", f"base_num_kv_heads={KV_HEADS}", f"head_dim={HEAD_DIM}", "dtype=float32"]
# MaxText's LLaMA rotary embedding (interleaved), without llama3.1's frequency scaling; "default" rotates halves
INTERLEAVED, HALVES = ("rope_type=llama3.1", "rope_use_scale=false"), ("rope_type=default",)
RUN = ["hardware=cpu", "skip_jax_distributed_system=true", "dataset_type=synthetic", "packing=false",
       "per_device_batch_size=1", f"max_target_length={LENGTH}", "attention=dot_product", "enable_tensorboard=false",
       "learning_rate=1e-2", "warmup_steps_fraction=0", "async_checkpointing=false"]
# MaxText's synthetic tokens, as its trainer draws them (maxtext/input_pipeline/synthetic_data_processing.py)
PROBE = f"""
import sys, importlib.metadata
try:
    version = importlib.metadata.version("maxtext")
except importlib.metadata.PackageNotFoundError:
    version = "absent"
if sys.version_info < (3, 12) or version != "0.2.5":
    sys.exit(print(sys.version_info >= (3, 12), version, "[]"))
import jax
jax.config.update("jax_default_prng_impl", "unsafe_rbg")
tokens = jax.random.randint(jax.random.PRNGKey(0), (1, {LENGTH + 1}), 0, {VOCAB}, dtype=jax.numpy.int32)
print(sys.version_info >= (3, 12), importlib.metadata.version("maxtext"), tokens.tolist())
"""


def _maxtext_python() -> str:
    python = os.environ.get(PYTHON_VARIABLE)
    if not python:
        pytest.skip(f"{PYTHON_VARIABLE} is not set (a Python >= 3.12 with maxtext 0.2.5 runs MaxText's trainer)")
    if not Path(python).is_file():
        pytest.skip(f"{PYTHON_VARIABLE}={python} is not a file")
    return python


def _run(python: str, args: list[str], cwd: Path) -> str:
    # MaxText's own environment: not this checkout's path, nor the test session's 8 host devices (XLA_FLAGS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "PYTHONPATH"))}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"{python} {' '.join(args[:3])}... exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def train(python: str, run_dir: Path, steps: int, *extra: str) -> list[float]:
    """MaxText's trainer, `steps` steps into `run_dir/<run>`; the loss it logged at each step."""
    metrics = run_dir / "metrics.txt"
    _run(python, ["-m", "maxtext.trainers.pre_train.train", "src/maxtext/configs/base.yml", "run_name=run",
                  f"base_output_directory={run_dir}", f"steps={steps}", f"metrics_file={metrics}", *MODEL, *RUN,
                  *extra], cwd=run_dir)
    return [json.loads(line)["learning/loss"] for line in metrics.read_text().splitlines()]


@pytest.fixture(scope="module")
def maxtext(tmp_path_factory):
    python = _maxtext_python()
    probe = _run(python, ["-c", PROBE], cwd=tmp_path_factory.mktemp("probe")).split(maxsplit=2)
    if probe[0] != "True" or probe[1] != "0.2.5":
        pytest.skip(f"{PYTHON_VARIABLE}={python} is Python >= 3.12: {probe[0]}, maxtext {probe[1]} (0.2.5 needed)")
    run_dir = tmp_path_factory.mktemp("maxtext")
    losses = train(python, run_dir, 3, *INTERLEAVED, "enable_checkpointing=true", "checkpoint_period=1")
    return python, run_dir / "run", np.array(json.loads(probe[2]))[0], losses


def cross_entropy(hf_dir: Path, tokens: np.ndarray) -> float:
    """Mean next-token cross-entropy of the Hugging Face model in `hf_dir` on `tokens`, in float64."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor(tokens[None])
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits.double()
    return float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]))


def test_maxtext_trainer_checkpoint_reads_its_parameters_only(maxtext):
    _, run, _, _ = maxtext
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0", "1", "2"]
    for path in (run, run / "checkpoints" / "1", run / "checkpoints" / "1" / "items"):
        assert detect_format(path) == "maxtext"
    with OrbaxReader(run / "checkpoints" / "2" / "items") as orbax:
        stored = orbax.get("params.params.decoder.layers.self_attention.query.kernel")
        assert stored.shape == (WIDTH, LAYERS, HEADS, HEAD_DIM)
        tops = {n.split(".")[0] for n in orbax.keys()}
        assert tops == {"params", "opt_state", "nnx_aux", "step"}, tops  # what the reader leaves alone
    with open_checkpoint(run) as reader:  # the latest step, 2
        names = reader.keys()
        assert len(names) == 3 + 9 * LAYERS
        assert not [n for n in names if n.startswith(("opt_state", "nnx_aux", "step", "params"))]
        assert reader.shape("decoder.layers.1.self_attention.query.kernel") == (WIDTH, HEADS * HEAD_DIM)
        assert reader.shape("decoder.layers.1.self_attention.key.kernel") == (WIDTH, KV_HEADS * HEAD_DIM)
        assert reader.shape("decoder.layers.0.self_attention.out.kernel") == (HEADS * HEAD_DIM, WIDTH)
        assert reader.shape("decoder.layers.0.mlp.wo.kernel") == (MLP, WIDTH)
        np.testing.assert_array_equal(reader.get("decoder.layers.1.self_attention.query.kernel"),
                                      stored[:, 1].reshape(WIDTH, HEADS * HEAD_DIM))


def test_maxtext_trainer_checkpoint_converts_to_the_model_maxtext_trained(maxtext, tmp_path):
    _, run, tokens, losses = maxtext
    out = tmp_path / "hf"
    assert main(["convert", str(run / "checkpoints" / "0"), str(out), "--to", "hf"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
            config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"], config["vocab_size"]) \
        == ("llama", LAYERS, WIDTH, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB)
    with open_checkpoint(out) as hf:
        assert hf.shape("model.layers.1.self_attn.q_proj.weight") == (HEADS * HEAD_DIM, WIDTH)
        assert hf.shape("model.layers.1.self_attn.k_proj.weight") == (KV_HEADS * HEAD_DIM, WIDTH)
        assert hf.shape("lm_head.weight") == (VOCAB, WIDTH)
    # step 1's loss is that of the parameters checkpointed at step 0
    np.testing.assert_allclose(cross_entropy(out, tokens), losses[1], rtol=2e-6)


def test_drm_merge_of_maxtext_checkpoints_is_one_maxtext_loads(maxtext, tmp_path):
    python, run, tokens, _ = maxtext
    steps = [run / "checkpoints" / s for s in ("0", "1", "2")]
    recipe = tmp_path / "drm.yaml"
    recipe.write_text(f"merge_method: drm\nbase_model: {steps[0]}\nmodels:\n"
                      + "".join(f"  - model: {s}\n" for s in steps[1:]))
    merged = tmp_path / "merged"
    assert main(["merge", str(recipe), str(merged), "--quiet", "--no-write-model-card"]) == 0
    items = merged / "0" / "items"
    assert detect_format(merged) == "maxtext" and (merged / "0" / "_CHECKPOINT_METADATA").is_file()
    with OrbaxReader(items) as written, OrbaxReader(steps[0] / "items") as source:
        assert {n: written.shape(n) for n in written.keys()} == \
               {n: source.shape(n) for n in source.keys() if n.startswith("params.params.")}
    with open_checkpoint(merged) as reader, open_checkpoint(steps[0]) as base:
        assert reader.keys() == base.keys()
        query = "decoder.layers.0.self_attention.query.kernel"
        assert np.isfinite(reader.get(query)).all() and not np.array_equal(reader.get(query), base.get(query))
    # MaxText loads the merged parameters and its loss on them is the converted model's (rotating halves)
    assert main(["convert", str(merged), str(tmp_path / "merged-hf"), "--to", "hf", "--maxtext-rope", "halves"]) == 0
    second = tmp_path / "second"
    second.mkdir()
    losses = train(python, second, 1, *HALVES, "enable_checkpointing=false", f"load_parameters_path={items}")
    np.testing.assert_allclose(cross_entropy(tmp_path / "merged-hf", tokens), losses[0], rtol=2e-6)
