"""MaxText checkpoints in and out: read (scanned or not, parameters only), converted to and from Hugging Face
Llama, merged in MaxText's own layout.

The MaxText checkpoints are built here, as MaxText 0.2.5 writes them: a tiny random transformers Llama's
weights through MaxText's Llama transforms (restated below from its converter's documented behaviour: names,
kernels transposed with the head axes unfolded, the query scaled by 1/sqrt(head_dim), q and k interleaved
for its rotary layout, layers stacked on axis 1), saved by Orbax's CheckpointManager as
`<run>/checkpoints/<step>/items` with `_CHECKPOINT_METADATA`, beside an Optax `opt_state` list, RNG state and
`step`. Checkpoints written by a real MaxText 0.2.5 are tested in test_maxtext_real.py (optional: it needs
a Python >= 3.12 with maxtext, named by DRM_JAX_MAXTEXT_PYTHON).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from drm_jax.cli.main import main
from drm_jax.io import open_checkpoint, write_checkpoint
from drm_jax.io.detect import detect_format
from drm_jax.io.orbax_io import OrbaxReader

HF_TO_MT_LAYER = {
    "self_attn.q_proj.weight": "self_attention.query.kernel",
    "self_attn.k_proj.weight": "self_attention.key.kernel",
    "self_attn.v_proj.weight": "self_attention.value.kernel",
    "self_attn.o_proj.weight": "self_attention.out.kernel",
    "mlp.gate_proj.weight": "mlp.wi_0.kernel",
    "mlp.up_proj.weight": "mlp.wi_1.kernel",
    "mlp.down_proj.weight": "mlp.wo.kernel",
    "input_layernorm.weight": "pre_self_attention_layer_norm.scale",
    "post_attention_layernorm.weight": "post_self_attention_layer_norm.scale",
}


def _hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(directory) as reader:
        return {name: reader.get(name) for name in reader.keys()}


def _maxtext_layer(tail: str, hf: np.ndarray, config: dict, interleaved: bool = True) -> np.ndarray:
    """One layer's MaxText leaf from its Hugging Face weight (MaxText's Llama hooks, to MaxText); the rotary
    permutation only for MaxText's interleaved (LLaMA) rotary layout."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    if tail.endswith("scale"):
        return hf
    kernel = hf.T
    if tail == "self_attention.out.kernel":
        return kernel.reshape(heads, head_dim, -1)
    if tail in ("self_attention.query.kernel", "self_attention.key.kernel", "self_attention.value.kernel"):
        count = heads if tail == "self_attention.query.kernel" else kv
        kernel = kernel.reshape(kernel.shape[0], count, head_dim)
        if interleaved and tail != "self_attention.value.kernel":  # rotary: halves -> interleaved pairs
            half = head_dim // 2
            kernel = np.stack([kernel[..., :half], kernel[..., half:]], axis=-1).reshape(kernel.shape)
        if tail == "self_attention.query.kernel":
            kernel = (kernel.astype(np.float32) * np.float32(1 / np.sqrt(head_dim))).astype(hf.dtype)
    return kernel


def maxtext_params(hf: dict[str, np.ndarray], config: dict, scanned: bool = True, interleaved: bool = True) -> dict:
    """The `params.params` tree MaxText holds for Hugging Face Llama tensors `hf`."""
    layers = config["num_hidden_layers"]
    per_layer = {tail: [_maxtext_layer(tail, hf[f"model.layers.{i}.{name}"], config, interleaved)
                        for i in range(layers)]
                 for name, tail in HF_TO_MT_LAYER.items()}
    decoder: dict = {"decoder_norm": {"scale": hf["model.norm.weight"]},
                     "logits_dense": {"kernel": hf["lm_head.weight"].T}}
    for tail, arrays in per_layer.items():
        for i, array in enumerate(arrays):
            key = "layers" if scanned else f"layers_{i}"
            node = decoder.setdefault(key, {})
            *path, leaf = tail.split(".")
            for part in path:
                node = node.setdefault(part, {})
            if scanned:
                node[leaf] = np.stack(arrays, axis=1)
                break
            node[leaf] = array
    return {"token_embedder": {"embedding": hf["model.embed_tokens.weight"]}, "decoder": decoder}


