"""`drm-jax extract-lora` / `drm_jax.extract_lora`: PEFT loads the adapter, full rank is exact, rank R
agrees with mergekit-extract-lora, and bad input is refused in one line with nothing written.

Tiny Llama (untied head) and GPT-2 (Conv1D weights stored (in, out), tied head, biases) checkpoints
with random weights, the fine-tuned one the base plus noise, built from transformers configs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from drm_jax import extract_lora
from drm_jax.cli.main import main
from drm_jax.errors import MergeInputError
from drm_jax.io import open_checkpoint
from drm_jax.math.truncated_svd import split_spectrum, truncated_svd

FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig",
              dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)),
}
FULL_RANK = 32  # the largest min(out, in) of both families' linear weights


def _save_pair(root: Path, family: str) -> Path:
    torch = pytest.importorskip("torch")
    import transformers

    model_class, config_class, options = FAMILIES[family]
    config = getattr(transformers, config_class)(**options)
    torch.manual_seed(0)
    base = getattr(transformers, model_class)(config).eval()
    base.save_pretrained(root / "base")
    generator = torch.Generator().manual_seed(1)
    tuned = getattr(transformers, model_class)(config).eval()
    tuned.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=generator)
                           for k, v in base.state_dict().items()})
    tuned.save_pretrained(root / "finetuned")
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return {family: _save_pair(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


def _weights(directory: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(directory) as reader:
        return {name: np.asarray(reader.get(name), np.float64) for name in reader.keys()}


def _peft_merged(pair: Path, adapter: Path) -> dict[str, np.ndarray]:
    """The base model with the adapter loaded by PEFT and merged in; fails on any missing or unused key."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pair / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapter)
    key_problems = [str(w.message) for w in caught if "keys" in str(w.message)]
    assert not key_problems, key_problems
    merged = peft_model.merge_and_unload()
    return {k: v.detach().double().numpy() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_rank_reconstructs_every_delta(family, pairs, tmp_path):
    pair = pairs[family]
    assert main(["extract-lora", str(pair / "finetuned"), str(pair / "base"), str(tmp_path / "lora"),
                 "--max-rank", str(FULL_RANK)]) == 0
    finetuned = _weights(pair / "finetuned")
    merged = _peft_merged(pair, tmp_path / "lora")
    for name, weight in finetuned.items():
        np.testing.assert_allclose(merged[name], weight, rtol=0, atol=1e-5, err_msg=name)
    if family == "gpt2":  # the tied head follows the fine-tuned embedding, not the base's
        np.testing.assert_allclose(merged["lm_head.weight"], finetuned["transformer.wte.weight"], atol=1e-6)
    if family == "gpt2":
        return  # drm_jax's PeftReader refuses a saved tensor the base lacks (the tied lm_head)
    with open_checkpoint(tmp_path / "lora", base=pair / "base") as adapted:
        for name in adapted.keys():
            if name in finetuned:
                np.testing.assert_allclose(adapted.get(name), finetuned[name], atol=1e-5, err_msg=name)


def test_gpt2_conv1d_is_factored_in_its_layout(pairs, tmp_path):
    """Conv1D stores (in, out): the factors are PEFT's fan_in_fan_out ones, A (r, in) and B (out, r)."""
    pair = pairs["gpt2"]
    result = extract_lora(pair / "finetuned", pair / "base", tmp_path / "lora", max_rank=8)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["lora_bias"] is True
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
    assert set(config["modules_to_save"]) == {"wte", "wpe", "ln_1", "ln_2", "ln_f", "lm_head"}
    assert set(result.ranks.values()) == {8}
    with open_checkpoint(tmp_path / "lora" / "adapter_model.safetensors") as adapter:
        prefix = "base_model.model.transformer.h.0.mlp.c_fc"
        assert adapter.shape(f"{prefix}.lora_A.weight") == (8, 32)  # c_fc weight is (32, 128) = (in, out)
        assert adapter.shape(f"{prefix}.lora_B.weight") == (128, 8)
        assert adapter.shape(f"{prefix}.lora_B.bias") == (128,)


def test_buffers_are_left_out(pairs, tmp_path):
    """GPT-2 checkpoints saved by older transformers hold the causal mask `attn.bias` (a module without a
    weight): it is left out, as mergekit does, so its module does not land in modules_to_save."""
    from safetensors.numpy import load_file, save_file

    pair = pairs["gpt2"]
    for model in ("base", "finetuned"):
        shutil.copytree(pair / model, tmp_path / model)
        tensors = load_file(str(tmp_path / model / "model.safetensors"))
        tensors["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        save_file(tensors, str(tmp_path / model / "model.safetensors"), metadata={"format": "pt"})
    result = extract_lora(tmp_path / "finetuned", tmp_path / "base", tmp_path / "lora", max_rank=8)
    assert result.skipped == ("transformer.h.0.attn.bias",)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert "attn" not in config["modules_to_save"]


def _best_rank(delta: np.ndarray, rank: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_rank_r_is_the_truncated_svd_of_each_delta(pairs, tmp_path):
    pair = pairs["llama"]
    extract_lora(pair / "finetuned", pair / "base", tmp_path / "lora", max_rank=8)
    finetuned, base = _weights(pair / "finetuned"), _weights(pair / "base")
    merged = _peft_merged(pair, tmp_path / "lora")
    name = "model.layers.1.mlp.down_proj.weight"
    best = _best_rank(finetuned[name] - base[name], 8)
    np.testing.assert_allclose(merged[name] - base[name], best, atol=1e-5)


def test_sv_epsilon_cuts_each_module_where_the_singular_values_fall(pairs, tmp_path):
    """sv_epsilon keeps the singular values above that fraction of the largest; absolute_sv_epsilon is
    mergekit's rule (above the value itself); at most max_rank. Ranks that differ go to rank_pattern."""
    pair = pairs["llama"]
    finetuned, base = _weights(pair / "finetuned"), _weights(pair / "base")
    for option, value in (("absolute_sv_epsilon", 0.09), ("sv_epsilon", 0.45)):
        out = tmp_path / option
        result = extract_lora(pair / "finetuned", pair / "base", out, max_rank=FULL_RANK, **{option: value})
        config = json.loads((out / "adapter_config.json").read_text())
        for module, rank in result.ranks.items():
            s = np.linalg.svd(finetuned[f"{module}.weight"] - base[f"{module}.weight"], compute_uv=False)
            threshold = value if option == "absolute_sv_epsilon" else value * s[0]
            assert rank == max(1, int(np.sum(s > threshold))), module
            assert config["rank_pattern"].get(module, config["r"]) == rank
            assert config["alpha_pattern"].get(module, config["lora_alpha"]) == rank  # scaling 1
        assert len(set(result.ranks.values())) > 1  # the cut differs between modules
        _peft_merged(pair, out)  # loads, no key left over or missing


def test_chunks_and_padding_change_nothing(pairs, tmp_path):
    """Decomposing one matrix per chunk, or odd chunks padded with zeros, gives the same factors."""
    pair = pairs["llama"]
    extract_lora(pair / "finetuned", pair / "base", tmp_path / "one", max_rank=8)
    extract_lora(pair / "finetuned", pair / "base", tmp_path / "small", max_rank=8, chunk_bytes=4 * 32 * 48)
    one, small = (_weights(tmp_path / d / "adapter_model.safetensors") for d in ("one", "small"))
    assert set(one) == set(small)
    for name in one:
        np.testing.assert_allclose(small[name], one[name], atol=1e-6, err_msg=name)


def test_embed_lora_factors_embeddings_too(pairs, tmp_path):
    pair = pairs["llama"]
    extract_lora(pair / "finetuned", pair / "base", tmp_path / "lora", max_rank=FULL_RANK, embed_lora=True)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert {"embed_tokens", "lm_head"} <= set(config["target_modules"])
    assert "embed_tokens" not in (config["modules_to_save"] or [])
    merged, finetuned = _peft_merged(pair, tmp_path / "lora"), _weights(pair / "finetuned")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        np.testing.assert_allclose(merged[name], finetuned[name], atol=1e-5, err_msg=name)


@pytest.mark.optional
def test_agrees_with_mergekit_extract_lora(pairs, tmp_path, monkeypatch):
    """The same rank-8 adapter as mergekit 0.1.5 (Llama; mergekit saves GPT-2's Conv1D whole and then
    fails on an adapter with no LoRA module). Both are float32 SVDs of the same delta: the reconstructed
    deltas agree to 1e-4 of the delta's norm (measured: below 1e-5), far above float32 rounding and far
    below the gap between consecutive singular values of these deltas."""
    pytest.importorskip("mergekit")
    from mergekit.scripts import extract_lora as mergekit_extract

    monkeypatch.setattr(mergekit_extract, "generate_card_lora", lambda *args, **kwargs: "")  # no hub lookup
    pair = pairs["llama"]
    mergekit_extract.main.main(["--model", str(pair / "finetuned"), "--base-model", str(pair / "base"),
                                "--out-path", str(tmp_path / "mergekit"), "--max-rank", "8"], standalone_mode=False)
    assert main(["extract-lora", str(pair / "finetuned"), str(pair / "base"), str(tmp_path / "ours"),
                 "--max-rank", "8"]) == 0
    theirs_config = json.loads((tmp_path / "mergekit" / "adapter_config.json").read_text())
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "rank_pattern", "fan_in_fan_out"):
        assert ours_config[field] == theirs_config[field], field
    for field in ("target_modules", "modules_to_save"):
        assert sorted(ours_config[field]) == sorted(theirs_config[field]), field
    finetuned, base = _weights(pair / "finetuned"), _weights(pair / "base")
    theirs, ours = _peft_merged(pair, tmp_path / "mergekit"), _peft_merged(pair, tmp_path / "ours")
    for name in finetuned:
        scale = np.linalg.norm(finetuned[name] - base[name])
        assert np.linalg.norm(ours[name] - theirs[name]) <= 1e-4 * scale, name


def test_randomized_route_against_float64_svd():
    """The randomized route on deltas with a decaying spectrum (S_j = 1 / j): its rank-8 error is within
    1e-3 of the optimal (float64 SVD) and its singular values within 1e-4 of the largest."""
    rng = np.random.default_rng(0)
    n, m, rank = 128, 192, 8
    stack = []
    for _ in range(2):
        u, _ = np.linalg.qr(rng.standard_normal((n, n)))
        v, _ = np.linalg.qr(rng.standard_normal((m, n)))
        stack.append((u / np.arange(1, n + 1)) @ v.T)
    stack = np.stack(stack)

    def decompose(x):
        u, s, vh = truncated_svd(x, rank, route="randomized")
        return (*split_spectrum(u, s, vh), s)

    b, a, s = jax.jit(decompose)(stack.astype(np.float32))
    for i, delta in enumerate(stack):
        exact = np.linalg.svd(delta, compute_uv=False)
        optimal = np.linalg.norm(exact[rank:])
        error = np.linalg.norm(delta - np.asarray(b[i], np.float64) @ np.asarray(a[i], np.float64))
        assert error <= (1 + 1e-3) * optimal
        assert np.max(np.abs(np.asarray(s[i]) - exact[:rank])) <= 1e-4 * exact[0]


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _broken_base(pair: Path, root: Path, edit) -> Path:
    from safetensors.numpy import load_file, save_file

    broken = root / "broken_base"
    shutil.copytree(pair / "base", broken)
    tensors = load_file(str(broken / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    return broken


BAD_INPUTS = {
    "shape mismatch": (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", np.zeros((48, 16), np.float32)),
                       [], "model.layers.0.mlp.up_proj.weight"),
    "missing tensor": (lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"), [],
                       "model.layers.1.self_attn.v_proj.weight"),
    # found while decomposing, with the adapter half written: the temporary directory goes
    "NaN in a delta": (lambda t: t["model.layers.1.mlp.gate_proj.weight"].__setitem__((0, 0), np.nan), [],
                       "model.layers.1.mlp.gate_proj.weight"),
    "rank 0": (None, ["--max-rank", "0"], "max_rank"),
    "absurd rank": (None, ["--max-rank", "1000000"], "max_rank 1000000"),
    "negative epsilon": (None, ["--absolute-sv-epsilon", "-1"], "absolute_sv_epsilon"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, pairs, tmp_path, capsys):
    edit, options, named = BAD_INPUTS[case]
    pair = pairs["llama"]
    base = _broken_base(pair, tmp_path, edit) if edit else pair / "base"
    before = (_digest(pair / "finetuned"), _digest(base))
    options = options if "--max-rank" in options else ["--max-rank", "4", *options]
    code = main(["extract-lora", str(pair / "finetuned"), str(base), str(tmp_path / "out"), *options])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and named in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert (_digest(pair / "finetuned"), _digest(base)) == before


def test_api_errors_are_drm_jax_errors(pairs, tmp_path):
    pair = pairs["gpt2"]
    with pytest.raises(MergeInputError, match="embed_lora"):  # PEFT cannot load lora_bias on embeddings
        extract_lora(pair / "finetuned", pair / "base", tmp_path / "out", max_rank=4, embed_lora=True)
    with pytest.raises(MergeInputError, match="max_rank"):
        extract_lora(pair / "finetuned", pair / "base", tmp_path / "out", max_rank=2.5)
    assert not (tmp_path / "out").exists()


def test_output_over_an_input_or_a_full_directory_is_refused(pairs, tmp_path, capsys):
    pair = pairs["llama"]
    before = _digest(pair / "finetuned")
    for out in (pair / "finetuned", pair / "finetuned" / "lora"):
        assert main(["extract-lora", str(pair / "finetuned"), str(pair / "base"), str(out), "--max-rank", "8"]) == 2
        assert "overlaps the input" in capsys.readouterr().err
    assert _digest(pair / "finetuned") == before
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    args = ["extract-lora", str(pair / "finetuned"), str(pair / "base"), str(tmp_path / "full"), "--max-rank", "8"]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "full" / "keep.txt").exists()
    assert main([*args, "--overwrite"]) == 2  # --overwrite replaces only an earlier output, never a user's files
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    earlier = ["extract-lora", str(pair / "finetuned"), str(pair / "base"), str(tmp_path / "earlier"), "--max-rank", "8"]
    assert main(earlier) == 0
    assert main([*earlier, "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "earlier").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
