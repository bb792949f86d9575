"""The output vocabulary of a merge and the embedding rows each model gets in it (mergekit 0.1.5's
`tokenizer_source` and `tokenizer` block).

When a config names a tokenizer source (`base`, `union`, a model) or gives a `tokenizer` block, the
output tokenizer is built first and every tensor indexed by token ids (input embeddings, lm_head) of
every model is rewritten to the output vocabulary *before* the merge, so the merge method sees rows
that mean the same token in every model. The rules, as mergekit applies them:

1. Output vocabulary. `base`: the base model's tokenizer, less the tokens whose id is past the base's
   `vocab_size` (its unused padding ids). A model: that model's tokenizer. `union`: the base's tokenizer
   plus, in order, every ordinary token of the other models it lacks, then every added token of any
   model (first settings seen win). Tokens named in the `tokens` block are added when missing.
2. Each model's index of every output token: its own id in the model's tokenizer, or "missing" (a
   model whose tokenizer cannot be loaded is taken to share the base's). Ids at or past the model's
   `vocab_size` count as missing.
3. A token missing from some model (or `force`d) gets a default row: the configured source (`zero`,
   a model's own row of the token, or a model's row of another token id / token), else, unconfigured:
   the row of the only model that has it; zeros if no model has it; the base model's row if the base
   is merged and has it; otherwise the mean of the rows of the models that have it.
4. Each model's new matrix: its own row for every token it has (unless forced), the default row
   otherwise. With `pad_to_multiple_of`, the rows past the vocabulary are the mean of the model's rows.

The models are taken in mergekit's order for the sums (the listed models, then the base when it is not
listed). Arithmetic is in the inputs' promoted dtype, after the config's `dtype` cast, as in mergekit.
Differences, all where mergekit fails or is not deterministic: ties in a union's order are broken by
token id and config order (mergekit iterates hash maps); a model's token id past its `vocab_size` is
"missing" (mergekit fails on it); a default row the config leaves undefined is a one-line error; tokens
a `tokens` block adds to a `base` source are missing from the base (mergekit adds them to the base's own
tokenizer, then reads its padding rows or fails). Reference: docs/methods.md#output-vocabulary-tokenizer_source-and-the-tokenizer-block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import sys
import tempfile
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np

from drm_jax.arch import VOCABULARY_TENSORS  # Hugging Face names of the tensors indexed by token ids
from drm_jax.config.schema import MergeConfig, TokenizerSpec, TokenSetting
from drm_jax.config.streaming import PEFT_CONFIG_NAME, split_adapter
from drm_jax.errors import CheckpointError, ConfigError, MergeInputError, UnsafeFileError, one_line, quote, quote_path
from drm_jax.io.base import read_json
from drm_jax.io.dtypes import is_floating
from drm_jax.io.model_files import safe_model_file, stage_tokenizer_files



def is_vocabulary_tensor(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 1 and VOCABULARY_TENSORS.match(name) is not None


@dataclass(frozen=True)
class Rule:
    """How the default row of one output token is made: kind "zero", "row" (row `row` of model `model`)
    or "average" (the mean of `models`' own rows of the token)."""

    kind: str
    model: str | None = None
    row: int | None = None
    models: tuple[str, ...] = ()


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.array(array)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class VocabularyPlan:
    """The output vocabulary and, per merged model, the source row of every output token: an immutable
    value (read-only mappings and arrays), part of the merge's plan (`drm_jax.config.plan.ConfigPlan`),
    made from the tokenizers' data alone (`plan_vocabulary`).

    vocab: token -> output id. size: output ids (len(vocab)); rows: embedding rows (size padded up to
    pad_to_multiple_of). order: merged model references in mergekit's order. index: reference -> (size,)
    int64 source rows, -1 where the model lacks the token. forced: (size,) bool. rules: output id ->
    default-row rule. templates: the loaded tokenizers' chat templates (base first). warnings: what the
    plan found (tokens no model has). source: the tokenizer source ("base", "union" or a model reference)
    and added: the `tokens` block's tokens the source lacks, in the order they are added: how the output
    tokenizer is built (`build_tokenizer`).
    """

    vocab: Mapping[str, int]
    size: int
    rows: int
    order: tuple[str, ...]
    index: Mapping[str, np.ndarray]
    forced: np.ndarray
    rules: Mapping[int, Rule]
    templates: tuple[Any, ...] = ()
    warnings: tuple[str, ...] = ()
    settings: Mapping[str, TokenSetting] = field(default_factory=lambda: MappingProxyType({}))
    original: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: MappingProxyType({}))
    base: str | None = None
    config: MergeConfig | None = None
    source: str = "base"
    added: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        freeze = {"vocab": MappingProxyType(dict(self.vocab)), "order": tuple(self.order),
                  "index": MappingProxyType({k: _read_only(v) for k, v in self.index.items()}),
                  "forced": _read_only(self.forced), "rules": MappingProxyType(dict(self.rules)),
                  "templates": tuple(self.templates), "warnings": tuple(self.warnings),
                  "settings": MappingProxyType(dict(self.settings)),
                  "original": MappingProxyType({k: MappingProxyType(dict(v)) for k, v in self.original.items()}),
                  "added": tuple(self.added)}
        for name, value in freeze.items():
            object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VocabularyPlan):
            return NotImplemented
        same = [getattr(self, f.name) == getattr(other, f.name) for f in fields(self)
                if f.name not in ("index", "forced")]
        return (all(same) and np.array_equal(self.forced, other.forced) and self.index.keys() == other.index.keys()
                and all(np.array_equal(v, other.index[k]) for k, v in self.index.items()))

    __hash__ = None

    def for_models(self, refs: list[str]) -> "VocabularyPlan":
        """The plan of a merge of only some of the models (one slice of a `slices` config): the default
        rows are made from those models."""
        order = tuple(r for r in self.order if r in refs)
        if order == self.order:
            return self
        forced, rules, warnings = _rules(self.config, self.vocab, self.index, self.settings, self.original,
                                         list(order), self.base)
        return dataclasses.replace(self, order=order, forced=forced, rules=rules, warnings=warnings)


