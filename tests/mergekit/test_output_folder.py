"""The output folder of `drm-jax merge` is the one a mergekit 0.1.5 user expects: mergekit_config.yml, the
README model card, config.json / generation_config.json, the tokenizer; the flags under mergekit's names;
and the vocabulary handling of `tokenizer_source` (base, union, a model) and of the `tokenizer` block,
checked against `mergekit-yaml` itself on tiny Llama models whose tokenizers differ.

The tokenizers are built here (WordLevel vocabularies saved as PreTrainedTokenizerFast, different words
and added tokens per model); nothing is downloaded. The comparisons with mergekit are skipped where it
is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from drm_jax.cli.main import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LAYERS = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
# word list, added (ordinary) tokens, added special tokens, chat template
TOKENIZERS = {
    "base": (["a", "b", "c"], ["<x>"], [], "{% for m in messages %}{{ m['content'] }}|{% endfor %}"),
    "m1": (["a", "b", "d", "f"], ["<y>"], ["<|im_start|>"], "{% for m in messages %}[{{ m['role'] }}]{% endfor %}"),
    "m2": (["a", "c", "b", "e", "f"], ["<x>", "<z>"], [], "{% for m in messages %}[{{ m['role'] }}]{% endfor %}"),
    "m3": (["a", "b", "c"], ["<x>"], [], None),  # the base's vocabulary: merges without a tokenizer source
}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
# BPE tokenizers of 12 tokens; the "bpe_base" model has 10 embedding rows, so its last two tokens are unused
BPE_MODELS = {"bpe_base": (["<p>", "<q>"], 10), "bpe_tuned": (["<p>", "<r>"], 12)}


def _tokenizer(words, added, special, template):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_tokens(added)
    if special:
        tok.add_special_tokens({"additional_special_tokens": special})
    if template:
        tok.chat_template = template
    return tok


def _bpe_tokenizer(added):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "a", "b", "c", "ab", "bc", "abc", "cc"])}
    backend = Tokenizer(models.BPE(vocab, [("a", "b"), ("b", "c"), ("ab", "c")], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_tokens(added)
    return tok


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """base, m1, m2, m3: tiny Llama models (4 layers) with their own tokenizers, random weights; and
    bpe_base / bpe_tuned, whose base has fewer embedding rows than tokenizer ids."""
    root = tmp_path_factory.mktemp("vocab_family")
    models = [(name, _tokenizer(*spec), None) for name, spec in TOKENIZERS.items()]
    models += [(name, _bpe_tokenizer(added), rows) for name, (added, rows) in BPE_MODELS.items()]
    for seed, (name, tok, rows) in enumerate(models):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(vocab_size=rows or len(tok.get_vocab()), **LAYERS)
        transformers.LlamaForCausalLM(config).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _load(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _vocab(directory: Path) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(str(directory)).get_vocab()


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def _merge(config: Path, out: Path, *flags: str) -> Path:
    assert main(["merge", str(config), str(out), "--quiet", *flags]) == 0
    return out


# -- configs: each one run by drm-jax merge and, in one process, by mergekit-yaml -------------------------
def _configs(f: Path) -> dict[str, str]:
    head = (f"merge_method: task_arithmetic\nbase_model: {f / 'base'}\nmodels:\n"
            f"  - model: {f / 'm1'}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {f / 'm2'}\n    parameters: {{weight: 0.3}}\n"
            "parameters: {lambda: 0.9}\ndtype: float32\n")
    return {
        "base": head + "tokenizer_source: base\nchat_template: \"{% for m in messages %}<{{ m['content'] }}>{% endfor %}\"\n",
        "union": head + "tokenizer_source: union\nchat_template: chatml\n",
        "model": head + f"tokenizer_source: {f / 'm2'}\nchat_template: auto\n",
        "block": head + (
            "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n"
            "    <new>:\n      source: {kind: zero}\n"
            f"    <z>:\n      source: {f / 'm2'}\n      force: true\n"
            f"    d:\n      source: {{kind: model_token, model: {f / 'base'}, token_id: 3}}\n"
            f"    <n2>:\n      source: {{kind: model_token, model: {f / 'm1'}, token: b}}\n"
            f"    c:\n      source: {f / 'base'}\n"),
        # the base's tokenizer less its ids past the base's 10 embedding rows
        "strip": (f"merge_method: task_arithmetic\nbase_model: {f / 'bpe_base'}\nmodels:\n"
                  f"  - model: {f / 'bpe_tuned'}\n    parameters: {{weight: 0.5}}\n"
                  "tokenizer_source: base\ndtype: float32\n"),
        # no tokenizer source: the reference's tokenizer files are copied; a comment kept in mergekit_config.yml
        "copy": ("# copied as given\nmerge_method: linear\nbase_model: " + str(f / "base") + "\nmodels:\n"
                 f"  - model: {f / 'base'}\n    parameters: {{weight: 0.4}}\n"
                 f"  - model: {f / 'm3'}\n    parameters: {{weight: 0.6}}\ndtype: float32\n"),
    }


MERGEKIT_DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
args = sys.argv[1:]
for config, out in zip(args[::2], args[1::2]):
    main([config, out, "--quiet"], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def mergekit_outputs(family, tmp_path_factory) -> dict[str, Path]:
    """Every config of `_configs` through mergekit-yaml's command (one process for all of them)."""
    pytest.importorskip("mergekit")
    root = tmp_path_factory.mktemp("mergekit_out")
    args, outs = [], {}
    for name, text in _configs(family).items():
        (root / f"{name}.yml").write_text(text)
        outs[name] = root / name
        args += [str(root / f"{name}.yml"), str(root / name)]
    done = subprocess.run([sys.executable, "-c", MERGEKIT_DRIVER, *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return outs


@pytest.fixture(scope="module")
def our_outputs(family, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drm_out")
    outs = {}
    for name, text in _configs(family).items():
        (root / f"{name}.yml").write_text(text)
        outs[name] = _merge(root / f"{name}.yml", root / name)
    return outs


def _rows_by_token(tensors: dict[str, np.ndarray], vocab: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
    return {name: {tok: tensors[name][i] for tok, i in vocab.items()} for name in VOCAB_TENSORS}


def _close(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    scale = max(float(np.abs(theirs).max()), 1e-12)
    assert ours.shape == theirs.shape, what
    assert float(np.abs(ours - theirs).max()) <= 1e-5 * scale, what


@pytest.mark.parametrize("case", ["base", "union", "model", "block", "strip"])
def test_vocabulary_and_tensors_agree_with_mergekit(case, family, our_outputs, mergekit_outputs):
    ours_dir, theirs_dir = our_outputs[case], mergekit_outputs[case]
    ours, theirs = _load(ours_dir), _load(theirs_dir)
    vocab_ours, vocab_theirs = _vocab(ours_dir), _vocab(theirs_dir)
    assert set(vocab_ours) == set(vocab_theirs)
    if case in ("base", "model", "strip"):
        assert vocab_ours == vocab_theirs  # ids too (a union's new ids follow mergekit's hash-map order)
        assert (ours_dir / "tokenizer.json").read_bytes() == (theirs_dir / "tokenizer.json").read_bytes()
    else:  # a union keeps the base's ids; only its new ids follow mergekit's hash-map order
        base = _vocab(family / "base")
        assert {t: vocab_ours[t] for t in base} == {t: vocab_theirs[t] for t in base} == base
    if case == "strip":
        assert len(vocab_ours) == 10 and "<q>" not in vocab_ours
    assert set(ours) == set(theirs)
    for name in ours:
        if name not in VOCAB_TENSORS:
            _close(ours[name], theirs[name], name)
    rows_ours, rows_theirs = _rows_by_token(ours, vocab_ours), _rows_by_token(theirs, vocab_theirs)
    for name in VOCAB_TENSORS:
        assert ours[name].shape == theirs[name].shape, name
        for tok in vocab_ours:
            _close(rows_ours[name][tok], rows_theirs[name][tok], f"{name}[{tok!r}]")
        size = len(vocab_ours)
        if ours[name].shape[0] > size:  # pad_to_multiple_of: the rows past the vocabulary
            _close(ours[name][size:], theirs[name][size:], f"{name} padding")
    config_ours = json.loads((ours_dir / "config.json").read_text())
    config_theirs = json.loads((theirs_dir / "config.json").read_text())
    assert config_ours["vocab_size"] == config_theirs["vocab_size"] == ours["lm_head.weight"].shape[0]


def test_union_keeps_the_base_ids_and_adds_every_token(family, our_outputs):
    vocab = _vocab(our_outputs["union"])
    base = _vocab(family / "base")
    assert all(vocab[t] == i for t, i in base.items())
    expected = set(base) | set(_vocab(family / "m1")) | set(_vocab(family / "m2"))
    assert set(vocab) == expected and sorted(vocab.values()) == list(range(len(expected)))


def test_block_rows_follow_their_sources(family, our_outputs):
    """The `tokens` rules on the merged result: a zero source stays zero through task arithmetic (every
    model's row is zero, the base's included); a forced source gives every model the same row, so the
    merged row is that row."""
    out = _load(our_outputs["block"])
    vocab = _vocab(our_outputs["block"])
    m2 = _load(family / "m2")
    m2_vocab = _vocab(family / "m2")
    for name in VOCAB_TENSORS:
        np.testing.assert_array_equal(out[name][vocab["<new>"]], 0.0)
        np.testing.assert_allclose(out[name][vocab["<z>"]], m2[name][m2_vocab["<z>"]], rtol=1e-6)
        assert out[name].shape[0] % 8 == 0 and out[name].shape[0] > len(vocab)


def test_chat_templates_agree_with_mergekit(our_outputs, mergekit_outputs):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}]
    for case in ("base", "union", "model"):
        ours = transformers.AutoTokenizer.from_pretrained(str(our_outputs[case]))
        theirs = transformers.AutoTokenizer.from_pretrained(str(mergekit_outputs[case]))
        assert ours.chat_template, case
        for prompt in (False, True):
            assert (ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
                    == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)), case
    # auto: the template two of the three models carry
    assert transformers.AutoTokenizer.from_pretrained(str(our_outputs["model"])).chat_template.startswith(
        "{% for m in messages %}[")


@pytest.mark.parametrize("name", ["alpaca", "chatml", "exaone", "llama3", "mistral"])
def test_named_templates_render_as_mergekits(name, family):
    pytest.importorskip("mergekit")
    import importlib.resources

    from mergekit._data import chat_templates

    from drm_jax.config.chat_templates import NAMED_TEMPLATES

    theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
    tok = transformers.AutoTokenizer.from_pretrained(str(family / "base"))
    conversations = [
        [{"role": "user", "content": " Hi there "}],
        [{"role": "system", "content": " Be nice."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "system", "content": "s1"}, {"role": "user_context", "content": " ctx "},
         {"role": "user", "content": "q"}, {"role": "system", "content": "s2 "}],
        [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
    ]

    def render(template, messages, prompt):
        try:
            return tok.apply_chat_template(messages, tokenize=False, chat_template=template,
                                           add_generation_prompt=prompt)
        except Exception as err:  # mistral refuses some role orders: both must refuse
            return type(err).__name__

    for messages in conversations:
        for prompt in (False, True):
            assert render(NAMED_TEMPLATES[name], messages, prompt) == render(theirs, messages, prompt), messages


def test_copied_folder_agrees_with_mergekit(our_outputs, mergekit_outputs):
    ours, theirs = our_outputs["copy"], mergekit_outputs["copy"]
    names = {p.name for p in theirs.iterdir()}
    assert names <= {p.name for p in ours.iterdir()}
    for name in ("tokenizer.json", "tokenizer_config.json", "mergekit_config.yml", "generation_config.json"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    assert _front_matter((ours / "README.md").read_text()) == _front_matter((theirs / "README.md").read_text())
    a, b = _load(ours), _load(theirs)
    for name in b:
        _close(a[name], b[name], name)


# -- the folder and the flags (no mergekit needed) ---------------------------------------------------------
def test_folder_files_and_card(family, our_outputs):
    out = our_outputs["copy"]
    text = _configs(family)["copy"]
    assert (out / "mergekit_config.yml").read_text() == text  # as given, comment included
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == yaml.safe_load(text)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors", "README.md"):
        assert (out / name).is_file(), name
    readme = (out / "README.md").read_text()
    meta = _front_matter(readme)
    assert meta == {"base_model": [], "library_name": "transformers", "tags": ["mergekit", "merge"]}
    assert "`linear`" in readme and "arxiv.org/abs/2203.05482" in readme
    assert f"{family / 'base'} as the base model" in readme and f"* {family / 'm3'}" in readme
    assert readme.rstrip().endswith("```") and text.strip() in readme
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_card_front_matter_names_hub_models():
    from drm_jax.config.card import generate_card
    from drm_jax.config.schema import parse_config

    config = parse_config({"merge_method": "ties", "base_model": "org/base-model",
                           "models": ["org/tuned+org/adapter", "/local/model"]})
    card = generate_card(config, "merged")
    assert _front_matter(card)["base_model"] == ["org/base-model", "org/tuned", "org/adapter"]
    assert "[org/base-model](https://huggingface.co/org/base-model) as the base model" in card
    assert "* [org/tuned](https://huggingface.co/org/tuned) + [org/adapter](https://huggingface.co/org/adapter)" in card
    assert "* /local/model" in card and "arxiv.org/abs/2306.01708" in card
    assert yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])["merge_method"] == "ties"


def test_flags_turn_off_card_and_tokenizer(family, tmp_path):
    config = tmp_path / "c.yml"
    config.write_text(_configs(family)["copy"])
    out = _merge(config, tmp_path / "bare", "--no-write-model-card", "--no-copy-tokenizer")
    names = {p.name for p in out.iterdir()}
    assert not names & {"README.md", "mergekit_config.yml", "tokenizer.json", "tokenizer_config.json"}
    assert {"config.json", "model.safetensors"} <= names


def test_sharded_output_loads_and_equals_one_file(family, tmp_path, our_outputs):
    config = tmp_path / "c.yml"
    config.write_text(_configs(family)["union"])
    sharded = _merge(config, tmp_path / "sharded", "--out-shard-size", "4K")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    whole = _load(our_outputs["union"])
    parts = _load(sharded)
    assert set(parts) == set(whole) and all(np.array_equal(parts[k], whole[k]) for k in whole)
    a = transformers.AutoModelForCausalLM.from_pretrained(str(sharded))
    b = transformers.AutoModelForCausalLM.from_pretrained(str(our_outputs["union"]))
    assert a.config.vocab_size == b.config.vocab_size == len(_vocab(sharded))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("flags, message", [
    (["--out-shard-size", "1.5B"], "not a size"),
    (["--out-shard-size", "5GB"], "not a size"),
    (["--out-shard-size", "1B", "--max-shard-size", "1GB"], "give one of"),
])
def test_bad_shard_sizes_are_one_line(family, tmp_path, capsys, flags, message):
    config = tmp_path / "c.yml"
    config.write_text(_configs(family)["copy"])
    try:
        code = main(["merge", str(config), str(tmp_path / "out"), "--quiet", *flags])
    except SystemExit as exit_:  # argparse's own refusal
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_kmb_sizes():
    from drm_jax.config.merge import parse_kmb

    assert parse_kmb("5B") == 5 * 10**9 and parse_kmb("500m") == 5 * 10**8 and parse_kmb("7k") == 7000
    assert parse_kmb("1234") == 1234 and parse_kmb("0") == 0


@pytest.mark.parametrize("extra, key", [
    ("chat_template: notatemplate\n", "chat_template"),
    ("chat_template: '{{ short }}'\n", "chat_template"),
    ("tokenizer_source: union\ntokenizer: {source: base}\n", "tokenizer"),
    ("tokenizer: {source: union, tokens: {q: {source: {kind: other}}}}\n", "tokenizer.tokens.q.source.kind"),
    ("tokenizer: {source: union, tokens: {q: {source: {kind: model_token, model: m}}}}\n", "tokenizer.tokens.q.source"),
    ("tokenizer: {source: union, pad_to_multiple_of: 0}\n", "tokenizer.pad_to_multiple_of"),
    ("tokenizer: {source: union, colour: red}\n", "tokenizer.colour"),
])
def test_bad_tokenizer_settings_name_the_key(family, tmp_path, capsys, extra, key):
    config = tmp_path / "c.yml"
    config.write_text(_configs(family)["copy"] + extra)
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{config}: {key}:" in err, err
    assert not (tmp_path / "out").exists()


def test_undefined_token_source_is_one_line(family, tmp_path, capsys):
    """A token missing from some model needs a row: a `tokens` entry without a source is refused before
    anything is written (mergekit fails on it at merge time)."""
    config = tmp_path / "c.yml"
    config.write_text(_configs(family)["copy"].replace("dtype: float32\n", "") +
                      "tokenizer:\n  source: union\n  tokens:\n    <fresh>: {}\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tokenizer.tokens.<fresh>.source" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
