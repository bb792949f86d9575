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
(`models[1].parameters.density`). Which parameters a method accepts, their types and ranges, come from
the method registry (`drm_jax.methods.registry`), the one place they are declared; what they mean is the
method's.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from drm_jax.config.chat_templates import check_chat_template
from drm_jax.config.settings import check_setting
from drm_jax.errors import ConfigError, quote
from drm_jax.io.bounded_yaml import YamlBoundError, load_bounded_yaml
from drm_jax.io.hub import hub_snapshot, split_hub_id
from drm_jax.methods.base import Param, clip, short
from drm_jax.methods.registry import METHODS, get_method

# Top-level keys of mergekit's schema that we read.
TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "tokenizer", "chat_template")
# mergekit keys we know but do not implement: refused with a reason rather than silently ignored.
UNSUPPORTED_KEYS: dict[str, str] = {}
# mergekit's output slice (`slices[i]`); merge_method is a drm-jax extension (mergekit 0.1.5 ignores it),
# residual_weight is in mergekit's schema and unused by it (accepted, no effect).
# Most models one merge (or one slice) takes: per-model costs (readers, stacked inputs, programs) stay
# bounded; model soups and mergekit configs use a few to a few dozen.
MAX_MODELS = 256
# Largest tokenizer.pad_to_multiple_of: real vocabularies pad to 8 ... 128; a larger one only adds rows.
MAX_PAD_TO_MULTIPLE_OF = 2**16
SLICE_KEYS = ("sources", "base_model", "parameters", "merge_method", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODULE_KEYS = ("slices", "models", "parameters")
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


def _where(source: Path | None) -> str:
    return f"{source}: " if source is not None else ""


def _fail(source: Path | None, message: str) -> ConfigError:
    return ConfigError(_where(source) + message)


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


def _check_param(source: Path | None, key: str, method: str, name: str, value: Any) -> Any:
    if name in ROLE_PARAMS:
        if not _is_patterns(value):
            raise _fail(source, f"{key}: must be a regular expression or a list of them, got {short(value)}")
        return value
    owner = param = _param_of(method, name)
    if name != param.name and name in dict(param.alias_maps):  # an alias with a value of its own kind
        param = Param(name, param.kind, None, "")
    try:
        # one value, or a gradient / filter list (mergekit's per-tensor settings) for a traced parameter
        return check_setting(value, key, lambda v, k: _float32_value(param.check(v, k), k), varying=owner.traced,
                             name=name)
    except ValueError as err:
        raise _fail(source, str(err)) from None


def _mapping(source: Path | None, key: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(source, f"{key}: must be a mapping of names to values, got {type(value).__name__}")
    for name in value:
        if not isinstance(name, str):
            raise _fail(source, f"{key}: parameter names must be strings, got {short(name)}")
    return value


def _reference(source: Path | None, key: str, value: Any) -> str:
    if isinstance(value, dict) and "model" in value and set(value) <= {"model", "lora"}:
        # mergekit's structured ModelReference: {model: ..., lora: ...}
        base = _reference(source, f"{key}.model", value["model"])
        return base if value.get("lora") is None else f"{base}+{_reference(source, f'{key}.lora', value['lora'])}"
    if isinstance(value, dict) and "path" in value and set(value) <= {"path", "revision"}:
        value = value["path"]
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, f"{key}: must be a model path, got {short(value)}")
    return value.strip()


def _dtype(source: Path | None, key: str, value: Any) -> str | None:
    if value is None:
        return None
    name = str(value)
    name = name[len("torch."):] if name.startswith("torch.") else name
    if name not in DTYPES:
        raise _fail(source, f"{key}: unknown dtype {short(value)}; expected one of "
                            f"{sorted(set(DTYPES.values()))}")
    return DTYPES[name]


def _model_entry(source: Path | None, index: int, raw: Any, method: str) -> ModelEntry:
    key = f"models[{index}]"
    if isinstance(raw, str):
        return ModelEntry(model=_reference(source, key, raw), key=key)
    if not isinstance(raw, dict):
        raise _fail(source, f"{key}: must be a mapping with a 'model' key, got {short(raw)}")
    unknown = sorted(set(raw) - {"model", "parameters"})
    if unknown:
        raise _fail(source, f"{key}.{clip(unknown[0])}: unknown key; a model entry has 'model' and 'parameters'")
    if "model" not in raw:
        raise _fail(source, f"{key}.model: missing")
    model = _reference(source, f"{key}.model", raw["model"])
    params = _mapping(source, f"{key}.parameters", raw.get("parameters"))
    per_model = per_model_names(method)
    values: dict[str, Any] = {}
    for name, value in params.items():
        pkey = f"{key}.parameters.{name}"
        if name not in per_model:
            shared = name in METHOD_PARAMS[method]
            hint = " (it is a shared parameter: put it under the top-level 'parameters')" if shared else ""
            raise _fail(source, f"{pkey}: unknown per-model parameter for method {method!r}{hint}; "
                                f"accepted: {sorted(per_model)}")
        values[name] = _check_param(source, pkey, method, name, value)
    return ModelEntry(model=model, key=key, parameters=values)


def _shared_parameters(source: Path | None, key: str, raw: Any, method: str) -> dict:
    """A `parameters` mapping that may hold shared and per-model parameters (top level, slice, module)."""
    out: dict[str, Any] = {}
    for name, value in _mapping(source, key, raw).items():
        pkey = f"{key}.{name}"
        if name not in METHOD_PARAMS[method]:
            raise _fail(source, f"{clip(pkey)}: unknown parameter for method {method!r}; accepted: "
                                f"{sorted(METHOD_PARAMS[method])}")
        out[name] = _check_param(source, pkey, method, name, value)
    return out


def _check_count(source: Path | None, key: str, entries: list) -> None:
    """At most MAX_MODELS models in one merge: each is read for every tensor of the merge, and the stacked
    inputs, the compiled programs and the open readers grow with the count."""
    if len(entries) > MAX_MODELS:
        raise _fail(source, f"{key}: {len(entries)} entries; at most {MAX_MODELS} models are merged at once (merge "
                            f"them in groups and merge the results)")


def _models_list(source: Path | None, key: str, raw: Any, method: str, base: str | None) -> tuple[ModelEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise _fail(source, f"{key}: must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    _check_count(source, key, raw)
    try:
        models = tuple(_model_entry(source, i, m, method) for i, m in enumerate(raw))
    except ConfigError as err:  # modules.default.models[i]: the entry's own key
        raise ConfigError(str(err).replace("models[", f"{key}[", 1)) if key != "models" else err from None
    if key != "models":
        models = tuple(ModelEntry(m.model, key + m.key[len("models"):], m.parameters) for m in models)
    if base is None and method in NEEDS_BASE:
        raise _fail(source, f"base_model: missing; method {method!r} merges over a base model (mergekit: "
                            f"required)")
    if method in NEEDS_BASE and not [m for m in models if m.model != base]:
        raise _fail(source, f"{key}: no model to merge besides the base model")
    return models


def _layer_range(source: Path | None, key: str, value: Any) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise _fail(source, f"{key}: must be [start, stop], two layer indices, got {short(value)}")
    start, stop = value
    if not 0 <= start < stop:
        raise _fail(source, f"{key}: must be [start, stop] with 0 <= start < stop, got {short(value)}")
    return int(start), int(stop)


def _slice_entry(source: Path | None, key: str, raw: Any, method: str) -> SliceEntry:
    if not isinstance(raw, dict):
        raise _fail(source, f"{key}: must be a mapping with 'sources', got {short(raw)}")
    unknown = sorted((k for k in raw if k not in SLICE_KEYS), key=str)
    if unknown:
        raise _fail(source, f"{key}.{clip(unknown[0])}: unknown key; a slice has {list(SLICE_KEYS)}")
    own = raw.get("merge_method")
    if own is not None and (not isinstance(own, str) or own not in METHOD_PARAMS):
        raise _fail(source, f"{key}.merge_method: unknown method {short(own)}; expected one of "
                            f"{sorted(METHOD_PARAMS)}")
    method = own or method
    sources_raw = raw.get("sources")
    if not isinstance(sources_raw, list) or not sources_raw:
        raise _fail(source, f"{key}.sources: must be a non-empty list of {{model: PATH, layer_range: [start, "
                            f"stop], parameters: {{...}}}}")
    _check_count(source, f"{key}.sources", sources_raw)
    sources = []
    for j, src in enumerate(sources_raw):
        skey = f"{key}.sources[{j}]"
        if not isinstance(src, dict):
            raise _fail(source, f"{skey}: must be a mapping with 'model' and 'layer_range', got {short(src)}")
        bad = sorted((k for k in src if k not in SOURCE_KEYS), key=str)
        if bad:
            raise _fail(source, f"{skey}.{clip(bad[0])}: unknown key; a slice source has {list(SOURCE_KEYS)}")
        for need in ("model", "layer_range"):
            if need not in src:
                raise _fail(source, f"{skey}.{need}: missing")
        try:
            entry = _model_entry(source, 0, {"model": src["model"], "parameters": src.get("parameters")}, method)
        except ConfigError as err:  # the source's own key
            raise ConfigError(str(err).replace("models[0]", skey, 1)) from None
        entry = ModelEntry(entry.model, skey, entry.parameters, _layer_range(source, f"{skey}.layer_range",
                                                                              src["layer_range"]))
        if any(s.model == entry.model for s in sources):
            raise _fail(source, f"{skey}.model: {short(entry.model)} is already a source of this slice "
                                f"(mergekit refuses duplicate merge inputs)")
        sources.append(entry)
    length = sources[0].layer_range[1] - sources[0].layer_range[0]
    for s in sources[1:]:
        if s.layer_range[1] - s.layer_range[0] != length:
            raise _fail(source, f"{s.key}.layer_range: {list(s.layer_range)} covers "
                                f"{s.layer_range[1] - s.layer_range[0]} layers, {key}.sources[0] {length}; every "
                                f"source of a slice covers the same number of layers")
    base = raw.get("base_model")
    base = None if base is None else _reference(source, f"{key}.base_model", base)
    params = _shared_parameters(source, f"{key}.parameters", raw.get("parameters"), method)
    return SliceEntry(tuple(sources), key, base, params, own)


def _slices_list(source: Path | None, key: str, raw: Any, method: str, base: str | None) -> tuple[SliceEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise _fail(source, f"{key}: must be a non-empty list of slices {{sources: [...]}}")
    slices = tuple(_slice_entry(source, f"{key}[{i}]", s, method) for i, s in enumerate(raw))
    for s in slices:
        spec = get_method(s.merge_method or method)
        if spec.needs_base and (s.base_model or base) is None:
            raise _fail(source, f"{s.key}.base_model: missing; method {spec.name!r} merges over a base model "
                                f"(give base_model, for the slice or at the top level)")
        if spec.needs_base and (s.base_model or base) not in [m.model for m in s.sources]:
            where = f"{s.key}.base_model" if s.base_model else "base_model"
            raise _fail(source, f"{where}: {short(s.base_model or base)} is not a source of {s.key}; a slice "
                                f"merges its sources over the one that is the base model (mergekit)")
    return slices


def _model_inputs(source: Path | None, raw: dict, method: str, base: str | None):
    """(models, slices, module parameters) of exactly one of `models`, `slices`, `modules` (mergekit).
    With slices, `models` lists every source model once."""
    given = [k for k in ("models", "slices", "modules") if raw.get(k) not in (None, [], {})]
    if len(given) > 1:
        raise _fail(source, f"{given[1]}: give exactly one of 'models', 'slices' and 'modules' (mergekit), got "
                            f"{' and '.join(given)}")
    for k in ("slices", "modules"):
        if k in raw and raw[k] in ([], {}, None):
            raise _fail(source, f"{k}: must not be empty")
    if not given:
        raise _fail(source, "models: missing; list the models to merge (or give 'slices' or 'modules')")
    module_parameters: dict[str, Any] = {}
    if given[0] == "modules":
        modules = raw["modules"]
        if not isinstance(modules, dict):
            raise _fail(source, f"modules: must be a mapping of module names to {{slices | models, "
                                f"parameters}}, got {short(modules)}")
        names = sorted(map(str, modules))
        if names != [DEFAULT_MODULE]:
            other = next((n for n in names if n != DEFAULT_MODULE), names[0])
            raise _fail(source, f"modules.{clip(other)}: only the module {DEFAULT_MODULE!r} of single-module "
                                f"architectures (llama, mistral, qwen2, gpt2, bert, ...) is supported")
        module = modules[DEFAULT_MODULE]
        key = f"modules.{DEFAULT_MODULE}"
        if not isinstance(module, dict):
            raise _fail(source, f"{key}: must be a mapping with 'slices' or 'models', got {short(module)}")
        unknown = sorted((k for k in module if k not in MODULE_KEYS), key=str)
        if unknown:
            raise _fail(source, f"{key}.{clip(unknown[0])}: unknown key; a module has {list(MODULE_KEYS)}")
        inner = [k for k in ("slices", "models") if module.get(k)]
        if len(inner) != 1:
            raise _fail(source, f"{key}: give exactly one of 'slices' and 'models' (mergekit)")
        module_parameters = _shared_parameters(source, f"{key}.parameters", module.get("parameters"), method)
        given, raw = [inner[0]], {inner[0]: module[inner[0]]}
        prefix = f"{key}.{inner[0]}"
    else:
        prefix = given[0]
    if given[0] == "models":
        return _models_list(source, prefix, raw["models"], method, base), (), module_parameters
    slices = _slices_list(source, prefix, raw["slices"], method, base)
    seen: dict[str, ModelEntry] = {}
    for s in slices:
        for m in s.sources:
            seen.setdefault(m.model, ModelEntry(m.model, m.key))
    return tuple(seen.values()), slices, module_parameters


def _token_source(source: Path | None, key: str, value: Any) -> TokenSource:
    if value is None:
        return TokenSource("default")
    if isinstance(value, dict) and "kind" in value:
        kind = value["kind"]
        if kind == "zero":
            if set(value) != {"kind"}:
                raise _fail(source, f"{key}: a zero source has only 'kind: zero', got {short(value)}")
            return TokenSource("zero")
        if kind != "model_token":
            raise _fail(source, f"{key}.kind: expected 'zero' or 'model_token', got {short(kind)}")
        unknown = sorted(set(value) - {"kind", "model", "token_id", "token"})
        if unknown:
            raise _fail(source, f"{key}.{clip(unknown[0])}: unknown key; a model_token source has 'model' and "
                                f"one of 'token_id' / 'token'")
        if "model" not in value:
            raise _fail(source, f"{key}.model: missing")
        model = _reference(source, f"{key}.model", value["model"])
        token_id, token = value.get("token_id"), value.get("token")
        if (token_id is None) == (token is None):
            raise _fail(source, f"{key}: give exactly one of token_id and token")
        if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
            raise _fail(source, f"{key}.token_id: must be a non-negative integer, got {short(token_id)}")
        if token is not None and not isinstance(token, str):
            raise _fail(source, f"{key}.token: must be a string, got {short(token)}")
        return TokenSource("model_token", model=model, token_id=token_id, token=token)
    return TokenSource("model", model=_reference(source, key, value))


def _tokenizer_block(source: Path | None, raw: Any) -> TokenizerSpec:
    """mergekit's `tokenizer: {source, tokens, pad_to_multiple_of}`."""
    if not isinstance(raw, dict):
        raise _fail(source, f"tokenizer: must be a mapping with 'source', 'tokens', 'pad_to_multiple_of', "
                            f"got {short(raw)}")
    unknown = sorted(set(raw) - {"source", "tokens", "pad_to_multiple_of"}, key=str)
    if unknown:
        raise _fail(source, f"tokenizer.{clip(unknown[0])}: unknown key; expected 'source', 'tokens', "
                            f"'pad_to_multiple_of'")
    tok_source = raw.get("source", "union")
    if tok_source not in ("base", "union"):
        tok_source = _reference(source, "tokenizer.source", tok_source)
    tokens_raw = raw.get("tokens")
    if tokens_raw is None:
        tokens_raw = {}
    if not isinstance(tokens_raw, dict):
        raise _fail(source, f"tokenizer.tokens: must be a mapping of tokens to settings, got {short(tokens_raw)}")
    tokens = []
    for token, setting in tokens_raw.items():
        key = f"tokenizer.tokens.{clip(token)}"
        if not isinstance(token, str) or not token:
            raise _fail(source, f"{key}: a token must be a non-empty string, got {short(token)}")
        if setting is None:
            setting = {}
        if not isinstance(setting, dict):
            raise _fail(source, f"{key}: must be a mapping with 'source' and 'force', got {short(setting)}")
        unknown = sorted(set(setting) - {"source", "force"}, key=str)
        if unknown:
            raise _fail(source, f"{key}.{clip(unknown[0])}: unknown key; expected 'source' and 'force'")
        force = setting.get("force", False)
        if not isinstance(force, bool):
            raise _fail(source, f"{key}.force: must be true or false, got {short(force)}")
        tokens.append((token, TokenSetting(_token_source(source, f"{key}.source", setting.get("source")), force)))
    pad = raw.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise _fail(source, f"tokenizer.pad_to_multiple_of: must be a positive integer, got {short(pad)}")
    if pad is not None and pad > MAX_PAD_TO_MULTIPLE_OF:  # it adds up to pad - 1 embedding rows
        raise _fail(source, f"tokenizer.pad_to_multiple_of: at most {MAX_PAD_TO_MULTIPLE_OF} (it adds up to that "
                            f"many embedding rows), got {short(pad)}")
    return TokenizerSpec(source=tok_source, tokens=tuple(tokens), pad_to_multiple_of=pad or None)


def _chat_template(source: Path | None, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _fail(source, f"chat_template: must be a template name, 'auto' or a Jinja template, got {short(value)}")
    problem = check_chat_template(value)
    if problem is not None:
        raise _fail(source, f"chat_template: {short(value)}: {problem}")
    return value


def parse_config(raw: Any, source: Path | None = None, text: str | None = None) -> MergeConfig:
    """Check a config already loaded from YAML (a dict) and return it as a `MergeConfig`.

    Raises:
      ConfigError: naming the key (and the file, if `source` is given) of the first problem found.
    """
    if not isinstance(raw, dict):
        raise _fail(source, f"the config must be a mapping of keys (merge_method, models, ...), "
                            f"got {type(raw).__name__}")
    for name in raw:
        if name in UNSUPPORTED_KEYS:
            raise _fail(source, f"{name}: {UNSUPPORTED_KEYS[name]}")
        if name not in TOP_LEVEL_KEYS:
            raise _fail(source, f"{clip(name)}: unknown key; expected one of {list(TOP_LEVEL_KEYS)}")

    method = raw.get("merge_method")
    if method is None:
        raise _fail(source, "merge_method: missing")
    if not isinstance(method, str) or method not in METHOD_PARAMS:
        raise _fail(source, f"merge_method: unknown method {short(method)}; expected one of {sorted(METHOD_PARAMS)}")

    shared: dict[str, Any] = {}
    for name, value in _mapping(source, "parameters", raw.get("parameters")).items():
        key = f"parameters.{name}"
        if name not in METHOD_PARAMS[method]:
            raise _fail(source, f"{clip(key)}: unknown parameter for method {method!r}; accepted: "
                                f"{sorted(METHOD_PARAMS[method])}")
        shared[name] = _check_param(source, key, method, name, value)

    base = raw.get("base_model")
    base = None if base is None else _reference(source, "base_model", base)
    models, slices, module_parameters = _model_inputs(source, raw, method, base)

    tokenizer_source = raw.get("tokenizer_source")
    if tokenizer_source is not None and tokenizer_source not in ("base", "union"):
        tokenizer_source = _reference(source, "tokenizer_source", tokenizer_source)
    if tokenizer_source == "base" and base is None:
        raise _fail(source, "tokenizer_source: 'base' needs a base_model")
    tokenizer = None if raw.get("tokenizer") is None else _tokenizer_block(source, raw["tokenizer"])
    if tokenizer is not None and tokenizer_source is not None:
        raise _fail(source, "tokenizer: give either tokenizer_source or a tokenizer block, not both (as in mergekit)")
    if tokenizer is not None and tokenizer.source == "base" and base is None:
        raise _fail(source, "tokenizer.source: 'base' needs a base_model")

    return MergeConfig(
        merge_method=method,
        models=models,
        base_model=base,
        parameters=shared,
        dtype=_dtype(source, "dtype", raw.get("dtype")),
        out_dtype=_dtype(source, "out_dtype", raw.get("out_dtype")),
        tokenizer_source=tokenizer_source,
        tokenizer=tokenizer,
        chat_template=_chat_template(source, raw.get("chat_template")),
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
        config = parse_config(raw, source=source, text=text)
    except ConfigError as err:
        message = str(err)
        if len(message) <= max_message:
            raise
        # A schema error quoting a huge value: keep the file and key (they come first), drop the flood.
        raise ConfigError(f"{message[:max_message]}... ({len(message)} characters)") from None
    seed = config.parameters.get("seed")
    if isinstance(seed, int) and not 0 <= seed < 2**32:
        # JAX's PRNG takes a 32-bit seed; a larger one overflowed deep inside the merge.
        raise ConfigError(f"{path}: parameters.seed: must be an integer from 0 to {2**32 - 1}, got {quote(seed)}")
    return config


__all__ = ["DTYPES", "METHOD_PARAMS", "MergeConfig", "ModelEntry", "SliceEntry", "NEEDS_BASE", "TokenSetting", "TokenSource",
           "TokenizerSpec", "config_from_yaml", "load_config", "parse_config", "read_config_text"]