# -- tokenizers --------------------------------------------------------------------------------------
def model_directory(config: MergeConfig, reference: str) -> Path:
    """The directory whose tokenizer and config.json describe a model reference (the model of a
    `model+adapter` pair; the base for a PEFT adapter directory given alone)."""
    path, _ = split_adapter(config, reference)
    if path.is_dir() and (path / PEFT_CONFIG_NAME).is_file() and config.base_model is not None:
        path, _ = split_adapter(config, config.base_model)
    return path


def _custom_code_file(path: Path) -> str | None:
    """The first of config.json and tokenizer_config.json of `path` that has an `auto_map` (names classes
    in the checkpoint's own Python files), None if neither has one."""
    for name in ("config.json", "tokenizer_config.json"):
        file = safe_model_file(path, name)
        if file is not None and _has_auto_map(read_json(file, f"the model's {name}")):
            return name
    return None


def _has_auto_map(raw: Any) -> bool:
    return isinstance(raw, dict) and bool(raw.get("auto_map"))


def _refuse_unknown_custom_model(path: Path) -> None:
    """Refuse a config.json with an `auto_map` and a model_type transformers has no class for: only its
    own code could read it, and drm-jax never runs a checkpoint's code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    file = safe_model_file(path, "config.json")
    raw = read_json(file, "the model config") if file is not None else None
    if _has_auto_map(raw) and raw.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise UnsafeFileError(f"{quote_path(Path(path) / 'config.json')}: auto_map names custom code for model_type "
                              f"{quote(raw.get('model_type'))}, which transformers does not know; drm-jax never runs "
                              f"code from a checkpoint; refused")


@contextlib.contextmanager
def _stdin_closed():
    """sys.stdin empty while transformers runs: nothing it calls can wait for an answer on our stdin."""
    previous = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        yield
    finally:
        sys.stdin = previous


def _auto_tokenizer(directory: Path):
    """transformers' AutoTokenizer of a directory we made, remote code off, stdin out of reach."""
    import transformers

    with _stdin_closed():
        # no local_files_only: transformers records it in the saved tokenizer_config.json
        return transformers.AutoTokenizer.from_pretrained(str(directory), use_fast=True, trust_remote_code=False)