def save_maxtext_run(run: Path, params: dict, step: int = 2) -> Path:
    """A MaxText training checkpoint: params, an Adam `opt_state` list, RNG state and step, at `step`."""
    import jax
    import orbax.checkpoint as ocp

    zeros = jax.tree_util.tree_map(np.zeros_like, params)
    tree = {"params": {"params": params},
            "opt_state": [{"count": np.int32(step), "mu": {"params": zeros}, "nu": {"params": zeros}}, None],
            "nnx_aux": {"rngs": {"params": {"key": np.array([0, 42], np.uint32), "count": np.uint32(3)}}},
            "step": np.int32(step)}
    manager = ocp.CheckpointManager(Path(run).absolute() / "checkpoints", item_names=("items",))
    manager.save(step, args=ocp.args.Composite(items=ocp.args.PyTreeSave(tree)))
    manager.wait_until_finished()
    manager.close()
    return run


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


@pytest.fixture(scope="module")
def llama(hf_model):
    directory, _ = hf_model("llama")
    return directory, _hf_tensors(directory), json.loads((directory / "config.json").read_text())


def test_maxtext_run_is_detected_and_only_its_parameters_are_read(llama, tmp_path):
    directory, hf, config = llama
    run = save_maxtext_run(tmp_path / "run", maxtext_params(hf, config))
    for path in (run, run / "checkpoints" / "2", run / "checkpoints" / "2" / "items"):
        assert detect_format(path) == "maxtext"
    with open_checkpoint(run) as reader:
        names = reader.keys()
        assert not [n for n in names if "opt_state" in n or "nnx_aux" in n or n == "step"]
        assert "decoder.layers.1.self_attention.query.kernel" in names
        # one layer of the scanned query (emb, L, heads, head_dim) as the matrix (emb, heads * head_dim)
        query = reader.get("decoder.layers.1.self_attention.query.kernel")
        assert query.shape == (16, 16)
        stored = maxtext_params(hf, config)["decoder"]["layers"]["self_attention"]["query"]["kernel"]
        np.testing.assert_array_equal(query, stored[:, 1].reshape(16, 16))
        assert reader.shape("decoder.layers.0.self_attention.out.kernel") == (16, 16)
        assert reader.shape("decoder.layers.0.pre_self_attention_layer_norm.scale") == (16,)
    # the Optax state (a list of states) reads in any Orbax checkpoint, the RNG state and step too
    with OrbaxReader(run / "checkpoints") as orbax:
        np.testing.assert_array_equal(orbax.get("opt_state.0.count"), 2)
        assert orbax.get("opt_state.0.mu.params.decoder.layers.mlp.wo.kernel").shape == (24, 2, 16)
        np.testing.assert_array_equal(orbax.get("nnx_aux.rngs.params.key"), [0, 42])
        np.testing.assert_array_equal(orbax.get("step"), 2)


@pytest.mark.parametrize("scanned", [True, False])
def test_convert_to_hf_gives_back_the_tensors_and_the_logits(llama, tmp_path, capsys, scanned, hf_model,
                                                             model_logits):
    directory, hf, config = llama
    run = save_maxtext_run(tmp_path / "run", maxtext_params(hf, config, scanned))
    out = tmp_path / "hf"
    assert main(["convert", str(run), str(out), "--to", "hf", "--rms-norm-eps", str(config["rms_norm_eps"])]) == 0
    printed = capsys.readouterr().out
    assert "rope_theta" in printed and "rms_norm_eps" not in printed.split("config.json:")[1]
    back = _hf_tensors(out)
    assert sorted(back) == sorted(hf)
    for name, array in hf.items():
        assert back[name].dtype == array.dtype
        np.testing.assert_array_equal(back[name], array, err_msg=name)
    written = json.loads((out / "config.json").read_text())
    assert (written["num_key_value_heads"], written["head_dim"], written["num_hidden_layers"]) == (2, 4, 2)
    _, model_cls = hf_model("llama")
    original = model_logits(model_cls.from_pretrained(directory).eval(), "llama")
    converted = model_logits(model_cls.from_pretrained(out).eval(), "llama")
    np.testing.assert_array_equal(converted, original)


