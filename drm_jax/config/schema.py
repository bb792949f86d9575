"""Merge configurations: mergekit's YAML schema, parsed and checked into a `MergeConfig`.

A config written for mergekit works unchanged::

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/math
        parameters: {weight: 0.6, density: 0.5}
      - model: path/to/code
        parameters: {weight: 0.4, density: 0.7}
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32
    tokenizer_source: base

`drm` is one line away (`merge_method: drm`, parameters `drop_rate`, `direction`, `rank_rtol`,
`renormalize`, `include`, `exclude`, ...; a model's `weight` is its coefficient lambda_t).

Everything is checked here, before any checkpoint is opened: unknown keys, unknown methods and parameters,
wrong types, out-of-range values. Errors are `ConfigError`s whose message names the file and the key
(`models[1].parameters.density`). The schema is declared as tables, one `Block` of `Field`s per mapping
(`CONFIG`, `MODEL_ENTRY`, `SLICE`, `SLICE_SOURCE`, `MODULE`, `TOKENIZER`, `TOKEN_SETTING`,
`MODEL_TOKEN_SOURCE`): each field's name, whether it is required, its default and its check (type, bounds,
allowed values); `Block.read` drives the checks and words the unknown-key and missing-key errors.
Which parameters a method accepts, their types and ranges, come from the method registry
(`drm_jax.methods.registry`), the one place they are declared; what they mean is the method's.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from drm_jax.config.chat_templates import check_chat_template
from drm_jax.config.settings import check_setting
from drm_jax.errors import ConfigError, clip, quote
from drm_jax.io.bounded_yaml import YamlBoundError, load_bounded_yaml
from drm_jax.io.hub import hub_snapshot, split_hub_id
from drm_jax.methods.base import Param
from drm_jax.methods.registry import METHODS, get_method

# Most models one merge (or one slice) takes: per-model costs (readers, stacked inputs, programs) stay
# bounded; model soups and mergekit configs use a few to a few dozen.
MAX_MODELS = 256
# Largest tokenizer.pad_to_multiple_of: real vocabularies pad to 8 ... 128; a larger one only adds rows.
MAX_PAD_TO_MULTIPLE_OF = 2**16
# mergekit's name of the one module of single-module architectures (every architecture with layer naming)
DEFAULT_MODULE = "default"
# Leaf-selection patterns every method accepts (keywords of drm_jax.merge itself, not method parameters).
ROLE_PARAMS = ("include", "exclude", "ignore")
# The largest float32 (numpy.finfo(numpy.float32).max): the command line's merges compute in float32.
FLOAT32_MAX = 3.4028234663852886e38


def accepted_names(method: str) -> frozenset[str]:
    """Every parameter name a config may give for the method: the registry's names and aliases, and the
    leaf-selection patterns."""
    return frozenset(get_method(method).names) | frozenset(ROLE_PARAMS)


def per_model_names(method: str) -> frozenset[str]:
    """Names a model entry may give (mergekit's `models[i].parameters`): per-model parameters and their
    aliases, and `density` where it names a drop rate shared by all models (DRM: the values must agree)."""
    spec = get_method(method)
    names = {n for p in spec.params if p.per_model for n in (p.name,) + p.aliases}
    names |= {"density"} & set(spec.names)
    return frozenset(names)


class _MethodParams(Mapping):
    """method name -> `accepted_names`, read from the registry at each lookup (a method registered with
    `drm_jax.methods.register` is accepted as soon as it is registered)."""

    def __getitem__(self, name: str) -> frozenset[str]:
        if name not in METHODS:
            raise KeyError(name)
        return accepted_names(name)

    def __iter__(self):
        return iter(list(METHODS))

    def __len__(self) -> int:
        return len(METHODS)


class _NeedsBase:
    """The registered methods that need a base model, read from the registry at each lookup."""

    def __contains__(self, name) -> bool:
        return name in METHODS and METHODS[name].needs_base


METHOD_PARAMS: Mapping[str, frozenset[str]] = _MethodParams()
NEEDS_BASE = _NeedsBase()

DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64",
}


@dataclass(frozen=True)
class ModelEntry:
    """One input model: its reference as written, where it came from in the config, its parameters.

    `model` is a path to any checkpoint the readers support, or mergekit's `base+adapter` form for a
    PEFT adapter applied over a model. `parameters` holds the per-model values the config gives (names as
    written: `weight`, `density`, ...).
    """

    model: str
    key: str  # e.g. "models[1]", for error messages
    parameters: Mapping[str, Any] = field(default_factory=dict)
    layer_range: tuple[int, int] | None = None  # a slice source's layers [start, stop)

    @property
    def weight(self) -> float | None:
        return self.parameters.get("weight", self.parameters.get("coefficients"))

    @property
    def density(self) -> float | None:
        return self.parameters.get("density")


@dataclass(frozen=True)
class TokenSource:
    """Where a token's embedding / lm_head rows come from (mergekit's `tokenizer.tokens.<token>.source`).

    kind: "model" (the token's own row in `model`), "model_token" (the row of `token_id`, or of `token`
    in that model's own vocabulary, in `model`), "zero", or "default" (no source given).
    """

    kind: str
    model: str | None = None
    token_id: int | None = None
    token: str | None = None


@dataclass(frozen=True)
class TokenSetting:
    """One entry of the `tokens` block: a source, and `force` (use it even in models that have the token)."""

    source: TokenSource
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """mergekit's `tokenizer` block (or `tokenizer_source`, which is the block with only its source).

    source: "base", "union" (mergekit's default for the block) or a model reference.
    tokens: (token, setting) pairs, in config order; each token is added to the output vocabulary.
    pad_to_multiple_of: the output vocabulary (embedding rows) is padded up to a multiple of it.
    """

    source: str = "union"
    tokens: tuple[tuple[str, TokenSetting], ...] = ()
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class SliceEntry:
    """One output slice (mergekit's `slices[i]`): its sources, each a model with a `layer_range` (all of
    the same length) and per-model `parameters`; the slice's own base_model, parameters and, as a drm-jax
    extension (mergekit 0.1.5 ignores the key), merge_method."""

    sources: tuple[ModelEntry, ...]
    key: str  # e.g. "slices[1]"
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    merge_method: str | None = None

    @property
    def num_layers(self) -> int:
        start, stop = self.sources[0].layer_range
        return stop - start


@dataclass(frozen=True)
class MergeConfig:
    """A checked merge configuration.

    Attributes:
      merge_method: a registered method (`drm_jax.methods.METHODS`).
      models: the input models, in config order (the base model included if the config lists it).
      base_model: the base's reference, or None (allowed for methods that need no base only).
      parameters: shared parameters with the names given (`lambda`, `normalize`, `drop_rate`, ...),
        including defaults for per-model parameters (`weight`, `density`) if the config gives them there.
      dtype: computation/output dtype name ("float32", "float16", "bfloat16", "float64") or None.
      out_dtype: output dtype name, or None (then `dtype`, then each tensor's own dtype).
      tokenizer_source: None, "base", "union" or a model reference: the output vocabulary (mergekit's
        tokenizer_source; the embedding rows are aligned to it).
      tokenizer: mergekit's `tokenizer` block (`TokenizerSpec`), or None. At most one of the two is given.
      chat_template: a template name, "auto", a Jinja template, or None (`drm_jax.config.chat_templates`).
      source: the YAML file, or None for a config built from a dict.
      text: the config's text as given (written as mergekit_config.yml), or None.
      slices: mergekit's `slices` (or `modules.default.slices`), in output order; empty for a `models`
        config. With slices, `models` lists every source model once (its first source entry).
      module_parameters: `modules.default.parameters` (between a slice's and the top-level parameters).
      hub_cache: the Hugging Face Hub cache folder that models named by a Hub id are found in (mergekit's
        --transformers-cache), or None: the environment's (`drm_jax.io.hub.hub_cache_dir`).
    Parameter values are numbers, strings and booleans, or, for traced parameters, mergekit's gradients
    and filter lists (`drm_jax.config.settings`).
    """

    merge_method: str
    models: tuple[ModelEntry, ...]
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    source: Path | None = None
    text: str | None = field(default=None, repr=False, compare=False)
    slices: tuple[SliceEntry, ...] = ()
    module_parameters: Mapping[str, Any] = field(default_factory=dict)
    hub_cache: str | None = field(default=None, compare=False)

    @property
    def tokenizer_spec(self) -> TokenizerSpec | None:
        """The output vocabulary's settings: the `tokenizer` block, or `tokenizer_source` as a block with
        no tokens; None when neither is given (the reference's tokenizer files are copied)."""
        if self.tokenizer is not None:
            return self.tokenizer
        return None if self.tokenizer_source is None else TokenizerSpec(source=self.tokenizer_source)

    def local_path(self, reference: str) -> Path:
        """Path of a model reference on disk: relative paths are taken from the current directory (mergekit's
        convention) or, where nothing exists there, from the config file's directory."""
        path = Path(reference).expanduser()
        if path.is_absolute() or path.exists() or self.source is None:
            return path
        beside = self.source.parent / path
        return beside if beside.exists() else path

    def resolve(self, reference: str) -> Path:
        """Path of a model reference: `local_path`, or where nothing exists there and the reference is a
        Hugging Face Hub id (`org/name[@revision]`), its snapshot in the Hub cache (`hub_cache`, else the
        environment's), downloaded when the network is allowed (`drm_jax.io.hub`; CheckpointError naming
        the id otherwise)."""
        path = self.local_path(reference)
        if path.exists() or path.is_absolute() or split_hub_id(reference) is None:
            return path
        return hub_snapshot(reference, self.hub_cache)


class _Invalid(Exception):
    """A schema problem; its message starts with the key. `parse_config` adds the file (a ConfigError)."""


def _at(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


# A field's check: (value, key, got) -> the checked value, raising _Invalid. `got` holds the block's context
# (the merge method, the base model) and the fields of the block checked before this one.
Check = Callable[[Any, str, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Field:
    """One key of a mapping block.

    required: a block without the key (or with a null one, where null_is_absent) is refused ("KEY: missing").
    default: the value of an absent key (and of a null one where null_is_absent), given without a check.
    null_is_absent: a null value (YAML `~`, an empty value) counts as absent; else it is checked like any
      other. With null_is_absent False, an absent key's default is checked too.
    """

    name: str
    check: Check
    required: bool = False
    default: Any = None
    null_is_absent: bool = True


@dataclass(frozen=True)
class Block:
    """A mapping with known keys (the config, a model entry, a slice, the tokenizer block, ...): its fields,
    in the order they are checked; `shape`, the message for a value that is no mapping ({got}: the value
    quoted, {type}: its type); `unknown`, what a key outside the fields is told ({keys}: the fields' names).

    The fields are the schema: `read` checks a mapping against them (unknown keys, missing ones, each
    value's check, in order), so the messages, the bounds and the keys they list are declared once."""

    fields: tuple[Field, ...]
    shape: str
    unknown: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def read(self, raw: Any, key: str, **context: Any) -> dict[str, Any]:
        """The checked values of `raw` by field name (absent ones at their default). `context` is passed to
        every check (beside the fields read so far) and not returned."""
        if not isinstance(raw, dict):
            message = self.shape.format(got=quote(raw), type=type(raw).__name__)
            raise _Invalid(f"{key}: {message}" if key else message)
        unknown = sorted((k for k in raw if k not in self.names), key=str)
        if unknown:
            raise _Invalid(f"{_at(key, clip(unknown[0]))}: unknown key; {self.unknown.format(keys=list(self.names))}")
        for f in self.fields:
            if f.required and (f.name not in raw or (f.null_is_absent and raw[f.name] is None)):
                raise _Invalid(f"{_at(key, f.name)}: missing")
        got = dict(context)
        values: dict[str, Any] = {}
        for f in self.fields:
            if f.null_is_absent and raw.get(f.name) is None:
                value = f.default
            else:
                value = f.check(raw.get(f.name, f.default), _at(key, f.name), got)
            got[f.name] = values[f.name] = value
        return values


def _is_patterns(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(p, str) for p in v))


def _param_of(method: str, name: str):
    """The registry's Param behind a name (or alias) of the method."""
    spec = get_method(method)
    for p in spec.params:
        if name == p.name or name in p.aliases:
            return p
    return None


def _float32_value(value: Any, key: str) -> Any:
    """A checked value, refused (ValueError naming the key) where float32 cannot hold it: the command line
    merges in float32, where it would become Inf (and numpy would warn) deep inside the merge."""
    if isinstance(value, tuple):
        return tuple(_float32_value(v, f"{key}[{i}]") for i, v in enumerate(value))
    if isinstance(value, float) and abs(value) > FLOAT32_MAX:
        raise ValueError(f"{key}: {value:g} is beyond float32's range (|x| <= {FLOAT32_MAX:.4g}), in which the "
                         f"merge computes")
    return value


def _check_param(key: str, method: str, name: str, value: Any) -> Any:
    if name in ROLE_PARAMS:
        if not _is_patterns(value):
            raise _Invalid(f"{key}: must be a regular expression or a list of them, got {quote(value)}")
        return value
    owner = param = _param_of(method, name)
    if name != param.name and name in dict(param.alias_maps):  # an alias with a value of its own kind
        param = Param(name, param.kind, None, "")
    try:
        # one value, or a gradient / filter list (mergekit's per-tensor settings) for a traced parameter
        return check_setting(value, key, lambda v, k: _float32_value(param.check(v, k), k), varying=owner.traced,
                             name=name)
    except ValueError as err:
        raise _Invalid(str(err)) from None


def _named_values(key: str, value: Any) -> dict:
    """A `parameters` mapping: names (strings) to values; absent or null: empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"{key}: must be a mapping of names to values, got {type(value).__name__}")
    for name in value:
        if not isinstance(name, str):
            raise _Invalid(f"{key}: parameter names must be strings, got {quote(name)}")
    return value


def _method(value: Any, key: str, got: Mapping[str, Any]) -> str:
    if not isinstance(value, str) or value not in METHOD_PARAMS:
        raise _Invalid(f"{key}: unknown method {quote(value)}; expected one of {sorted(METHOD_PARAMS)}")
    return value


def _shared_parameters(value: Any, key: str, got: Mapping[str, Any]) -> dict:
    """A `parameters` mapping that may hold shared and per-model parameters (top level, slice, module) of
    the method `got["method"]` (a slice's own `merge_method` where it gives one)."""
    method = got.get("merge_method") or got["method"]
    out: dict[str, Any] = {}
    for name, v in _named_values(key, value).items():
        pkey = f"{key}.{name}"
        if name not in METHOD_PARAMS[method]:
            raise _Invalid(f"{clip(pkey)}: unknown parameter for method {method!r}; accepted: "
                           f"{sorted(METHOD_PARAMS[method])}")
        out[name] = _check_param(pkey, method, name, v)
    return out


def _per_model_parameters(value: Any, key: str, got: Mapping[str, Any]) -> dict:
    """A model entry's (or slice source's) `parameters`: per-model parameters of `got["method"]`."""
    method = got["method"]
    per_model = per_model_names(method)
    out: dict[str, Any] = {}
    for name, v in _named_values(key, value).items():
        pkey = f"{key}.{name}"
        if name not in per_model:
            shared = name in METHOD_PARAMS[method]
            hint = " (it is a shared parameter: put it under the top-level 'parameters')" if shared else ""
            raise _Invalid(f"{pkey}: unknown per-model parameter for method {method!r}{hint}; "
                           f"accepted: {sorted(per_model)}")
        out[name] = _check_param(pkey, method, name, v)
    return out


def _reference(value: Any, key: str, got: Mapping[str, Any] | None = None) -> str:
    if isinstance(value, dict) and "model" in value and set(value) <= {"model", "lora"}:
        # mergekit's structured ModelReference: {model: ..., lora: ...}
        base = _reference(value["model"], f"{key}.model")
        return base if value.get("lora") is None else f"{base}+{_reference(value['lora'], f'{key}.lora')}"
    if isinstance(value, dict) and "path" in value and set(value) <= {"path", "revision"}:
        value = value["path"]
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"{key}: must be a model path, got {quote(value)}")
    return value.strip()


def _vocabulary_source(value: Any, key: str, got: Mapping[str, Any]) -> str:
    """`tokenizer_source` / `tokenizer.source`: "base", "union" or a model reference."""
    return value if value in ("base", "union") else _reference(value, key)


def _dtype(value: Any, key: str, got: Mapping[str, Any]) -> str:
    name = str(value)
    name = name[len("torch."):] if name.startswith("torch.") else name
    if name not in DTYPES:
        raise _Invalid(f"{key}: unknown dtype {quote(value)}; expected one of {sorted(set(DTYPES.values()))}")
    return DTYPES[name]


def _chat_template(value: Any, key: str, got: Mapping[str, Any]) -> str | None:
    if value == "":
        return None
    if not isinstance(value, str):
        raise _Invalid(f"{key}: must be a template name, 'auto' or a Jinja template, got {quote(value)}")
    problem = check_chat_template(value)
    if problem is not None:
        raise _Invalid(f"{key}: {quote(value)}: {problem}")
    return value


def _instance(kind: type, describe: str) -> Check:
    """The check of a value of one type: "must be {describe}" otherwise."""
    def check(value: Any, key: str, got: Mapping[str, Any]) -> Any:
        if not isinstance(value, kind):
            raise _Invalid(f"{key}: must be {describe}, got {quote(value)}")
        return value
    return check


def _integer(low: int, describe: str, high: int | None = None, why: str = "") -> Check:
    """The check of an integer (not a bool) in [low, high]: "must be {describe}" below, "at most {high}{why}"
    above."""
    def check(value: Any, key: str, got: Mapping[str, Any]) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _Invalid(f"{key}: must be {describe}, got {quote(value)}")
        if high is not None and value > high:
            raise _Invalid(f"{key}: at most {high}{why}, got {quote(value)}")
        return value
    return check


def _layer_range(value: Any, key: str, got: Mapping[str, Any]) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise _Invalid(f"{key}: must be [start, stop], two layer indices, got {quote(value)}")
    start, stop = value
    if not 0 <= start < stop:
        raise _Invalid(f"{key}: must be [start, stop] with 0 <= start < stop, got {quote(value)}")
    return int(start), int(stop)


def _as_given(value: Any, key: str, got: Mapping[str, Any]) -> Any:
    """A field taken as it is: checked outside its block (a model_token source's `kind`, read to choose
    the block; `models` / `slices` / `modules`, of which exactly one is given), or unused (a slice's
    `residual_weight`: in mergekit's schema, unused by mergekit itself)."""
    return value


def _entry_list(value: Any, key: str, shape: str, bounded: bool = True) -> list:
    """A non-empty list (of models, slices or slice sources); a list of models holds at most MAX_MODELS:
    each is read for every tensor of the merge, and the stacked inputs, the compiled programs and the open
    readers grow with the count."""
    if not isinstance(value, list) or not value:
        raise _Invalid(f"{key}: must be a non-empty list of {shape}")
    if bounded and len(value) > MAX_MODELS:
        raise _Invalid(f"{key}: {len(value)} entries; at most {MAX_MODELS} models are merged at once (merge "
                       f"them in groups and merge the results)")
    return value


MODEL_ENTRY = Block(
    fields=(Field("model", _reference, required=True, null_is_absent=False),
            Field("parameters", _per_model_parameters, null_is_absent=False)),
    shape="must be a mapping with a 'model' key, got {got}",
    unknown="a model entry has 'model' and 'parameters'")
SLICE_SOURCE = Block(
    fields=(Field("model", _reference, required=True, null_is_absent=False),
            Field("layer_range", _layer_range, required=True, null_is_absent=False),
            Field("parameters", _per_model_parameters, null_is_absent=False)),
    shape="must be a mapping with 'model' and 'layer_range', got {got}",
    unknown="a slice source has {keys}")


def _sources(value: Any, key: str, got: Mapping[str, Any]) -> tuple[ModelEntry, ...]:
    """A slice's `sources`: one to MAX_MODELS distinct models, each covering as many layers."""
    _entry_list(value, key, "{model: PATH, layer_range: [start, stop], parameters: {...}}")
    method = got["merge_method"] or got["method"]
    sources: list[ModelEntry] = []
    for j, raw in enumerate(value):
        skey = f"{key}[{j}]"
        entry = SLICE_SOURCE.read(raw, skey, method=method)
        if any(s.model == entry["model"] for s in sources):
            raise _Invalid(f"{skey}.model: {quote(entry['model'])} is already a source of this slice "
                           f"(mergekit refuses duplicate merge inputs)")
        sources.append(ModelEntry(entry["model"], skey, entry["parameters"], entry["layer_range"]))
    length = sources[0].layer_range[1] - sources[0].layer_range[0]
    for s in sources[1:]:
        if s.layer_range[1] - s.layer_range[0] != length:
            raise _Invalid(f"{s.key}.layer_range: {list(s.layer_range)} covers {s.layer_range[1] - s.layer_range[0]} "
                           f"layers, {key}[0] {length}; every source of a slice covers the same number of layers")
    return tuple(sources)


# mergekit's output slice (`slices[i]`); merge_method is a drm-jax extension (mergekit 0.1.5 ignores it),
# residual_weight is in mergekit's schema and unused by it (accepted, no effect).
SLICE = Block(
    fields=(Field("merge_method", _method), Field("sources", _sources, null_is_absent=False),
            Field("base_model", _reference), Field("parameters", _shared_parameters, null_is_absent=False),
            Field("residual_weight", _as_given)),
    shape="must be a mapping with 'sources', got {got}",
    unknown="a slice has {keys}")
MODULE = Block(
    fields=(Field("slices", _as_given), Field("models", _as_given),
            Field("parameters", _shared_parameters, null_is_absent=False)),
    shape="must be a mapping with 'slices' or 'models', got {got}",
    unknown="a module has {keys}")


def _models_list(key: str, raw: Any, method: str, base: str | None) -> tuple[ModelEntry, ...]:
    _entry_list(raw, key, "{model: PATH, parameters: {...}}")
    models = []
    for i, entry in enumerate(raw):
        ekey = f"{key}[{i}]"
        if isinstance(entry, str):
            models.append(ModelEntry(model=_reference(entry, ekey), key=ekey))
        else:
            values = MODEL_ENTRY.read(entry, ekey, method=method)
            models.append(ModelEntry(model=values["model"], key=ekey, parameters=values["parameters"]))
    if base is None and method in NEEDS_BASE:
        raise _Invalid(f"base_model: missing; method {method!r} merges over a base model (mergekit: required)")
    if method in NEEDS_BASE and not [m for m in models if m.model != base]:
        raise _Invalid(f"{key}: no model to merge besides the base model")
    return tuple(models)


def _slices_list(key: str, raw: Any, method: str, base: str | None) -> tuple[SliceEntry, ...]:
    _entry_list(raw, key, "slices {sources: [...]}", bounded=False)
    slices = []
    for i, entry in enumerate(raw):
        values = SLICE.read(entry, f"{key}[{i}]", method=method)
        slices.append(SliceEntry(values["sources"], f"{key}[{i}]", values["base_model"], values["parameters"],
                                 values["merge_method"]))
    for s in slices:
        spec = get_method(s.merge_method or method)
        if spec.needs_base and (s.base_model or base) is None:
            raise _Invalid(f"{s.key}.base_model: missing; method {spec.name!r} merges over a base model (give "
                           f"base_model, for the slice or at the top level)")
        if spec.needs_base and (s.base_model or base) not in [m.model for m in s.sources]:
            where = f"{s.key}.base_model" if s.base_model else "base_model"
            raise _Invalid(f"{where}: {quote(s.base_model or base)} is not a source of {s.key}; a slice merges its "
                           f"sources over the one that is the base model (mergekit)")
    return tuple(slices)


def _model_inputs(raw: dict, method: str, base: str | None):
    """(models, slices, module parameters) of exactly one of `models`, `slices`, `modules` (mergekit).
    With slices, `models` lists every source model once."""
    given = [k for k in ("models", "slices", "modules") if raw.get(k) not in (None, [], {})]
    if len(given) > 1:
        raise _Invalid(f"{given[1]}: give exactly one of 'models', 'slices' and 'modules' (mergekit), got "
                       f"{' and '.join(given)}")
    for k in ("slices", "modules"):
        if k in raw and raw[k] in ([], {}, None):
            raise _Invalid(f"{k}: must not be empty")
    if not given:
        raise _Invalid("models: missing; list the models to merge (or give 'slices' or 'modules')")
    module_parameters: dict[str, Any] = {}
    if given[0] == "modules":
        modules = raw["modules"]
        if not isinstance(modules, dict):
            raise _Invalid(f"modules: must be a mapping of module names to {{slices | models, parameters}}, got "
                           f"{quote(modules)}")
        names = sorted(map(str, modules))
        if names != [DEFAULT_MODULE]:
            other = next((n for n in names if n != DEFAULT_MODULE), names[0])
            raise _Invalid(f"modules.{clip(other)}: only the module {DEFAULT_MODULE!r} of single-module "
                           f"architectures (llama, mistral, qwen2, gpt2, bert, ...) is supported")
        key = f"modules.{DEFAULT_MODULE}"
        module = modules[DEFAULT_MODULE]
        values = MODULE.read(module, key, method=method)
        inner = [k for k in ("slices", "models") if values[k]]
        if len(inner) != 1:
            raise _Invalid(f"{key}: give exactly one of 'slices' and 'models' (mergekit)")
        module_parameters = values["parameters"]
        given, raw = [inner[0]], {inner[0]: values[inner[0]]}
        prefix = f"{key}.{inner[0]}"
    else:
        prefix = given[0]
    if given[0] == "models":
        return _models_list(prefix, raw["models"], method, base), (), module_parameters
    slices = _slices_list(prefix, raw["slices"], method, base)
    seen: dict[str, ModelEntry] = {}
    for s in slices:
        for m in s.sources:
            seen.setdefault(m.model, ModelEntry(m.model, m.key))
    return tuple(seen.values()), slices, module_parameters


MODEL_TOKEN_SOURCE = Block(
    fields=(Field("kind", _as_given), Field("model", _reference, required=True, null_is_absent=False),
            Field("token_id", _integer(0, "a non-negative integer")), Field("token", _instance(str, "a string"))),
    shape="must be a mapping, got {got}",
    unknown="a model_token source has 'model' and one of 'token_id' / 'token'")


def _token_source(value: Any, key: str, got: Mapping[str, Any]) -> TokenSource:
    if value is None:
        return TokenSource("default")
    if isinstance(value, dict) and "kind" in value:
        kind = value["kind"]
        if kind == "zero":
            if set(value) != {"kind"}:
                raise _Invalid(f"{key}: a zero source has only 'kind: zero', got {quote(value)}")
            return TokenSource("zero")
        if kind != "model_token":
            raise _Invalid(f"{key}.kind: expected 'zero' or 'model_token', got {quote(kind)}")
        values = MODEL_TOKEN_SOURCE.read(value, key)
        if (values["token_id"] is None) == (values["token"] is None):
            raise _Invalid(f"{key}: give exactly one of token_id and token")
        return TokenSource("model_token", model=values["model"], token_id=values["token_id"], token=values["token"])
    return TokenSource("model", model=_reference(value, key))


TOKEN_SETTING = Block(
    fields=(Field("source", _token_source, null_is_absent=False),
            Field("force", _instance(bool, "true or false"), default=False, null_is_absent=False)),
    shape="must be a mapping with 'source' and 'force', got {got}",
    unknown="expected 'source' and 'force'")


def _token_settings(value: Any, key: str, got: Mapping[str, Any]) -> tuple[tuple[str, TokenSetting], ...]:
    """`tokenizer.tokens`: token -> TOKEN_SETTING, in config order."""
    if not isinstance(value, dict):
        raise _Invalid(f"{key}: must be a mapping of tokens to settings, got {quote(value)}")
    tokens = []
    for token, setting in value.items():
        tkey = f"{key}.{clip(token)}"
        if not isinstance(token, str) or not token:
            raise _Invalid(f"{tkey}: a token must be a non-empty string, got {quote(token)}")
        values = TOKEN_SETTING.read({} if setting is None else setting, tkey)
        tokens.append((token, TokenSetting(values["source"], values["force"])))
    return tuple(tokens)


TOKENIZER = Block(
    fields=(Field("source", _vocabulary_source, default="union", null_is_absent=False),
            Field("tokens", _token_settings, default=()),
            Field("pad_to_multiple_of", _integer(1, "a positive integer", MAX_PAD_TO_MULTIPLE_OF,
                                                 " (it adds up to that many embedding rows)"))),
    shape="must be a mapping with 'source', 'tokens', 'pad_to_multiple_of', got {got}",
    unknown="expected 'source', 'tokens', 'pad_to_multiple_of'")


def _tokenizer(value: Any, key: str, got: Mapping[str, Any]) -> TokenizerSpec:
    """mergekit's `tokenizer: {source, tokens, pad_to_multiple_of}`."""
    values = TOKENIZER.read(value, key)
    return TokenizerSpec(source=values["source"], tokens=values["tokens"],
                         pad_to_multiple_of=values["pad_to_multiple_of"])


# The config's own keys: those of mergekit's schema that we read.
CONFIG = Block(
    fields=(Field("merge_method", _method, required=True),
            Field("base_model", _reference),
            Field("models", _as_given), Field("slices", _as_given), Field("modules", _as_given),
            Field("parameters", _shared_parameters, null_is_absent=False),
            Field("dtype", _dtype), Field("out_dtype", _dtype),
            Field("tokenizer_source", _vocabulary_source),
            Field("tokenizer", _tokenizer),
            Field("chat_template", _chat_template)),
    shape="the config must be a mapping of keys (merge_method, models, ...), got {type}",
    unknown="expected one of {keys}")
TOP_LEVEL_KEYS = CONFIG.names


def parse_config(raw: Any, source: Path | None = None, text: str | None = None) -> MergeConfig:
    """Check a config already loaded from YAML (a dict) and return it as a `MergeConfig`.

    Raises:
      ConfigError: naming the key (and the file, if `source` is given) of the first problem found.
    """
    try:
        values = CONFIG.read(raw, "")
        method, base = values["merge_method"], values["base_model"]
        models, slices, module_parameters = _model_inputs(raw, method, base)
        tokenizer_source, tokenizer = values["tokenizer_source"], values["tokenizer"]
        if tokenizer_source == "base" and base is None:
            raise _Invalid("tokenizer_source: 'base' needs a base_model")
        if tokenizer is not None and tokenizer_source is not None:
            raise _Invalid("tokenizer: give either tokenizer_source or a tokenizer block, not both (as in mergekit)")
        if tokenizer is not None and tokenizer.source == "base" and base is None:
            raise _Invalid("tokenizer.source: 'base' needs a base_model")
    except _Invalid as err:
        raise ConfigError((f"{source}: " if source is not None else "") + str(err)) from None
    return MergeConfig(
        merge_method=method,
        models=models,
        base_model=base,
        parameters=values["parameters"],
        dtype=values["dtype"],
        out_dtype=values["out_dtype"],
        tokenizer_source=tokenizer_source,
        tokenizer=tokenizer,
        chat_template=values["chat_template"],
        source=source,
        text=text,
        slices=slices,
        module_parameters=module_parameters,
    )


def load_config(path: str | Path) -> MergeConfig:
    """Read and check a YAML merge config.

    The file must be a regular file (a FIFO would block) of at most 1 MiB; YAML aliases may expand to at
    most `drm_jax.io.bounded_yaml.MAX_NODES` values; an error message quotes at most a few hundred
    characters of the config.

    Raises:
      ConfigError: the file is missing or unreadable, is not valid YAML (the message gives the line and
        column), expands past the bounds, or does not follow the schema (the message names the key).
    """
    path = Path(path)
    return config_from_yaml(read_config_text(path), path)


def read_config_text(path: str | Path) -> str:
    """The text of a config file, after `load_config`'s checks (a regular file of at most 1 MiB, UTF-8).

    Raises:
      ConfigError: naming the file.
    """
    max_bytes = 2**20
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: not a regular file; a config is a YAML file")
    if info.st_size > max_bytes:
        raise ConfigError(f"{path}: {info.st_size} bytes; a merge config is at most {max_bytes}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config: {quote(str(err), 120)}") from None
    return text


def config_from_yaml(text: str, source: Path | None = None) -> MergeConfig:
    """Check the YAML text of a merge config (`source`: the file it was read from, which names it in errors
    and holds the relative model paths; None: text given directly, paths relative to the working directory).

    Raises:
      ConfigError: as `load_config`, after the file checks.
    """
    max_message = 400
    path = source if source is not None else "<config text>"
    try:
        raw = load_bounded_yaml(text)
    except YamlBoundError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {quote(problem, 120)}") from None
    if raw is None:
        raise ConfigError(f"{path}: the config is empty")
    try:
        return parse_config(raw, source=source, text=text)
    except ConfigError as err:
        message = str(err)
        if len(message) <= max_message:
            raise
        # A schema error quoting a huge value: keep the file and key (they come first), drop the flood.
        raise ConfigError(f"{message[:max_message]}... ({len(message)} characters)") from None


__all__ = ["MergeConfig", "ModelEntry", "SliceEntry", "TokenSetting", "TokenizerSpec", "config_from_yaml",
           "load_config", "parse_config", "read_config_text"]