def load_tokenizer(path: Path, what: str):
    """The transformers tokenizer of a local model directory (fast where there is one), loaded without
    running any code of the checkpoint.

    transformers reads a private copy of the directory's tokenizer and config files
    (`drm_jax.io.model_files.stage_tokenizer_files`: each a regular file of the directory or its Hugging
    Face cache blob), with trust_remote_code=False, and never our stdin. The copy lives as long as the
    tokenizer (a tokenizer may copy its vocabulary file again when saved).

    Raises:
      UnsafeFileError: a file is a link out of the directory, or the tokenizer or config needs the
        checkpoint's own code (`auto_map`).
      CheckpointError: any other reason the tokenizer cannot be loaded.
    """
    if not Path(path).is_dir():
        raise CheckpointError(f"{what}: {str(path)!r} is not a model directory; tokenizers are read from "
                              f"local directories only")
    _refuse_unknown_custom_model(path)
    staged = Path(tempfile.mkdtemp(prefix="drm-jax-tokenizer-"))
    try:
        stage_tokenizer_files(path, staged)
        tokenizer = _auto_tokenizer(staged)
    except UnsafeFileError:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    except Exception as err:  # transformers raises many kinds (OSError, ValueError, KeyError, ...)
        shutil.rmtree(staged, ignore_errors=True)
        custom = _custom_code_file(path)
        if custom is not None:
            raise UnsafeFileError(f"{quote_path(Path(path) / custom)}: auto_map names custom code that this "
                                  f"tokenizer needs; drm-jax never runs code from a checkpoint; refused") from None
        text = str(err).replace(str(staged), str(path)).strip()
        first = text.splitlines()[0][:200] if text else type(err).__name__
        raise CheckpointError(f"{what}: cannot load the tokenizer of {str(path)!r}: {first}") from None
    weakref.finalize(tokenizer, shutil.rmtree, str(staged), True)
    return tokenizer


def config_vocab_size(path: Path) -> int | None:
    """`vocab_size` of a model's config.json (or of its text_config), None if absent."""
    config_path = safe_model_file(path, "config.json")
    if config_path is None:
        return None
    config = read_json(config_path, "the model config")
    if not isinstance(config, dict):
        return None
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict) and isinstance(holder.get("vocab_size"), int):
            return holder["vocab_size"]
    return None


def strip_unused(tokenizer, vocab_size: int, what: str):
    """The tokenizer without the tokens whose id is >= vocab_size (ids the model has no row for)."""
    from tokenizers import Tokenizer

    unused = {tok for tok, i in tokenizer.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(f"{what}: its tokenizer has {len(unused)} tokens past vocab_size {vocab_size} and is "
                              f"not a fast tokenizer; they cannot be removed")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = spec.get("model", {}).get("type")
    if kind not in ("BPE", "WordLevel", "WordPiece"):
        raise CheckpointError(f"{what}: its tokenizer has tokens past vocab_size {vocab_size} and is of type "
                              f"{kind}; only BPE, WordLevel and WordPiece vocabularies can be cut")
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < vocab_size]
    vocab = spec["model"]["vocab"]
    for tok in unused:
        vocab.pop(tok, None)
    if kind == "BPE":
        def kept(merge) -> bool:
            parts = merge.split(" ") if isinstance(merge, str) else list(merge)
            return not any(p in unused for p in parts)

        spec["model"]["merges"] = [m for m in spec["model"].get("merges", []) if kept(m)]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))  # the wrapper keeps its settings
    return tokenizer


