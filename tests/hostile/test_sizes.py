"""A few bytes that would cost hours or all memory (issue 23, class 4): a backtracking rank_pattern, a
padding or rank no matrix has, thousands of models, a quadratic vocabulary union. Each is matched in
bounded time, or refused in one line before anything is allocated."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from .conftest import TASKS, lora_adapter_dir, refused, write_merge_config

# -- user patterns: bounded time ---------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["(.*)*Z", "(a|a)*Z", ".*.*.*.*.*.*.*.*Z", "(x+x+)+y"])
def test_backtracking_rank_pattern_is_matched_in_bounded_time(tmp_path, key):
    from drm_jax.io.peft_io import PeftReader

    adapter = lora_adapter_dir(tmp_path, rank_pattern={key: 8, "q_pr.j": 4})
    reader = PeftReader(adapter)
    module = "model.layers.0.self_attn.q_proj" + "a" * 60  # the backtracking engine's worst case
    started = time.monotonic()
    try:
        assert reader.scaling(module) == 2 / 2  # neither key matches: lora_alpha / r
        assert reader.scaling("model.layers.0.self_attn.q_proj") == 2 / 4  # PEFT: the first key that matches
    finally:
        reader.close()
    assert time.monotonic() - started < 2  # re.match takes hours on the first name


def test_bounded_patterns_mean_what_re_means():
    from drm_jax.io.bounded_regex import BoundedPattern

    names = ["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "q_proj", "", "a.b", "x" * 30,
             "model.layers.3.self_attn.v_proj\n", "encoder.block.1.layer.0.SelfAttention.q"]
    keys = ["q_proj", r"layers\.\d+\.mlp.*", "model.layers.[0-5].self_attn.v_proj", "a|b", r"\bq_proj", "v_pr.j$",
            "x{2,5}", "x{30}", "(x|xx)+", ".*", "a)|(b", r"layers\.1[01]?\..*", "(?i:Q_PROJ)", "[^.]*", "q?_?proj"]
    for key in keys:
        pattern = rf"(.*\.)?({key})$"
        bounded = BoundedPattern(pattern)
        for name in names:
            assert bounded.match(name) == (re.match(pattern, name) is not None), (key, name)


@pytest.mark.parametrize("key, needle", [
    (r"(a)\1", "backreferences"),
    ("(?=q)q_proj", "lookarounds"),
    ("x{100000}", "repeat count"),
    ("(" * 5000 + ")" * 5000, "longer than"),
])
def test_pattern_without_a_bounded_match_is_refused_in_one_line(family, tmp_path, capfd, key, needle):
    adapter = lora_adapter_dir(tmp_path, alpha_pattern={key: 4})
    config = write_merge_config(tmp_path, family / "base", family / TASKS[0], f"{family / 'base'}+{adapter}")
    out = tmp_path / "out"
    refused(capfd, ["merge", config, out], out, [config, family, adapter],
            ["adapter_config.json", "alpha_pattern", needle])


# -- sizes no matrix has -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [10**13, 2**16 + 1])
def test_padding_past_any_vocabulary_is_refused_up_front(family, tmp_path, capfd, pad):
    config = write_merge_config(tmp_path, family / "base", family / TASKS[0], family / TASKS[1],
                                extra=f"tokenizer: {{source: base, pad_to_multiple_of: {pad}}}\n")
    out = tmp_path / "out"
    line = refused(capfd, ["merge", config, out], out, [config, family], ["tokenizer.pad_to_multiple_of", str(pad)])
    assert "at most 65536" in line


@pytest.mark.parametrize("rank", [10**12, 17])
def test_adapter_rank_past_every_weight_is_refused(family, tmp_path, capfd, rank):
    adapters = [lora_adapter_dir(tmp_path, f"adapter{t}") for t in range(2)]
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {family / 'base'}\nmodels:\n"
                      + "".join(f"  - model: {a}\n" for a in adapters))
    out = tmp_path / "out"
    line = refused(capfd, ["merge", config, out, "--adapter-out", "--adapter-rank", str(rank)], out,
                   [config, family, *adapters], ["rank", str(rank)[:12]])
    assert "at most 16" in line


def test_api_rank_past_every_weight_raises_naming_rank():
    import drm_jax
    from drm_jax import LoraWeight
    from drm_jax.errors import DrmJaxError

    base = {"w": np.zeros((6, 4), np.float32)}
    adapters = [{"w": LoraWeight(np.ones((6, 2), np.float32), np.ones((2, 4), np.float32))}] * 2
    for rank in (5, 10**12):
        with pytest.raises(DrmJaxError, match=rf"rank {rank}.*at most 4"):
            drm_jax.merge_adapters(base, adapters, method="task_arithmetic", rank=rank)


@pytest.mark.parametrize("where", ["models", "slices"])
def test_thousands_of_models_are_refused_up_front(family, tmp_path, capfd, where):
    from drm_jax.config.schema import MAX_MODELS

    count = 10_000 if where == "models" else MAX_MODELS + 1
    model = family / TASKS[0]
    if where == "models":  # relative paths (to the config's directory) keep the config under its size limit
        text = "merge_method: linear\nmodels:\n" + f"  - model: {model.relative_to(tmp_path)}\n" * count
        key = "models"
    else:
        text = ("merge_method: linear\nslices:\n  - sources:\n"
                + f"      - model: {model}\n        layer_range: [0, 1]\n        parameters: {{weight: 1.0}}\n" * count)
        key = "slices[0].sources"
    config = tmp_path / "merge.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    started = time.monotonic()
    line = refused(capfd, ["merge", config, out], out, [config, family], [key, str(count), f"at most {MAX_MODELS}"])
    assert len(line) < 500 and time.monotonic() - started < 10


# -- vocabulary union: linear ------------------------------------------------------------------------------
def _word_tokenizer(prefix: str, size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>"] + [f"{prefix}{i}" for i in range(1, size)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_union_of_two_large_vocabularies_is_linear(monkeypatch):
    from transformers import PreTrainedTokenizerBase

    from drm_jax.config.vocabulary import union_tokenizer

    union_tokenizer(_word_tokenizer("w", 8), [(_word_tokenizer("w", 8), 8), (_word_tokenizer("v", 8), 8)])  # imports
    calls = []
    add_tokens = PreTrainedTokenizerBase.add_tokens
    monkeypatch.setattr(PreTrainedTokenizerBase, "add_tokens",
                        lambda self, *a, **k: calls.append(1) or add_tokens(self, *a, **k))
    size = 50_000
    first, second = _word_tokenizer("a", size), _word_tokenizer("b", size)
    first.add_tokens(["<extra>"])
    started = time.monotonic()
    out = union_tokenizer(first, [(first, size + 1), (second, size)])
    elapsed = time.monotonic() - started
    assert len(out) == 2 * size and out.convert_tokens_to_ids("b49999") >= size
    assert len(calls) < 20  # a few calls (the copy's own, one per kind of token), never one per token (50,000)
    assert elapsed < 15, elapsed  # a call per token took 77 s for two 8,192-token vocabularies