@pytest.mark.parametrize("scanned", [True, False])
def test_hf_to_maxtext_is_maxtexts_tree_and_back_is_exact(llama, tmp_path, scanned):
    directory, hf, config = llama
    flags = [] if scanned else ["--no-scan-layers"]
    assert main(["convert", str(directory), str(tmp_path / "mt"), "--to", "maxtext", *flags]) == 0
    items = tmp_path / "mt" / "0" / "items"
    assert (tmp_path / "mt" / "0" / "_CHECKPOINT_METADATA").is_file()
    want = {f"params.params.{k}": v for k, v in _flat(maxtext_params(hf, config, scanned)).items()}
    with OrbaxReader(items) as written:
        assert sorted(written.keys()) == sorted(want)
        for name, array in want.items():
            np.testing.assert_array_equal(written.get(name), array, err_msg=name)
    assert main(["convert", str(tmp_path / "mt"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = _hf_tensors(tmp_path / "back")
    assert sorted(back) == sorted(hf)
    for name, array in hf.items():
        np.testing.assert_array_equal(back[name], array, err_msg=name)


def test_a_run_that_rotates_halves_converts_without_the_permutation(llama, tmp_path):
    # MaxText's default rotary embedding (rope_type "default") rotates halves, as Hugging Face does
    directory, hf, config = llama
    halves = maxtext_params(hf, config, interleaved=False)
    run = save_maxtext_run(tmp_path / "run", halves)
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf", "--maxtext-rope", "halves"]) == 0
    back = _hf_tensors(tmp_path / "hf")
    assert sorted(back) == sorted(hf)
    for name, array in hf.items():
        np.testing.assert_array_equal(back[name], array, err_msg=name)
    assert main(["convert", str(directory), str(tmp_path / "mt"), "--to", "maxtext", "--maxtext-rope", "halves"]) == 0
    with OrbaxReader(tmp_path / "mt" / "0" / "items") as written:
        for name, array in _flat(halves).items():
            np.testing.assert_array_equal(written.get(f"params.params.{name}"), array, err_msg=name)
    # the default (interleaved) layout reads the same run with the key's head dimensions permuted
    assert main(["convert", str(run), str(tmp_path / "hf-interleaved"), "--to", "hf"]) == 0
    key = "model.layers.0.self_attn.k_proj.weight"
    assert not np.array_equal(_hf_tensors(tmp_path / "hf-interleaved")[key], hf[key])


def _finetuned(hf: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (a + 0.05 * rng.standard_normal(a.shape)).astype(a.dtype) for n, a in hf.items()}


def test_drm_merge_of_maxtext_checkpoints_is_the_hf_merge_mapped(tmp_path):
    # every linear weight (16, 16): one compiled DRM program per form keeps the test fast
    config = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 12, "rms_norm_eps": 1e-5}
    rng = np.random.default_rng(7)
    shapes = {"model.embed_tokens.weight": (12, 16), "model.norm.weight": (16,), "lm_head.weight": (12, 16)}
    for i in range(2):
        shapes.update({f"model.layers.{i}.{name}": (16,) if name.endswith("layernorm.weight") else (16, 16)
                       for name in HF_TO_MT_LAYER})
    hf = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    hf_dirs, mt_dirs = [], []
    for label, tensors in [("base", hf)] + [(f"m{s}", _finetuned(hf, s)) for s in (1, 2, 3)]:
        hf_dir = write_checkpoint(tensors, tmp_path / f"hf-{label}")
        (hf_dir / "config.json").write_text(json.dumps(config))
        hf_dirs.append(hf_dir)
        mt_dirs.append(save_maxtext_run(tmp_path / f"mt-{label}", maxtext_params(tensors, config)))

    def merge(dirs, out):
        recipe = tmp_path / f"{out}.yaml"
        recipe.write_text(f"merge_method: drm\nbase_model: {dirs[0]}\nmodels:\n"
                          + "".join(f"  - model: {d}\n" for d in dirs[1:]))
        assert main(["merge", str(recipe), str(tmp_path / out), "--quiet", "--no-write-model-card"]) == 0
        return tmp_path / out

    merged_hf = _hf_tensors(merge(hf_dirs, "merged-hf"))
    merged_mt = merge(mt_dirs, "merged-mt")
    assert detect_format(merged_mt) == "maxtext" and (merged_mt / "0" / "items").is_dir()
    # the same tree as the inputs', scanned
    with OrbaxReader(merged_mt / "0" / "items") as written, OrbaxReader(mt_dirs[0] / "checkpoints") as source:
        assert {n: written.shape(n) for n in written.keys()} == \
               {n: source.shape(n) for n in source.keys() if n.startswith("params.params.")}
    assert main(["convert", str(merged_mt), str(tmp_path / "merged-mt-hf"), "--to", "hf"]) == 0
    mapped = _hf_tensors(tmp_path / "merged-mt-hf")
    assert sorted(mapped) == sorted(merged_hf)
    for name, array in merged_hf.items():
        assert not np.array_equal(array, hf[name]) or name.endswith("norm.weight")
        np.testing.assert_allclose(mapped[name], array, rtol=1e-5, atol=1e-6, err_msg=name)


def test_convert_refuses_a_kernel_no_table_places(llama, tmp_path, capsys):
    _, hf, config = llama
    params = maxtext_params(hf, config)
    params["decoder"]["layers"]["moe"] = {"gate": {"kernel": np.zeros((16, 2, 4, 3), np.float32)}}
    run = save_maxtext_run(tmp_path / "run", params)
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decoder.layers.0.moe.gate.kernel" in err[0]
    assert not (tmp_path / "hf").exists()


def test_a_scanned_leaf_without_the_layer_axis_is_refused(llama, tmp_path, capsys):
    _, hf, config = llama
    params = maxtext_params(hf, config)
    params["decoder"]["layers"]["post_self_attention_layer_norm"]["scale"] = np.ones((16, 3), np.float32)
    run = save_maxtext_run(tmp_path / "run", params)
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layer axis" in err[0] and "params.params.decoder.layers." in err[0]
    assert not (tmp_path / "hf").exists()


def test_drm_merge_without_a_decomposed_leaf_says_so(tmp_path, capsys):
    rng = np.random.default_rng(0)
    dirs = []
    for label in ("base", "a", "b"):
        tensors = {"blocks.0.conv.weight": rng.standard_normal((3, 2, 2)).astype(np.float32),
                   "blocks.0.norm.weight": rng.standard_normal(3).astype(np.float32)}
        dirs.append(write_checkpoint(tensors, tmp_path / label))
    recipe = tmp_path / "drm.yaml"
    recipe.write_text(f"merge_method: drm\nbase_model: {dirs[0]}\nmodels:\n  - model: {dirs[1]}\n"
                      f"  - model: {dirs[2]}\n")
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet", "--no-write-model-card"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "decomposition" in line]
    assert len(warning) == 1 and "merge_method drm" in warning[0]
    recipe.write_text(recipe.read_text().replace("merge_method: drm", "merge_method: task_arithmetic"))
    assert main(["merge", str(recipe), str(tmp_path / "out2"), "--quiet", "--no-write-model-card"]) == 0
    assert "decomposition" not in capsys.readouterr().err


def test_orbax_leaves_inside_lists_and_tuples_read(tmp_path):
    # Optax's state is a tuple of named tuples, with empty states (None) between them
    import orbax.checkpoint as ocp

    tree = {"opt_state": [{"mu": {"k": np.arange(3.0)}}, None, (np.ones(2), {"z": np.full(1, 5.0)})],
            "params": {"w": np.arange(4.0)}}
    ocp.PyTreeCheckpointer().save((tmp_path / "ckpt").absolute(), tree)
    with OrbaxReader(tmp_path / "ckpt") as reader:
        assert reader.keys() == ["opt_state.0.mu.k", "opt_state.2.0", "opt_state.2.1.z", "params.w"]
        np.testing.assert_array_equal(reader.get("opt_state.0.mu.k"), np.arange(3.0))
        np.testing.assert_array_equal(reader.get("opt_state.2.0"), np.ones(2))
        np.testing.assert_array_equal(reader.get("opt_state.2.1.z"), [5.0])
        np.testing.assert_array_equal(reader.get("params.w"), np.arange(4.0))