def _copy_tokenizer(tokenizer):
    """An independent copy (saved and loaded again), so adding tokens leaves the original as it is."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return _auto_tokenizer(Path(tmp))


def union_tokenizer(base, others: list[tuple[Any, int]]):
    """The base tokenizer plus the ordinary tokens of every tokenizer it lacks (in tokenizer order, then
    id order), then every added token of any of them (first settings seen win). `others` holds
    (tokenizer, vocab_size) pairs, the base's first; ids at or past a tokenizer's vocab_size are skipped."""
    added: dict[str, Any] = {}
    for tokenizer, size in others:
        for idx, info in sorted(tokenizer.added_tokens_decoder.items()):
            if idx < size and info.content not in added:
                added[info.content] = info
    ordinary: dict[str, None] = {}
    for tokenizer, size in others:
        for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if idx < size and tok not in added:
                ordinary.setdefault(tok, None)
    result = _copy_tokenizer(base)
    base_vocab = base.get_vocab()
    # one call each: every add_tokens call rebuilds the added-token index, so a call per token is quadratic
    new = [tok for tok in ordinary if tok not in base_vocab]
    if new:
        result.add_tokens(new)
    if added:
        result.add_tokens(list(added.values()))
    return result


# -- the plan ----------------------------------------------------------------------------------------
def merge_order(config: MergeConfig) -> list[str]:
    """The merged models as mergekit takes them: the listed models, then the base if it is not listed."""
    order: list[str] = []
    for entry in config.models:
        if entry.model not in order:
            order.append(entry.model)
    if config.base_model is not None and config.base_model not in order:
        order.append(config.base_model)
    return order


def _fail(config: MergeConfig, message: str) -> ConfigError:
    return ConfigError((f"{config.source}: " if config.source is not None else "") + message)


@dataclass(frozen=True)
class TokenizerHeader:
    """One model's tokenizer as the vocabulary plan sees it (`read_tokenizers`).

    model: its config reference. vocab: token -> id (the tokenizer's `get_vocab()`: its model's tokens and
    its added tokens), None where the tokenizer could not be loaded (the model is taken to share the
    base's). added: its added tokens as (id, content), in id order. own_size: the tokenizer's own
    `vocab_size` (its model's tokens, without the added ones). size: config.json's `vocab_size` (None:
    absent). chat_template: the tokenizer's. tokenizer: the loaded transformers tokenizer, which the output
    tokenizer is built from after planning (`build_tokenizer`); not compared, and never read by the plan.
    """

    model: str
    vocab: Mapping[str, int] | None
    added: tuple[tuple[int, str], ...] = ()
    own_size: int = 0
    size: int | None = None
    chat_template: Any = None
    tokenizer: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.vocab is not None:
            object.__setattr__(self, "vocab", MappingProxyType(dict(self.vocab)))
        object.__setattr__(self, "added", tuple((int(i), str(c)) for i, c in self.added))

    @property
    def loaded(self) -> bool:
        return self.vocab is not None


@dataclass(frozen=True)
class Tokenizers:
    """What the vocabulary plan reads of the tokenizer files (`read_tokenizers`), as data.

    base: the base model's tokenizer (cut to its config's `vocab_size`). models: every other merged model's,
    in mergekit's order (`merge_order`), one that could not be loaded with vocab None. source: a model
    `tokenizer_source`'s own tokenizer (loaded again, uncut), else None. warnings: the models whose
    tokenizer could not be loaded.
    """

    base: TokenizerHeader
    models: tuple[TokenizerHeader, ...] = ()
    source: TokenizerHeader | None = None
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "warnings", tuple(self.warnings))

    def loaded(self) -> dict[str, TokenizerHeader]:
        """{reference: header} of the tokenizers that loaded, the base's first."""
        found = {self.base.model: self.base}
        found.update((h.model, h) for h in self.models if h.loaded and h.model not in found)
        return found

    def of(self, model: str) -> TokenizerHeader:
        """A merged model's tokenizer (the base's for one that could not be loaded)."""
        header = self.loaded().get(model)
        return header if header is not None else self.base


def tokenizer_header(model: str, tokenizer, size: int | None) -> TokenizerHeader:
    """The data the plan reads of a loaded tokenizer."""
    added = sorted((int(i), info.content) for i, info in tokenizer.added_tokens_decoder.items())
    return TokenizerHeader(model, tokenizer.get_vocab(), tuple(added), int(tokenizer.vocab_size), size,
                           tokenizer.chat_template, tokenizer)


def read_tokenizers(config: MergeConfig, spec: TokenizerSpec | None = None) -> Tokenizers:
    """Load the tokenizers the output vocabulary of `config.tokenizer_spec` is planned from: the base's (cut
    to its config's `vocab_size`, `strip_unused`), every other merged model's (one that cannot be loaded is
    a warning: it is taken to share the base's) and a model tokenizer source's.

    Raises:
      CheckpointError: the base's or the source's tokenizer cannot be loaded, or the base's cannot be cut.
      UnsafeFileError: a tokenizer needs the checkpoint's own code, or a file links out of its directory.
    """
    spec = spec or config.tokenizer_spec
    if spec is None:
        raise ValueError("no tokenizer settings in the config")
    warnings: list[str] = []
    order = merge_order(config)
    base_ref = config.base_model if config.base_model is not None else order[0]
    base_dir = model_directory(config, base_ref)
    base_size = config_vocab_size(base_dir)
    base_tok = load_tokenizer(base_dir, "base_model" if config.base_model is not None else "models[0]")
    base_tok = strip_unused(base_tok, base_size, base_ref) if base_size is not None else base_tok

    models: list[TokenizerHeader] = []
    for ref in order:
        if ref == base_ref:
            continue
        directory = model_directory(config, ref)
        size = config_vocab_size(directory)
        try:
            models.append(tokenizer_header(ref, load_tokenizer(directory, ref), size))
        except UnsafeFileError:
            raise
        except CheckpointError as err:
            warnings.append(f"{err}; taking it to be the base model's tokenizer")
            models.append(TokenizerHeader(ref, None, size=size))
    source = None
    if spec.source not in ("base", "union"):
        source = tokenizer_header(spec.source, load_tokenizer(model_directory(config, spec.source),
                                                              "tokenizer source"), None)
    return Tokenizers(tokenizer_header(base_ref, base_tok, base_size), tuple(models), source, tuple(warnings))


def _with_tokens(vocab: dict[str, int], tokens) -> dict[str, int]:
    """`vocab` with each token it lacks appended at the next id, in order, as a tokenizer adds tokens."""
    next_id = max(vocab.values(), default=-1) + 1
    for token in tokens:
        if token and token not in vocab:
            vocab[token] = next_id
            next_id += 1
    return vocab


def union_vocab(base: Mapping[str, int], others: list[tuple[TokenizerHeader, int]]) -> dict[str, int]:
    """The vocabulary `union_tokenizer` builds, from the tokenizers' data: the base's, then every ordinary
    token of `others` ((header, vocab_size) pairs, the base's first) it lacks, in tokenizer order then id
    order, then every added token of any of them; ids at or past a tokenizer's vocab_size are skipped."""
    added: dict[str, None] = {}
    for header, size in others:
        for idx, content in header.added:
            if idx < size:
                added.setdefault(content, None)
    ordinary: dict[str, None] = {}
    for header, size in others:
        for tok, idx in sorted(header.vocab.items(), key=lambda item: item[1]):
            if idx < size and tok not in added:
                ordinary.setdefault(tok, None)
    return _with_tokens(dict(base), [*ordinary, *added])


def _union_sizes(tokenizers: Tokenizers) -> list[tuple[TokenizerHeader, int]]:
    return [(h, h.size if h.size is not None else h.own_size) for h in tokenizers.loaded().values()]


def plan_vocabulary(config: MergeConfig, tokenizers: Tokenizers, spec: TokenizerSpec | None = None) -> VocabularyPlan:
    """The output vocabulary and rows plan of `config.tokenizer_spec` (see the module doc), from the
    tokenizers' data (`read_tokenizers`); opens no file.

    Raises:
      CheckpointError: the output vocabulary's ids are not 0..size-1.
      ConfigError: a `tokens` entry names a model that is not merged, a token the model lacks, or leaves
        a needed row undefined.
    """
    spec = spec or config.tokenizer_spec
    if spec is None:
        raise ValueError("no tokenizer settings in the config")
    order = merge_order(config)
    if spec.source == "base":
        vocab = dict(tokenizers.base.vocab)
    elif spec.source == "union":
        vocab = union_vocab(tokenizers.base.vocab, _union_sizes(tokenizers))
    else:
        vocab = dict(tokenizers.source.vocab)
    added = [t for t in dict.fromkeys(token for token, _ in spec.tokens) if t not in vocab]
    vocab = _with_tokens(vocab, added)

    size = len(vocab)
    pad = spec.pad_to_multiple_of
    rows = size if not pad or size % pad == 0 else size + pad - size % pad
    if sorted(vocab.values()) != list(range(size)):
        raise CheckpointError(f"the output tokenizer's ids are not 0..{size - 1}; cannot lay out embedding rows")

    sizes = {h.model: h.size for h in (tokenizers.base, *tokenizers.models)}
    index: dict[str, np.ndarray] = {}
    for ref in order:
        own = tokenizers.of(ref).vocab
        limit = sizes.get(ref)
        limit = limit if limit is not None else len(own)
        rows_of = np.full(size, -1, np.int64)
        for token, new_id in vocab.items():
            old = own.get(token)
            if old is not None and old < limit:
                rows_of[new_id] = old
        index[ref] = rows_of

    settings: dict[str, TokenSetting] = dict(spec.tokens)
    loaded = tokenizers.loaded()
    original = {ref: h.vocab for ref, h in loaded.items()}
    forced, rules, warnings = _rules(config, vocab, index, settings, original, order, config.base_model)
    templates = [h.chat_template for h in loaded.values()]
    return VocabularyPlan(vocab, size, rows, order, index, forced, rules, templates, warnings, settings, original,
                          config.base_model, config, spec.source, tuple(added))


def build_tokenizer(plan: VocabularyPlan, tokenizers: Tokenizers):
    """The output tokenizer of a vocabulary plan, built from the loaded tokenizers (the base's or the
    source's, with the plan's added tokens added to it in place; a union's is a new one).

    Raises CheckpointError if its vocabulary is not the plan's (a tokenizer that numbers added tokens in a
    way the plan does not foresee): the embedding rows would not match its ids."""
    if plan.source == "base":
        out = tokenizers.base.tokenizer
    elif plan.source == "union":
        out = union_tokenizer(tokenizers.base.tokenizer, [(h.tokenizer, size) for h, size in _union_sizes(tokenizers)])
    else:
        out = tokenizers.source.tokenizer
    if plan.added:
        present = set(out.get_vocab())
        missing = [t for t in plan.added if t not in present]
        if missing:
            out.add_tokens(missing)  # one call: a call per token rebuilds the added-token index each time
    if out.get_vocab() != dict(plan.vocab):
        raise CheckpointError(f"the output tokenizer (source {plan.source!r}) numbers its tokens otherwise than "
                              f"the planned vocabulary of {plan.size} tokens; cannot lay out embedding rows")
    return out


def _rules(config: MergeConfig, vocab: dict[str, int], index: dict[str, np.ndarray],
           settings: dict[str, TokenSetting], original: dict[str, dict[str, int]], order: list[str],
           base: str | None) -> tuple[np.ndarray, dict[int, Rule], list[str]]:
    """(forced, default-row rules, warnings) of a merge of the models `order` (rule 3 of the module doc)."""
    size = len(vocab)
    forced = np.zeros(size, bool)
    rules: dict[int, Rule] = {}
    warnings: list[str] = []
    for token, new_id in sorted(vocab.items(), key=lambda item: item[1]):
        setting = settings.get(token)
        if setting is not None and setting.force:
            forced[new_id] = True
        have = [ref for ref in order if index[ref][new_id] >= 0]
        if len(have) == len(order) and not forced[new_id]:
            continue  # every model keeps its own row
        if setting is not None:
            rules[new_id] = _configured_rule(config, token, setting, order, index, new_id, original)
        elif len(have) == 1:
            rules[new_id] = Rule("row", have[0], int(index[have[0]][new_id]))
        elif not have:
            warnings.append(f"token {token!r} is in no merged model; its rows are zeros")
            rules[new_id] = Rule("zero")
        elif base is not None and base in order and index[base][new_id] >= 0:
            rules[new_id] = Rule("row", base, int(index[base][new_id]))
        else:
            rules[new_id] = Rule("average", models=tuple(have))
    return forced, rules, warnings


def _configured_rule(config: MergeConfig, token: str, setting: TokenSetting, order: list[str],
                     index: dict[str, np.ndarray], new_id: int, original: dict[str, dict[str, int]]) -> Rule:
    key = f"tokenizer.tokens.{token}.source"
    source = setting.source
    if source.kind == "zero":
        return Rule("zero")
    if source.kind == "default":
        missing = [ref for ref in order if index[ref][new_id] < 0]
        why = "it is forced" if setting.force else f"{missing[0]!r} lacks it"
        raise _fail(config, f"{key}: needed ({why}) but not given; give a model, kind: zero or kind: model_token")
    if source.model not in order:
        raise _fail(config, f"{key}: {source.model!r} is not one of the merged models")
    if source.kind == "model":
        row = int(index[source.model][new_id])
        if row < 0:
            raise _fail(config, f"{key}: {source.model!r} does not have the token {token!r}")
        return Rule("row", source.model, row)
    row = source.token_id
    if row is None:
        vocab = original.get(source.model, original[next(iter(original))])
        if source.token not in vocab:
            raise _fail(config, f"{key}.token: {source.token!r} is not in the vocabulary of {source.model!r}")
        row = vocab[source.token]
    return Rule("row", source.model, int(row))


# -- the rows ----------------------------------------------------------------------------------------
class VocabularyAligner:
    """Each merged model's vocabulary tensors, rewritten to the output vocabulary.

    `read(ref, name)` returns a model's tensor as stored (cast to the config's dtype, if any). The
    default rows of a tensor are computed once, reading each model's tensor once; then every model's
    rewritten tensor costs one more read of its own."""

    def __init__(self, plan: VocabularyPlan, read: Callable[[str, str], np.ndarray],
                 dtype_of: Callable[[str, str], np.dtype]):
        self.plan = plan
        self._read = read
        self._dtype_of = dtype_of
        self._defaults: dict[str, dict[int, np.ndarray]] = {}

    def dtype(self, name: str) -> np.dtype:
        return np.result_type(*[self._dtype_of(ref, name) for ref in self.plan.order])

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.plan.rows,) + tuple(shape[1:])

    def _checked(self, ref: str, name: str) -> np.ndarray:
        array = np.asarray(self._read(ref, name))
        need = [r for r in (self.plan.index[ref].max(initial=-1),) if r >= 0]
        need += [rule.row for rule in self.plan.rules.values() if rule.kind == "row" and rule.model == ref]
        if need and max(need) >= array.shape[0]:
            raise MergeInputError(f"tensor {name!r} of {ref} has {array.shape[0]} rows, but its vocabulary needs "
                                  f"row {max(need)}")
        return array

    def _default_rows(self, name: str) -> dict[int, np.ndarray]:
        if name in self._defaults:
            return self._defaults[name]
        if not self.plan.rules:
            return {}
        dtype = self.dtype(name)
        rules = self.plan.rules
        defaults: dict[int, np.ndarray] = {}
        sums: dict[int, np.ndarray] = {}
        shape = None
        for ref in self.plan.order:
            wanted_rows = [i for i, rule in rules.items() if rule.kind == "row" and rule.model == ref]
            averaged = [i for i, rule in rules.items() if rule.kind == "average" and ref in rule.models]
            if not wanted_rows and not averaged and shape is not None:
                continue
            array = self._checked(ref, name).astype(dtype, copy=False)
            shape = array.shape[1:]
            for i in wanted_rows:
                defaults[i] = array[rules[i].row].copy()
            for i in averaged:
                row = array[self.plan.index[ref][i]]
                sums[i] = (sums[i] if i in sums else np.zeros(shape, dtype)) + row
        for i, rule in rules.items():
            if rule.kind == "zero":
                defaults[i] = np.zeros(shape, dtype)
            elif rule.kind == "average":
                defaults[i] = (sums[i] / np.asarray(len(rule.models), dtype)).astype(dtype)
        self._defaults[name] = defaults
        return defaults

    def aligned(self, ref: str, name: str) -> np.ndarray:
        """Model `ref`'s tensor `name` with one row per output token (and the padding rows)."""
        defaults = self._default_rows(name)
        plan = self.plan
        array = self._checked(ref, name).astype(self.dtype(name), copy=False)
        out = np.zeros((plan.rows,) + array.shape[1:], array.dtype)
        own = plan.index[ref]
        keep = (own >= 0) & ~plan.forced
        out[:plan.size][keep] = array[own[keep]]
        for i, row in defaults.items():
            if not keep[i]:
                out[i] = row
        if plan.rows > plan.size:
            mean = out[:plan.size].astype(np.float64 if array.dtype == np.float64 else np.float32).mean(axis=0)
            out[plan.size:] = mean.astype(array.dtype)
        return out

    def forget(self, name: str) -> None:
        self._defaults.pop(name, None)


class AlignedView:
    """A reader (HF names) whose vocabulary tensors come out rewritten to the output vocabulary."""

    def __init__(self, view: Any, ref: str, aligner: VocabularyAligner):
        self.view, self.ref, self.aligner = view, ref, aligner
        for attr in ("format", "path", "config_dir", "arch", "naming"):
            if hasattr(view, attr):
                setattr(self, attr, getattr(view, attr))

    def _is_vocab(self, name: str) -> bool:
        return is_vocabulary_tensor(name, tuple(self.view.shape(name)))

    def keys(self) -> list[str]:
        return self.view.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.view.shape(name))
        return self.aligner.shape(name, shape) if self._is_vocab(name) else shape

    def dtype(self, name: str):
        return self.aligner.dtype(name) if self._is_vocab(name) else self.view.dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self.aligner.aligned(self.ref, name) if self._is_vocab(name) else self.view.get(name)

    def close(self) -> None:
        self.view.close()


def align_views(plan: VocabularyPlan, refs: list[str], views: list[Any], cast: np.dtype | None) -> list[AlignedView]:
    """Wrap the open views of a merge (`refs[i]` is the model reference of `views[i]`). The default rows
    are made from these models (all of the plan's, or those of one slice). `cast`: the config's dtype,
    applied before the rows are built."""
    readers: dict[str, Any] = {}
    for ref, view in zip(refs, views):
        readers.setdefault(ref, view)
    unknown = [ref for ref in readers if ref not in plan.index]
    if unknown:
        raise CheckpointError(f"{unknown[0]}: this model has no place in the output vocabulary plan")
    plan = plan.for_models(list(readers))

    def read(ref: str, name: str) -> np.ndarray:
        array = np.asarray(readers[ref].get(name))
        return array.astype(cast) if cast is not None and is_floating(array.dtype) else array

    def dtype_of(ref: str, name: str) -> np.dtype:
        dtype = np.dtype(readers[ref].dtype(name))
        return np.dtype(cast) if cast is not None and is_floating(dtype) else dtype

    aligner = VocabularyAligner(plan, read, dtype_of)
    return [AlignedView(view, ref, aligner) for ref, view in zip(refs, views)]


def print_warnings(plan: VocabularyPlan) -> None:
    for note in plan.warnings:
        print(f"drm-jax: warning: {one_line(note)}", file=sys.stderr)


__all__ = ["Rule", "Tokenizers", "VocabularyPlan", "align_views", "build_tokenizer",
           "plan_vocabulary", "read_tokenizers"]
